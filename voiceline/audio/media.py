"""RTP media: the engine (port allocation, one shared hold-audio pacer, the bridge) and one leg per call.

A leg is the asyncio edge around two sans-I/O sides: its `Receiver` (what
arrives on its RTP port: filtered, latched, counted, digits) and its `Sender`
(one outbound stream of what the leg hears: hold audio, another leg, a
prompt). The engine's `Bridge` says who hears whom. A leg also owns an RTCP
socket (RFC 3550 reports every ~5 s, BYE on close, the peer's reports read
for `stats`). Everything per packet runs inside `MediaLeg._readable`: the
receiver's verdict, then each listener's header rewrite into its reused
buffer and the socket's `sendto`; nothing is queued or logged. An SRTP leg (see
srtp.py) unprotects what it receives first and protects what it sends last,
so the relay in between only ever sees plain RTP: an SRTP leg and a plain
one relay to each other, each with its own keys. G.711 audio of legs watched
for in-band DTMF waits (1 ms at most) for the engine's `_ToneBatch` to decode
and check many legs' frames in one vectorised pass, then to relay them
(muted where they held a key).
With the kernel path (kernel/), an established same-codec relay is forwarded
by a TC program instead; every control operation here runs inside
`KernelRoutes.changing`, which hands the relay back to this path first.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import ipaddress
import secrets
import socket
import termios
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np

from voiceline.audio import g711
from voiceline.audio.bridge import Bridge
from voiceline.audio.dtmf import frame_digits
from voiceline.audio.hold import EncodedLoop
from voiceline.audio.kernel.forwarding import KernelPath, KernelPathUnavailable, loop_time_from
from voiceline.audio.kernel.routes import KernelRoutes
from voiceline.audio.latch import Address, Learning
from voiceline.audio.receiver import AUDIO, DIGIT, LATCHED, PCM, TONES, Receiver
from voiceline.audio.rtcp import build_report, new_cname, report_interval
from voiceline.audio.rtp import HEADER_SIZE, MAX_PAYLOAD
from voiceline.audio.sender import DatagramSocket, Sender
from voiceline.audio.srtp import SrtpContext, SrtpKeys
from voiceline.codec_table import FRAME_SECONDS, Codec

MAX_LATE_FRAMES = 3  # a pacer later than this skips ahead instead of sending a burst
PORT_REST_SECONDS = 30.0  # a freed port waits this long (late packets of its last call) unless none other is free
# Room for the longest packet a leg takes and more (SRTP's tag): anything longer, cut or not, is dropped.
RECEIVE_SIZE = 2 * (HEADER_SIZE + MAX_PAYLOAD)
# An in-band DTMF batch this full is checked at the end of the loop iteration: a frame's share of a
# batch's fixed cost falls with its size, and 32 frames are 0.64 ms of 500 pairs' audio.
TONE_BATCH_FRAMES = 32
TONE_BATCH_SECONDS = 0.001  # else when its first frame has waited this long


class MediaError(Exception):
    """Media could not be set up; the message is fixed and safe to log."""


class _HoldPacer:
    """Sends the next hold frame to every holding leg every 20 ms, from one timer.

    Ticks fall on a fixed grid (start + n * 20 ms), so lateness never accumulates.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, hold_pcm: np.ndarray) -> None:
        self._loop = loop
        self._hold_pcm = hold_pcm
        self._frames: dict[tuple[Codec, int | None], EncodedLoop] = {}  # by codec and loop (its id: shared, read-only)
        self._legs: set[MediaLeg] = set()
        self._start = 0.0
        self._tick = 0
        self._timer: asyncio.TimerHandle | None = None

    def frames(self, codec: Codec, pcm: np.ndarray | None = None) -> EncodedLoop:
        """The hold pattern (or another loop, `pcm`) in `codec`, encoded frame by frame as legs in that
        codec first play it."""
        key = (codec, None if pcm is None else id(pcm))
        if key not in self._frames:
            self._frames[key] = EncodedLoop(self._hold_pcm if pcm is None else pcm, codec)
        return self._frames[key]

    def add(self, leg: MediaLeg) -> None:
        self._legs.add(leg)
        if self._timer is None:
            self._start = self._loop.time()
            self._tick = 0
            self._timer = self._loop.call_at(self._start, self._run)

    def discard(self, leg: MediaLeg) -> None:
        self._legs.discard(leg)
        if not self._legs:
            self.stop()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _run(self) -> None:
        due = self._start + self._tick * FRAME_SECONDS
        now = self._loop.time()
        if now - due > MAX_LATE_FRAMES * FRAME_SECONDS:
            self._tick = int((now - self._start) / FRAME_SECONDS)
            due = self._start + self._tick * FRAME_SECONDS
        for leg in list(self._legs):  # a tick may end a prompt, which leaves the pacer
            leg._tick(due)
        self._tick += 1
        self._timer = self._loop.call_at(self._start + self._tick * FRAME_SECONDS, self._run)


class _ToneBatch:
    """G.711 frames of legs watched for in-band DTMF, checked together.

    Per frame on its own, decoding and the DTMF measure cost more than the
    relay; for many legs' frames one table lookup and one matrix product do
    it. A loop iteration often holds only one or two such frames, so a batch
    is checked at the end of the iteration in which it reaches
    TONE_BATCH_FRAMES, or when its first frame has waited TONE_BATCH_SECONDS
    (a twentieth of a frame: sparse traffic is never held longer). Frames are
    handed on in the order they came, so each leg's stay in order.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._frames: list[tuple[MediaLeg, str, bytes, int, int, float]] = []  # leg, codec, packet, payload span, arrival
        # Whether every frame has the first's codec and payload span (nearly always): then the
        # batch's payloads are one strided view of its packets joined.
        self._alike = True
        self._deadline: asyncio.TimerHandle | None = None

    def add(self, leg: MediaLeg, codec: str, packet: bytes, offset: int, end: int, now: float) -> None:
        frames = self._frames
        if not frames:
            self._alike = True
            self._deadline = self._loop.call_later(TONE_BATCH_SECONDS, self._check)
        elif self._alike:
            first = frames[0]
            self._alike = offset == first[3] and end == first[4] and codec == first[1]
        frames.append((leg, codec, packet, offset, end, now))
        if len(frames) == TONE_BATCH_FRAMES:
            self._loop.call_soon(self._check)

    def _check(self) -> None:
        frames = self._frames
        if not frames:  # the deadline and a full batch both asked
            return
        if self._deadline is not None:
            self._deadline.cancel()
        self._frames = []
        for (leg, codec, packet, offset, end, now), digit in zip(frames, self._digits(frames)):
            if leg._closed:
                continue
            if digit is None and leg.receiver.tones_pass:  # nearly always: plain audio, relayed as it is
                for listener in leg._listeners:
                    listener.relay(packet, offset, end, now)
            else:
                leg._tones_checked(codec, packet, offset, end, digit, now)

    def _digits(self, frames: list[tuple[MediaLeg, str, bytes, int, int, float]]) -> list[str | None]:
        """The digit each frame holds, measured together per codec and payload length."""
        if self._alike:
            _, codec, _, offset, end, _ = frames[0]
            packets = np.frombuffer(b"".join([frame[2] for frame in frames]), dtype=np.uint8)
            return _frame_digits(codec, packets.reshape(len(frames), end)[:, offset:])
        digits: list[str | None] = [None] * len(frames)
        groups: dict[tuple[str, int], tuple[list[int], list[bytes]]] = {}  # by codec and length: indices, payloads
        for index, (_, codec, packet, offset, end, _) in enumerate(frames):
            indices, payloads = groups.setdefault((codec, end - offset), ([], []))
            indices.append(index)
            payloads.append(packet[offset:end])
        for (codec, size), (indices, payloads) in groups.items():
            codes = np.frombuffer(b"".join(payloads), dtype=np.uint8).reshape(len(indices), size)
            for index, digit in zip(indices, _frame_digits(codec, codes)):
                digits[index] = digit
        return digits


def _frame_digits(codec: str, codes: np.ndarray) -> list[str | None]:
    """The digit each row of G.711 `codes` holds (decoded to float32, which is exact)."""
    return frame_digits(g711.decode_table(codec, np.float32).take(codes), g711.RATE)


class MediaEngine:
    """Opens media legs on even ports of a range and drives hold audio for all of them."""

    def __init__(
        self,
        bind_host: str,
        port_range: tuple[int, int],
        hold_pcm: np.ndarray,
        *,
        inband_dtmf: bool = True,
        learning: Learning = Learning(),
        kernel_forwarding: bool = False,
    ) -> None:
        """`port_range` is inclusive; each leg takes an even port and the odd one above it.
        `inband_dtmf`: look for DTMF tones in the audio of legs without telephone-event.
        `learning`: how a source other than the SDP's or the signalling's host proves itself.
        `kernel_forwarding`: forward established relays in the kernel when it allows it; else
        `kernel_path_unavailable` says why not.

        Needs a running event loop (call from within it).
        """
        if len(hold_pcm) == 0:
            raise ValueError("hold audio is empty")
        low, high = port_range
        self._bind_host = bind_host
        # An IP address (configuration allows nothing else): its family, with no lookup per leg.
        self._family = socket.AF_INET6 if ipaddress.ip_address(bind_host).version == 6 else socket.AF_INET
        self._inband_dtmf = inband_dtmf
        self._learning = learning
        # Ports are drawn at random from `_free`, so nobody can guess the next call's port and
        # spray it; a freed port rests (oldest first) before it is drawn again.
        self._free = list(range(low + low % 2, high, 2))
        self._resting: deque[tuple[float, int]] = deque()  # (freed at, port)
        self._loop = asyncio.get_running_loop()
        self._pacer = _HoldPacer(self._loop, hold_pcm)
        self._bridge = Bridge()
        self.kernel_path_unavailable: str | None = None
        path: KernelPath | None = None
        if kernel_forwarding:
            try:
                path = KernelPath(bind_host)
            except KernelPathUnavailable as exc:
                self.kernel_path_unavailable = str(exc)
        self.kernel_routes = KernelRoutes(path, self._bridge, bind_host, self._loop)
        self._tones = _ToneBatch(self._loop)
        self._legs: set[MediaLeg] = set()
        self._closed = False

    @property
    def legs(self) -> int:
        """How many legs are open."""
        return len(self._legs)

    async def open_leg(self) -> MediaLeg:
        unbindable: list[int] = []  # taken by someone else: not tried again by this call
        try:
            while not self._closed:
                port = self._draw()
                if port is None:  # another open_leg may have taken the rest
                    break
                leg = await self._bind(port)
                if leg is None:
                    unbindable.append(port)
                    continue
                if self._closed:  # closed while we were binding
                    leg.close()
                    break
                self._legs.add(leg)
                return leg
        finally:
            for port in unbindable:
                self._rest(port)
        raise MediaError("no free RTP port in the configured range")

    def _draw(self) -> int | None:
        """A random free port; a resting one only when no other is free."""
        now = self._loop.time()
        while self._resting and now - self._resting[0][0] >= PORT_REST_SECONDS:
            self._free.append(self._resting.popleft()[1])
        if not self._free:
            if not self._resting:
                return None
            self._free.append(self._resting.popleft()[1])
        index = secrets.randbelow(len(self._free))
        self._free[index], self._free[-1] = self._free[-1], self._free[index]
        return self._free.pop()

    def _rest(self, port: int) -> None:
        self._resting.append((self._loop.time(), port))

    def _new_leg(self, port: int) -> MediaLeg:
        return MediaLeg(
            self._loop,
            port,
            self._pacer,
            self._bridge,
            self._release,
            Receiver(inband_dtmf=self._inband_dtmf, learning=self._learning, batch_tones=True),
            self.kernel_routes,
            self._tones,
        )

    async def _bind(self, port: int) -> MediaLeg | None:
        try:
            rtp = socket.socket(self._family, socket.SOCK_DGRAM)
        except OSError:
            return None
        try:
            rtp.setblocking(False)
            rtp.bind((self._bind_host, port))
        except OSError:
            rtp.close()
            return None
        leg = self._new_leg(port)
        leg._attach(rtp)
        try:
            rtcp, _ = await self._loop.create_datagram_endpoint(
                lambda: _RtcpEndpoint(leg), local_addr=(self._bind_host, port + 1)
            )
        except OSError:
            leg.close()
            return None
        leg._rtcp = rtcp
        return leg

    def _release(self, leg: MediaLeg) -> None:
        if leg in self._legs:
            self._legs.discard(leg)
            self._rest(leg.local_port)

    def close(self) -> None:
        """Close every leg and stop the pacer. RTP sockets close at once, RTCP ones on the loop's next iteration."""
        self._closed = True
        for leg in list(self._legs):
            leg.close()
        self._pacer.stop()
        self.kernel_routes.close()


@dataclass(frozen=True)
class LegStats:
    """Anonymous figures of one leg: what it received, sent, and what its peer reported."""

    packets_in: int
    packets_in_kernel: int  # of packets_in: relayed by the kernel path
    packets_out: int
    packets_dropped: int
    packets_expected: int  # by the peer's sequence numbers
    packets_lost: int
    loss_fraction: float  # of packets_expected
    jitter_ms: float  # interarrival jitter of what we received (RFC 3550 A.8)
    peer_lost: int | None  # what the peer's last RTCP report said of our stream
    peer_jitter_ms: float | None
    concealed_frames: int  # frames made up under a prompt (the mixing path's jitter buffer)
    srtp_suite: str | None  # the SRTP crypto-suite; None for plain RTP
    srtp_auth_failures: int  # received SRTP/SRTCP packets dropped: failed authentication or replayed


class _RtcpEndpoint(asyncio.DatagramProtocol):
    """The odd port above a leg's RTP port: hands RTCP to the leg."""

    def __init__(self, leg: MediaLeg) -> None:
        self._leg = leg

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._leg._rtcp_received(data, addr)


class MediaLeg:
    """The media of one call: an RTP socket that hears hold audio or another leg.

    The asyncio edge of its `receiver` and `sender`: it feeds the receiver each
    datagram with the loop's time and relays what it says arrived to whoever
    the bridge says hears this leg. Call `start` once the SDP is negotiated;
    `hold` and `listen_to` need it.
    The RTP socket is read and written directly, not through a datagram
    transport: one `recvfrom` per readable event (the loop's poll is level
    triggered, so a second datagram waiting makes the next one), where a
    transport reads until the socket is empty and so pays a second receive
    call per packet that finds nothing; and `sendto` straight to the kernel.
    Digits the caller presses (RFC 4733 events, or in-band tones when the SDP
    has no telephone-event) go to `on_digit`; neither reaches the partner.
    Every prompt `play_over` starts ends with one call of `on_prompt_end` (played
    to its end, also unheard while the peer holds us, or empty), unless another
    prompt replaces it first or the leg closes.
    """

    # Set by _attach, with the socket, before open_leg returns the leg.
    sender: Sender
    _socket: socket.socket
    _listeners: list[Sender]  # who hears this leg (the bridge keeps the list up to date)

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        port: int,
        pacer: _HoldPacer,
        bridge: Bridge,
        on_close: Callable[[MediaLeg], None],
        receiver: Receiver,
        kernel: KernelRoutes,
        tones: _ToneBatch,
    ) -> None:
        self.local_port = port
        self.on_digit: Callable[[str], None] | None = None
        self.on_prompt_end: Callable[[], None] | None = None
        self.receiver = receiver
        self._loop = loop
        self._pacer = pacer
        self._bridge = bridge
        self._on_close = on_close
        self._kernel = kernel
        self._tones = tones
        # Bound once: the per-packet path looks nothing up it need not.
        self._time = loop.time
        self._receive = receiver.receive
        self._srtp: SrtpContext | None = None
        self._rtcp: asyncio.DatagramTransport | None = None
        self._cname = new_cname()
        self._report_timer: asyncio.TimerHandle | None = None
        self._packets_at_last_report = 0
        self._closed = False
        self._holding_loop: np.ndarray | None = None  # what `hold` plays: None for the hold music

    # -- control --------------------------------------------------------------

    def start(
        self,
        remote: Address,
        codec: Codec,
        payload_type: int,
        telephone_event_pt: int | None,
        signalling_host: str | None = None,
        srtp: SrtpKeys | None = None,
    ) -> None:
        """Send to `remote` (the SDP address, an IP) until a source latches: one on the SDP's host
        or on `signalling_host` (where the call's SIP came from) at once, any other only after
        proving itself; packets from anywhere but the latched peer are dropped (see latch.py).
        With `srtp` the stream is SRTP both ways; a packet that fails authentication is dropped."""
        if self.sender.remote is not None:
            raise MediaError("media leg already started")
        if srtp is not None:
            self._srtp = SrtpContext(srtp)
        self.receiver.start(
            remote, codec, payload_type, telephone_event_pt, self._time(), signalling_host=signalling_host, srtp=self._srtp
        )
        self.sender.start(remote, codec, payload_type, self._srtp)
        self._report_timer = self._loop.call_later(report_interval(), self._send_report)

    def rekey(self, srtp: SrtpKeys) -> None:
        """New SRTP keys from a re-offer (a direction whose key is unchanged carries on as it was)."""
        if self._srtp is None:
            raise MediaError("media leg is not SRTP")
        self._srtp.rekey(srtp)

    @property
    def encrypted(self) -> bool:
        return self._srtp is not None

    @property
    def packets_in(self) -> int:
        forwarded = self._kernel.forwarded_from(self)
        return self.receiver.packets_in + (forwarded.packets if forwarded is not None else 0)

    @property
    def packets_dropped(self) -> int:
        return self.receiver.packets_dropped

    @property
    def last_received(self) -> float:
        """Loop time (monotonic) of the last valid packet (also one the kernel forwarded)."""
        forwarded = self._kernel.forwarded_from(self)
        if forwarded is None or forwarded.packets == 0:
            return self.receiver.last_received
        return max(self.receiver.last_received, loop_time_from(forwarded.last_ns, self._time()))

    @property
    def packets_out(self) -> int:
        forwarded = self._kernel.forwarded_to(self)
        return self.sender.packets_out + (forwarded.packets if forwarded is not None else 0)

    def hold(self, loop: np.ndarray | None = None) -> None:
        """Hear hold audio, from the start of the pattern; or `loop` (8 kHz int16, shared and read-only:
        a ringing tone), round and round."""
        self._require_usable()
        if self.sender.holding and self._holding_loop is loop:
            return
        with self._kernel.changing(self):
            self._detach()
            self.sender.hold(self._pacer.frames(self.sender.codec, loop))
            self._holding_loop = loop
            self._pacer.add(self)

    @property
    def rate(self) -> int:
        """The sample rate of its codec: what a prompt for it is best made at."""
        return self.sender.codec.rate

    def hear_nothing(self) -> None:
        """Hear neither hold audio nor a partner (a prompt playing goes on over silence)."""
        self._require_usable()
        with self._kernel.changing(self):
            self._detach()

    def listen_to(self, other: MediaLeg) -> None:
        """Hear what `other` receives: relayed as is for the same codec, else transcoded."""
        self._require_usable()
        other._require_usable()
        if self._bridge.source(self.sender) is other.receiver:
            return
        with self._kernel.changing(self, other):
            self._detach()
            self._bridge.connect(self.sender, other.receiver)

    def set_sending(self, enabled: bool) -> None:
        """Stop or allow sending to the peer (it put us on hold with sendonly/inactive).

        Stopping detaches the leg from hold audio and from its partner; whoever
        controls it (pairing) tells it what to hear again once sending is allowed.
        """
        with self._kernel.changing(self):
            self.sender.sending = enabled
            if not enabled:
                self._detach()

    def update_remote(self, remote: Address) -> None:
        """The SDP address of a new offer or answer: a new one is sent to and learnt afresh;
        the same one (hold, resume, a refresh) keeps the latched peer."""
        self._require_usable()
        with self._kernel.changing(self):
            if self.receiver.announce(remote, self._time()):
                self.sender.remote = remote

    def play_over(self, pcm: np.ndarray, rate: int = 8000) -> None:
        """Mix a prompt (int16 at `rate`) into what this leg hears, from now until it ends.

        A partner keeps being heard under it (through a jitter buffer, since
        our clock now paces the frames); hold audio pauses while it plays.
        An empty prompt replaces any playing and ends at once (`on_prompt_end` soon after).
        """
        self._require_usable()
        if len(pcm) == 0:
            with self._kernel.changing(self):
                self.sender.stop_prompt()
                if not self.sender.paced:
                    self._pacer.discard(self)
                self._bridge.listener_changed(self.sender)
            self._loop.call_soon(self._prompt_ended, self.sender.prompts_started)
            return
        with self._kernel.changing(self):
            self.sender.play_over(pcm, rate)
            self._pacer.add(self)
            self._bridge.listener_changed(self.sender)

    def close(self) -> None:
        """Release the ports; anyone listening to this leg goes silent until told otherwise."""
        if self._closed:
            return
        self._closed = True
        self._kernel.remove(self)  # the kernel's counts come back before the leg's last report
        self._bridge.remove(self.receiver, self.sender)
        self._pacer.discard(self)
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._send_report(bye=True)
        self._loop.remove_reader(self._socket.fileno())
        self._socket.close()
        if self._rtcp is not None:
            self._rtcp.close()
        self._on_close(self)

    def stats(self) -> LegStats:
        if not self._closed:
            self._kernel.reroute(self)  # what the kernel forwarded, counted in
        receiver, reception = self.receiver, self.receiver.reception
        expected = reception.expected
        lost = max(0, reception.lost)
        peer_lost, peer_jitter = receiver.peer_report if receiver.peer_report is not None else (None, None)
        return LegStats(
            packets_in=receiver.packets_in,
            packets_in_kernel=receiver.packets_in_kernel,
            packets_out=self.sender.packets_out,
            packets_dropped=receiver.packets_dropped,
            packets_expected=expected,
            packets_lost=lost,
            loss_fraction=round(lost / expected, 4) if expected else 0.0,
            jitter_ms=round(reception.jitter_seconds * 1000, 2),
            peer_lost=peer_lost,
            peer_jitter_ms=None if peer_jitter is None else round(peer_jitter * 1000, 2),
            concealed_frames=self.sender.concealed_frames,
            srtp_suite=self._srtp.keys.suite if self._srtp is not None else None,
            srtp_auth_failures=self._srtp.auth_failures if self._srtp is not None else 0,
        )

    def _require_usable(self) -> None:
        if self._closed:
            raise MediaError("media leg is closed")
        if self.sender.remote is None:
            raise MediaError("media leg not started")

    def _detach(self) -> None:
        """Stop hearing anything (a prompt plays on over silence)."""
        self._bridge.disconnect(self.sender)
        self.sender.stop_holding()
        if not self.sender.paced:
            self._pacer.discard(self)

    def _tick(self, due: float) -> None:
        """The pacer's 20 ms tick."""
        if self.sender.tick(due):  # the prompt ended
            if not self.sender.paced:
                self._pacer.discard(self)
            self._bridge.listener_changed(self.sender)
            self._kernel.reroute(self)  # a relay the prompt kept in userspace may move to the kernel
            # Soon, not now: whoever is told may change this leg or others in the pacer's tick.
            self._loop.call_soon(self._prompt_ended, self.sender.prompts_started)

    def _prompt_ended(self, prompt: int) -> None:
        """Prompt number `prompt` ended: told unless another started since or the leg closed."""
        if prompt == self.sender.prompts_started and not self._closed and self.on_prompt_end is not None:
            self.on_prompt_end()

    # -- RTCP -------------------------------------------------------------------

    def _send_report(self, bye: bool = False) -> None:
        """An SR when we sent RTP since the last report, else an RR; BYE when closing."""
        sender, remote = self.sender, self.sender.remote
        if not bye and not self._closed:
            self._kernel.reroute(self)  # the report counts what the kernel forwarded
        if self._rtcp is not None and remote is not None:
            stream = sender.stream
            sent = stream.packets != self._packets_at_last_report
            self._packets_at_last_report = stream.packets
            counts = (stream.timestamp, stream.packets, stream.octets) if sent else None
            packet = build_report(
                stream.ssrc, self._cname, self.receiver.reception, self._time(), time.time(), counts, bye
            )
            outgoing = packet if self._srtp is None else self._srtp.protect_rtcp(packet)
            if outgoing is not None:
                self._rtcp.sendto(outgoing, self.receiver.rtcp_source or (remote[0], remote[1] + 1))
        if not bye and not self._closed:
            self._report_timer = self._loop.call_later(report_interval(), self._send_report)

    def _rtcp_received(self, data: bytes, addr: Address) -> None:
        self.receiver.receive_rtcp(data, addr, self.sender.stream.ssrc, self._time())

    # -- per packet -------------------------------------------------------------

    def _attach(self, rtp: socket.socket) -> None:
        """Take the bound, non-blocking RTP socket and start reading it."""
        self._socket = rtp
        self._recvfrom = rtp.recvfrom
        self.sender = Sender(cast(DatagramSocket, rtp))  # a sender sends only once started: never to None
        self._listeners = self._bridge.listeners(self.receiver)
        self._kernel.add(self)
        self._loop.add_reader(rtp.fileno(), self._readable)

    def _readable(self) -> None:
        """One datagram from the socket, received, relayed to each listener."""
        try:
            data, addr = self._recvfrom(RECEIVE_SIZE)
        except OSError:  # nothing after all, or an ICMP error report about something we sent
            return
        now = self._time()
        kind = self._receive(data, addr, now)
        if kind > AUDIO:
            kind = self._arrived(kind, now)
        if kind == AUDIO:  # the fast path: relayed to each listener as it is
            receiver = self.receiver
            packet, offset, end = receiver.packet, receiver.offset, receiver.end
            for listener in self._listeners:
                listener.relay(packet, offset, end, now)

    @property
    def queued(self) -> bool:
        """Whether datagrams wait in the RTP socket (for UDP, FIONREAD is the next one's size)."""
        size = array.array("i", [0])
        fcntl.ioctl(self._socket.fileno(), termios.FIONREAD, size)
        return size[0] > 0

    def read_queued(self, limit: int) -> None:
        for _ in range(limit):
            if self._closed or not self.queued:
                return
            self._readable()

    def kernel_forwarding(self, forwarding: bool) -> None:
        """While the kernel forwards this leg's stream, what reaches the socket goes through
        `_receive_beside_kernel`."""
        self._receive = self._receive_beside_kernel if forwarding else self.receiver.receive

    def _receive_beside_kernel(self, data: bytes, source: Address, now: float) -> int:
        """A packet the kernel left to the socket (another source, a telephone-event, an extended
        header, a new SSRC): the userspace path takes over before the receiver judges it."""
        self._kernel.takeover(self)
        return self.receiver.receive(data, source, now)

    def _arrived(self, kind: int, now: float) -> int:
        """What is off the fast path: a latch, decoded audio, digits. Returns AUDIO when audio
        remains to be relayed."""
        receiver = self.receiver
        if kind & LATCHED:
            self.sender.remote = receiver.peer  # symmetric RTP: answer where the peer really sends from
            self._kernel.review_soon(self)  # routes from and to this leg, once this packet is relayed
            kind -= LATCHED
        if kind == PCM:
            self._relay_pcm(now)
        elif kind == TONES:
            self._tones.add(self, receiver.codec.name, receiver.packet, receiver.offset, receiver.end, now)
        elif kind == DIGIT:
            assert receiver.digit is not None
            self._digit(receiver.digit)
        return kind

    def _relay_pcm(self, now: float) -> None:
        """Decoded audio: its digit reported, and relayed as it is unless muted or wanted as PCM."""
        receiver = self.receiver
        if receiver.digit is not None:
            self._digit(receiver.digit)
        for listener in self._listeners:
            if receiver.muted or listener.needs_pcm:
                listener.hear_pcm(receiver.packet, receiver.pcm, now)
            else:
                listener.relay(receiver.packet, receiver.offset, receiver.end, now)

    def _tones_checked(
        self, codec: str, packet: bytes, offset: int, end: int, frame_digit: str | None, now: float
    ) -> None:
        """A TONES frame back from the batch that holds a digit or comes during a key press: on as
        decoded audio."""
        pcm = g711.decode_table(codec).take(np.frombuffer(packet, dtype=np.uint8, count=end - offset, offset=offset))
        self.receiver.tones_checked(packet, offset, end, pcm, frame_digit)
        self._relay_pcm(now)

    def _digit(self, digit: str) -> None:
        if self.on_digit is not None:
            self.on_digit(digit)
