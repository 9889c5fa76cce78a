"""A generator process: places calls over SIP and runs their RTP legs from one epoll loop.

Each leg has its own non-blocking UDP socket (the server latches every leg to
its own source address), connected to the server's port once the call is
answered. Every 20 ms a leg sends one PCMU-sized packet carrying a probe (see
`measure`); legs are spread over 20 one-millisecond slots so the load
reaches the server as a steady stream, not a burst every 20 ms. Whatever
comes back is checked against the probe and the kernel's receive timestamp.

A transcoding scenario (`pcmu-opus`) pairs a PCMU leg with an Opus leg.
The relay re-encodes the audio, so no probe would survive it: both legs of
a pair send the pair's own tone (no probe), each waits until it hears its
partner's tone in its own codec, and then matches what arrives to its
partner's send times by sequence number (see `measure`). A leg that receives
a frame exactly as some leg sent it was paired with a leg of its own codec:
it is counted, not measured. Over
SIP each process places its calls one at a time, the next once the last
hears the server's music (it is then in the pool), so the pool, pairing in
arrival order, pairs each PCMU caller with the Opus caller placed after it.

Calls go to voiceline over SIP (its pairing pool pairs them), or, to measure
rtpengine on the same load, straight to rtpengine: the generator pairs its
own legs and sets each pair up with an ng offer and answer. With no relay at
all (the baseline a relay's whole-machine cost is taken against) the
generator pairs its own legs and each sends straight to its partner's port.

The process is driven by commands from the bench runner over a pipe:
- ("calls", n): place n more calls -> ("ready", answered, failed, started,
  last_answer, legs_sending, legs_hearing_partner, legs_hearing_own_codec)
  once all are settled and heard their partners (or HEAR_TIMEOUT_SECONDS
  passed); times are monotonic;
- ("window", start_ns, end_ns) -> ("stats", WindowCounts, latency bucket
  counts) GRACE_SECONDS after the window ends;
- ("hangup",) -> ("hung_up", calls_still_hanging_up); ("stop",).
"""

from __future__ import annotations

import os
import resource
import secrets
import select
import socket
import struct
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection

from voiceline.audio.codecs import Coder, new_coder
from voiceline.bench.measure import (
    BUCKET_NS,
    BUCKETS,
    MAGIC,
    PAYLOAD_SIZE,
    PROBE,
    SendTimes,
    SequenceMatch,
    ToneMatcher,
    WindowCounts,
    encoded_tone_frame,
    pair_tone_hz,
)
from voiceline.bench.ng import BValue, NgClient, NgError
from voiceline.bench.uac import BenchCall, CallState, Scenario
from voiceline.sip.message import SipParseError, SipRequest, parse_message

SLOTS = 20  # 1 ms slots per 20 ms frame
SLOT_SECONDS = 0.001
RTP_HEADER_SIZE = 12  # the server relays with a plain fixed header
LATE_SECONDS = 0.003  # slots due longer ago than this are skipped (the generator fell behind)
GRACE_SECONDS = 1.0  # after a window closes, how long its last packets may still arrive
HEAR_TIMEOUT_SECONDS = 10.0  # how long an answered leg may wait to hear its partner
HOUSEKEEPING_SECONDS = 0.05  # SIP retransmissions and command deadlines
MAX_INVITING = 32  # calls being set up at once per process
NICE_WITHOUT_REALTIME = 10
TONE_FRAMES_HEARD = 5  # frames in a row with the partner's tone: the leg hears its partner
MUSIC_TIMEOUT_SECONDS = 2.0  # how long a placed transcoding call may wait for music before the next is placed
# rtpengine: the offer goes to the Opus leg with Opus added, so its answer (Opus only) makes it transcode.
TRANSCODE_FLAGS: dict[str, BValue] = {"codec": {"transcode": ["opus"]}}

# How a generator's legs get their partners (what it is pointed at).
SIP_CALLS = "sip"  # calls to voiceline, paired by its pool
NG_PAIRS = "ng"  # its own pairs, each set up on rtpengine over ng
DIRECT_PAIRS = "direct"  # its own pairs, each leg sending straight to its partner: no relay

# RTP fixed header (version 2, PCMU) followed by the probe, written in one call.
_PACKET = struct.Struct("!BBHII" + PROBE.format.lstrip("!"))
_HEADER = struct.Struct("!BBHII")
_SEQUENCE = struct.Struct("!H")
_MARKER = 0x80
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python does not export it
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY_SIZE = socket.CMSG_SPACE(_TIMESPEC.size)
_RECEIVE_SIZE = 2048


class Leg:
    """The RTP side of one call. `payload` is what it sends; a probe is written over its start
    when `probe`."""

    __slots__ = (
        "id", "sock", "call", "scenario", "payload_type", "frame_ticks", "probe", "buf", "sequence", "timestamp",
        "ssrc", "count", "sending", "heard", "counted", "partner", "tone_hz", "sent", "match", "decoder",
        "tone_frames", "received_any", "own_codec",
    )  # fmt: skip

    def __init__(self, leg_id: int, host: str, scenario: Scenario, payload: bytes, probe: bool = True) -> None:
        self.id = leg_id
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        self.sock.bind((host, 0))
        self.call: BenchCall | None = None
        self.scenario = scenario
        self.payload_type = scenario.payload_type
        self.frame_ticks = scenario.codec.frame_ticks
        self.probe = probe
        self.buf = bytearray(bytes(RTP_HEADER_SIZE) + payload)
        self.sequence = secrets.randbits(16)
        self.timestamp = secrets.randbits(32)
        self.ssrc = secrets.randbits(32)
        self.count = 0  # probes sent
        self.sending = False
        self.heard = False  # a probe from the partner arrived (transcoding: the partner's tone)
        self.counted = True  # its packets count as sent in a window (transcoding: once its partner hears it)
        # Transcoding only: the pair's other leg and tone, this leg's send times, and what it hears.
        self.partner: Leg | None = None
        self.tone_hz = 0
        self.sent: SendTimes | None = None
        self.match = SequenceMatch()
        self.decoder: Coder | None = None
        self.tone_frames = 0  # frames in a row that carried the partner's tone
        self.received_any = False
        self.own_codec = False  # it heard a leg of its own codec, untouched: not transcoded

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])


@dataclass
class _Setup:
    """The progress of one ("calls", n) command."""

    started: float
    remaining: int  # calls not placed yet
    last_answer: float = 0.0
    answered: int = 0
    failed: int = 0


def raise_open_file_limit() -> None:
    """Each leg takes a socket: lift the soft descriptor limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Generator:
    """`server` is voiceline's SIP address, with `NG_PAIRS` rtpengine's ng control address (unused
    with `DIRECT_PAIRS`)."""

    def __init__(
        self,
        control: Connection,
        server: tuple[str, int],
        host: str,
        first_leg_id: int,
        scenario: Scenario,
        pairing: str = SIP_CALLS,
    ) -> None:
        self._control = control
        self._server = server
        self._scenario = scenario
        self._pairs_itself = pairing != SIP_CALLS
        self._transcoding = scenario.transcoded_to is not None
        self._frames: dict[tuple[str, int], bytes] = {}  # each codec's encoded tone frame, by tone
        self._frames_sent: set[bytes] = set()  # the frames of the transcoding legs: arriving so, untranscoded
        self._tone_matchers: dict[str, ToneMatcher] = {}  # by codec name
        self._unplaced: list[Leg] = []  # transcoding over SIP: the second leg of a pair, placed next
        self._last_placed: tuple[Leg, float] | None = None  # transcoding over SIP: and when
        self._ng = NgClient(server) if pairing == NG_PAIRS else None
        self._ng_calls: list[str] = []  # Call-IDs of the pairs set up through ng
        self._host = host
        self._next_leg_id = first_leg_id
        self._sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sip.setblocking(False)
        self._sip.bind((host, 0))
        self._sip_address = (host, int(self._sip.getsockname()[1]))
        self._poll = select.epoll()
        self._poll.register(self._sip.fileno(), select.EPOLLIN)
        self._poll.register(control.fileno(), select.EPOLLIN)
        self._legs_by_fd: dict[int, Leg] = {}
        self._calls: dict[str, Leg] = {}  # by Call-ID (SIP calls)
        self._legs: list[Leg] = []
        self._pending: set[Leg] = set()  # calls with a request awaiting its final response
        self._slots: list[list[Leg]] = [[] for _ in range(SLOTS)]
        self._setup: _Setup | None = None
        self._hangup_deadline = 0.0
        self._window = (0, 0)
        self._window_reported = True
        self._counts = WindowCounts()
        self._latency = [0] * BUCKETS
        self._running = True

    # -- the loop ----------------------------------------------------------------

    def run(self) -> None:
        start = time.monotonic()
        tick = 0
        next_housekeeping = start
        poll = self._poll.poll
        receive = self._receive_transcoded if self._transcoding else self._receive
        while self._running:
            now = time.monotonic()
            due = start + tick * SLOT_SECONDS
            if now - due > LATE_SECONDS:
                # Fallen behind (descheduled): drop the missed frames rather than send them in
                # a burst no real phone would, which would measure our stall, not the server.
                late = int((now - due) / SLOT_SECONDS)
                tick += late
                due += late * SLOT_SECONDS
            while due <= now:
                self._send_slot(self._slots[tick % SLOTS])
                tick += 1
                due += SLOT_SECONDS
            for fd, _ in poll(max(0.0, due - time.monotonic())):
                leg = self._legs_by_fd.get(fd)
                if leg is not None:
                    receive(leg)
                elif fd == self._sip.fileno():
                    self._receive_sip()
                else:
                    self._command(self._control.recv())
            now = time.monotonic()
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_SECONDS
                self._housekeeping(now)
        self._close()

    def _send_slot(self, legs: list[Leg]) -> None:
        pack_into = _PACKET.pack_into
        window_start, window_end = self._window
        in_window = 0
        for leg in legs:
            if not leg.sending:
                continue
            leg.sequence = sequence = (leg.sequence + 1) & 0xFFFF
            leg.timestamp = timestamp = (leg.timestamp + leg.frame_ticks) & 0xFFFFFFFF
            count = leg.count = leg.count + 1
            sent_ns = time.time_ns()
            if leg.probe:
                pack_into(leg.buf, 0, 0x80, leg.payload_type, sequence, timestamp, leg.ssrc, MAGIC, leg.id, count, sent_ns)
            else:
                _HEADER.pack_into(leg.buf, 0, 0x80, leg.payload_type, sequence, timestamp, leg.ssrc)
            if leg.sent is not None:
                leg.sent.record(sequence, sent_ns)
            try:
                leg.sock.send(leg.buf)
            except OSError:  # e.g. ICMP port unreachable after the server closed the leg
                continue
            if window_start <= sent_ns < window_end and leg.counted:
                in_window += 1
        self._counts.sent += in_window

    def _receive(self, leg: Leg) -> None:
        window_start, window_end = self._window
        counts = self._counts
        unpack_from = PROBE.unpack_from
        while True:
            try:
                data, ancillary, _, _ = leg.sock.recvmsg(_RECEIVE_SIZE, _ANCILLARY_SIZE)
            except OSError:  # nothing more to read (or a refused port): done for now
                return
            if len(data) < RTP_HEADER_SIZE + PROBE.size:
                counts.foreign += 1
                continue
            magic, _, _, sent_ns = unpack_from(data, RTP_HEADER_SIZE)
            if magic != MAGIC:
                counts.foreign += 1  # hold audio before the partner came
                continue
            leg.heard = True
            if window_start <= sent_ns < window_end:
                self._arrived_in_window(ancillary, sent_ns)

    def _receive_transcoded(self, leg: Leg) -> None:
        """What a leg of a transcoding pair receives: until it hears its partner's tone, listened to;
        then matched to the partner's send times by sequence number."""
        window_start, window_end = self._window
        counts = self._counts
        partner = leg.partner
        assert partner is not None and partner.sent is not None  # set with the pair
        sent = partner.sent
        while True:
            try:
                data, ancillary, _, _ = leg.sock.recvmsg(_RECEIVE_SIZE, _ANCILLARY_SIZE)
            except OSError:
                return
            if len(data) <= RTP_HEADER_SIZE:
                counts.foreign += 1
                continue
            if not leg.received_any:
                leg.received_any = True
                if self._last_placed is not None and self._last_placed[0] is leg:
                    self._place_calls(time.monotonic())  # it hears music: it is in the pool
            payload = data[RTP_HEADER_SIZE:]
            if payload in self._frames_sent:
                leg.own_codec = True  # paired with a leg of its own codec: nothing was transcoded
                counts.foreign += 1
                continue
            (sequence,) = _SEQUENCE.unpack_from(data, 2)
            source_sequence = leg.match.source_sequence(sequence, bool(data[1] & _MARKER), partner.sequence)
            if not leg.heard:
                self._listen(leg, payload)
                continue
            sent_ns = sent.at(source_sequence)
            if sent_ns is not None and window_start <= sent_ns < window_end:
                self._arrived_in_window(ancillary, sent_ns)

    def _arrived_in_window(self, ancillary: list[tuple[int, int, bytes]], sent_ns: int) -> None:
        """A packet sent in the window came back: counted, its latency by the kernel's receive time."""
        if ancillary:
            seconds, nanoseconds = _TIMESPEC.unpack(ancillary[0][2])
            received_ns = seconds * 1_000_000_000 + nanoseconds
        else:
            received_ns = time.time_ns()
        bucket = (received_ns - sent_ns) // BUCKET_NS
        self._latency[0 if bucket < 0 else bucket if bucket < BUCKETS else BUCKETS - 1] += 1
        self._counts.received += 1

    def _listen(self, leg: Leg, payload: bytes) -> None:
        """Decode what `leg` received and look for its partner's tone: only until it is heard."""
        if leg.decoder is None:
            leg.decoder = new_coder(leg.scenario.codec)
        matcher = self._tone_matcher(leg.scenario)
        if matcher.strongest(leg.decoder.decode(payload)) == leg.tone_hz:
            leg.tone_frames += 1
        else:
            leg.tone_frames = 0
        if leg.tone_frames >= TONE_FRAMES_HEARD:
            leg.heard = True
            leg.decoder = None
            assert leg.partner is not None
            leg.partner.counted = True  # what the partner sends now reaches this leg, transcoded

    def _tone_matcher(self, scenario: Scenario) -> ToneMatcher:
        codec = scenario.codec
        matcher = self._tone_matchers.get(codec.name)
        if matcher is None:
            matcher = self._tone_matchers[codec.name] = ToneMatcher(codec.rate, codec.frame_samples)
        return matcher

    def _receive_sip(self) -> None:
        while True:
            try:
                data, source = self._sip.recvfrom(65535)
            except OSError:
                return
            try:
                message = parse_message(data)
            except SipParseError:
                continue
            leg = self._calls.get(message.headers.get("Call-ID") or "")
            if leg is None or leg.call is None:
                continue
            call = leg.call
            now = time.monotonic()
            if isinstance(message, SipRequest):
                self._sip_send(call.on_request(message), source)
                if call.state is CallState.ENDED:
                    leg.sending = False
                continue
            was_inviting = call.state is CallState.INVITING
            reply = call.on_response(message, now)
            if reply:
                self._sip_send(reply, self._server)
            if was_inviting and call.state is not CallState.INVITING:
                self._call_settled(leg, now)
            if call.state in (CallState.ENDED, CallState.FAILED):
                leg.sending = False

    def _call_settled(self, leg: Leg, now: float) -> None:
        call = leg.call
        assert call is not None
        setup = self._setup
        if call.state is CallState.ANSWERED and call.remote_rtp is not None:
            try:
                leg.sock.connect(call.remote_rtp)
            except OSError:
                call.state = CallState.FAILED
            else:
                leg.sending = True
        if setup is not None:
            if call.state is CallState.ANSWERED:
                setup.answered += 1
                setup.last_answer = now
            else:
                setup.failed += 1
        self._place_calls(now)

    def _sip_send(self, data: bytes, dest: tuple[str, int]) -> None:
        try:
            self._sip.sendto(data, dest)
        except OSError:
            pass  # retransmission covers it

    # -- commands and timers -----------------------------------------------------

    def _command(self, command: tuple[object, ...]) -> None:
        kind = command[0]
        now = time.monotonic()
        if kind == "calls":
            count = int(command[1])  # type: ignore[call-overload]
            self._setup = _Setup(now, count)
            if self._pairs_itself:
                self._set_up_pairs()
            else:
                self._place_calls(now)
        elif kind == "window":
            self._window = (int(command[1]), int(command[2]))  # type: ignore[call-overload]
            self._window_reported = False
            self._counts = WindowCounts()
            self._latency = [0] * BUCKETS
        elif kind == "hangup":
            for leg in self._legs:
                leg.sending = False
            if self._ng is not None:
                self._delete_pairs()
            for leg in self._calls.values():
                if leg.call is not None:
                    request = leg.call.hangup(now)
                    if request is not None:
                        self._sip_send(request, self._server)
                        self._pending.add(leg)
            self._hangup_deadline = now + 10.0
        elif kind == "stop":
            self._running = False

    def _new_leg(self, scenario: Scenario | None = None, payload: bytes = bytes(PAYLOAD_SIZE), probe: bool = True) -> Leg:
        leg = Leg(self._next_leg_id, self._host, scenario or self._scenario, payload, probe)
        self._next_leg_id += 1
        self._legs.append(leg)
        self._legs_by_fd[leg.sock.fileno()] = leg
        self._poll.register(leg.sock.fileno(), select.EPOLLIN)
        self._slots[leg.id % SLOTS].append(leg)
        return leg

    def _new_pair(self) -> tuple[Leg, Leg]:
        """Two new legs, partners: in a transcoding scenario each in its codec, sending the pair's tone
        and no probe."""
        if not self._transcoding:
            return self._new_leg(), self._new_leg()
        tone_hz = pair_tone_hz(self._next_leg_id // 2)
        first, second = (
            self._new_leg(scenario, self._tone_payload(scenario, tone_hz), probe=False)
            for scenario in (self._scenario.leg(second=False), self._scenario.leg(second=True))
        )
        for leg, partner in ((first, second), (second, first)):
            leg.partner, leg.tone_hz, leg.sent, leg.counted = partner, tone_hz, SendTimes(), False
        return first, second

    def _tone_payload(self, scenario: Scenario, tone_hz: int) -> bytes:
        """The frame every packet of a leg in `scenario` carries (`encoded_tone_frame`), made once per
        codec and tone."""
        codec = scenario.codec
        frame = self._frames.get((codec.name, tone_hz))
        if frame is None:
            frame = self._frames[codec.name, tone_hz] = encoded_tone_frame(codec, tone_hz)
            self._frames_sent.add(frame)
        return frame

    def _set_up_pairs(self) -> None:
        """Each two new legs a pair. rtpengine: one call, set up by an offer (the first leg's SDP) and
        an answer (the second's); each leg then sends to the port rtpengine gave it. Blocking: set-up
        is not measured. No relay: each leg sends to its partner's own port."""
        setup = self._setup
        assert setup is not None
        while setup.remaining >= 2:
            setup.remaining -= 2
            caller, callee = self._new_pair()
            if self._ng is None:
                callee.sock.connect((self._host, caller.port))
                caller.sock.connect((self._host, callee.port))
                caller.sending = callee.sending = True
                setup.answered += 2
                setup.last_answer = time.monotonic()
                continue
            call_id = secrets.token_hex(10)
            flags = TRANSCODE_FLAGS if self._transcoding else {}
            try:
                offered = self._ng.command(
                    "offer", call_id=call_id, from_tag="caller", sdp=caller.scenario.offer(self._host, caller.port), **flags
                )
                if self._transcoding:  # the callee answers in the payload type rtpengine offered it its codec as
                    callee.payload_type = sdp_payload_type(offered.get("sdp"), callee.scenario.rtpmap)
                    callee.scenario = replace(callee.scenario, payload_type=callee.payload_type)
                answered = self._ng.command(
                    "answer",
                    call_id=call_id,
                    from_tag="caller",
                    to_tag="callee",
                    sdp=callee.scenario.offer(self._host, callee.port),
                )
                callee.sock.connect((self._host, _sdp_port(offered.get("sdp"))))
                caller.sock.connect((self._host, _sdp_port(answered.get("sdp"))))
            except (NgError, OSError, ValueError):
                setup.failed += 2
                continue
            self._ng_calls.append(call_id)
            caller.sending = callee.sending = True
            setup.answered += 2
            setup.last_answer = time.monotonic()
        setup.failed += setup.remaining  # an odd leg out has no partner
        setup.remaining = 0

    def _delete_pairs(self) -> None:
        assert self._ng is not None
        for call_id in self._ng_calls:
            try:
                self._ng.command("delete", call_id=call_id, from_tag="caller")
            except NgError:
                pass  # rtpengine ends it when it stops
        self._ng_calls.clear()

    def _place_calls(self, now: float) -> None:
        setup = self._setup
        if setup is None:
            return
        inviting = self._inviting()
        while setup.remaining and inviting < MAX_INVITING:
            if self._transcoding:
                if not self._may_place_next(now):
                    return
                if not self._unplaced:
                    self._unplaced.extend(self._new_pair())
                leg = self._unplaced.pop(0)
                self._last_placed = (leg, now)
            else:
                leg = self._new_leg()
            call = leg.call = BenchCall(self._sip_address, self._server, leg.port, leg.scenario)
            self._calls[call.call_id] = leg
            self._sip_send(call.invite(now), self._server)
            self._pending.add(leg)
            setup.remaining -= 1
            inviting += 1

    def _may_place_next(self, now: float) -> bool:
        """Transcoding over SIP, calls one at a time: the last one placed hears the server's music (it
        waits in the pool, so the next one placed is its partner), failed, or waited long enough."""
        if self._last_placed is None:
            return True
        leg, placed_at = self._last_placed
        call = leg.call
        settled = call is None or call.state in (CallState.FAILED, CallState.ENDED)
        return leg.received_any or settled or now - placed_at > MUSIC_TIMEOUT_SECONDS

    def _inviting(self) -> int:
        return sum(1 for leg in self._pending if leg.call and leg.call.state is CallState.INVITING)

    def _housekeeping(self, now: float) -> None:
        for leg in list(self._pending):
            call = leg.call
            if call is None or call.state not in (CallState.INVITING, CallState.HANGING_UP):
                self._pending.discard(leg)
                continue
            was_inviting = call.state is CallState.INVITING
            request = call.due(now)
            if request is not None:
                self._sip_send(request, self._server)
            elif was_inviting and call.state is CallState.FAILED:  # type: ignore[comparison-overlap]  # due() moved it
                self._call_settled(leg, now)
        if self._transcoding:
            self._place_calls(now)  # a call placed that never heard music
        self._report_setup(now)
        self._report_window()
        self._report_hangup(now)

    def _report_setup(self, now: float) -> None:
        setup = self._setup
        if setup is None or setup.remaining or self._inviting():
            return
        legs = [leg for leg in self._legs if leg.sending]
        heard = sum(1 for leg in legs if leg.heard)
        own_codec = sum(1 for leg in legs if leg.own_codec and not leg.heard)
        if heard + own_codec < len(legs) and now - max(setup.last_answer, setup.started) < HEAR_TIMEOUT_SECONDS:
            return
        self._setup = None
        self._control.send(
            ("ready", setup.answered, setup.failed, setup.started, setup.last_answer, len(legs), heard, own_codec)
        )

    def _report_window(self) -> None:
        if self._window_reported or time.time_ns() < self._window[1] + GRACE_SECONDS * 1e9:
            return
        self._window_reported = True
        self._control.send(("stats", self._counts, self._latency))

    def _report_hangup(self, now: float) -> None:
        if not self._hangup_deadline:
            return
        busy = sum(1 for leg in self._pending if leg.call and leg.call.state is CallState.HANGING_UP)
        if busy and now < self._hangup_deadline:
            return
        self._hangup_deadline = 0.0
        self._control.send(("hung_up", busy))

    def _close(self) -> None:
        for leg in self._legs:
            leg.sock.close()
        if self._ng is not None:
            self._ng.close()
        self._sip.close()
        self._poll.close()


def sdp_payload_type(sdp: object, rtpmap: str) -> int:
    """The payload type an SDP rtpengine returned gives the codec of `rtpmap` (e.g. opus/48000/2)."""
    for line in str(sdp).splitlines():
        if line.startswith("a=rtpmap:") and line.partition(" ")[2].lower() == rtpmap.lower():
            return int(line[len("a=rtpmap:") :].partition(" ")[0])
    raise ValueError("the codec is not in the SDP")


def _sdp_port(sdp: object) -> int:
    """The audio port of an SDP rtpengine returned."""
    for line in str(sdp).splitlines():
        if line.startswith("m=audio "):
            return int(line.split()[1])
    raise ValueError("no audio in the SDP")


def generator_main(
    control: Connection,
    server: tuple[str, int],
    host: str,
    first_leg_id: int,
    realtime_priority: int,
    scenario: Scenario,
    pairing: str,
) -> None:
    """Entry point of a generator process."""
    raise_open_file_limit()
    # The generator stands in for phones elsewhere: it must not take the CPU from the server.
    # Under SCHED_RR it runs one priority below the server (the runner passes that priority);
    # under normal scheduling it yields. The runner reports the policy in effect.
    try:
        if realtime_priority:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(realtime_priority))
        else:
            os.nice(NICE_WITHOUT_REALTIME)
    except OSError:
        pass
    Generator(control, server, host, first_leg_id, scenario, pairing).run()
