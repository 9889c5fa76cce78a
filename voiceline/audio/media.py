"""RTP media: the engine (port allocation, one shared hold-audio pacer) and one leg per call.

A leg owns one RTP socket and an RTCP socket (RFC 3550 reports every ~5 s,
BYE on close, the peer's reports read for `stats`). It either hears hold
audio or listens to another leg, whose received packets it re-sends as its
own stream (relayed, or transcoded through PCM), optionally with a prompt
mixed over it. Everything per packet
runs inside `datagram_received`: validate, then `transport.sendto` from a
reused buffer; nothing is queued or logged. An SRTP leg (see srtp.py)
unprotects what it receives first and protects what it sends last, so the
relay in between only ever sees plain RTP: an SRTP leg and a plain one relay
to each other, each with its own keys.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np

from voiceline.audio.codecs import Coder, Resampler, new_coder, translation
from voiceline.audio.dtmf import TelephoneEventReceiver, ToneDetector
from voiceline.audio.hold import encode_frames
from voiceline.audio.latch import Heard, Learning, SourceFilter
from voiceline.audio.mixing import JitterBuffer, Prompt
from voiceline.audio.rtcp import ReceptionStats, build_report, new_cname, parse, report_interval
from voiceline.audio.rtp import HEADER_SIZE, MARKER, OutboundStream, build_packet, payload_end, payload_offset
from voiceline.audio.srtp import SrtpContext, SrtpKeys
from voiceline.codec_table import PCMU, Codec

FRAME_SECONDS = 0.020
MAX_LATE_FRAMES = 3  # a pacer later than this skips ahead instead of sending a burst
MAX_PAYLOAD = 1460  # bigger than any sane audio packet; larger ones are dropped
PORT_REST_SECONDS = 30.0  # a freed port waits this long (late packets of its last call) unless none other is free
_NO_PAYLOAD_TYPE = -1
_TS_MASK = 0xFFFFFFFF
_SECOND_SEQ_TS = struct.Struct("!xBHI")
_SEQ_SSRC = struct.Struct("!2xH4xI")
_EVENT_TIMESTAMP = struct.Struct("!4xI")
_PLAIN_FIRST_BYTE = 0x80  # version 2, no padding, no extension, no CSRC
_MAX_PLAIN_PACKET = HEADER_SIZE + MAX_PAYLOAD


class MediaError(Exception):
    """Media could not be set up; the message is fixed and safe to log."""


class _HoldPacer:
    """Sends the next hold frame to every holding leg every 20 ms, from one timer.

    Ticks fall on a fixed grid (start + n * 20 ms), so lateness never accumulates.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, hold_pcm: np.ndarray) -> None:
        self._loop = loop
        self._hold_pcm = hold_pcm
        self._frames: dict[Codec, list[bytes]] = {}
        self._legs: set[MediaLeg] = set()
        self._start = 0.0
        self._tick = 0
        self._timer: asyncio.TimerHandle | None = None

    def frames(self, codec: Codec) -> list[bytes]:
        """The hold pattern in `codec`, encoded the first time a leg in that codec holds."""
        if codec not in self._frames:
            self._frames[codec] = encode_frames(self._hold_pcm, codec)
        return self._frames[codec]

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
    ) -> None:
        """`port_range` is inclusive; each leg takes an even port and the odd one above it.
        `inband_dtmf`: look for DTMF tones in the audio of legs without telephone-event.
        `learning`: how a source other than the SDP's or the signalling's host proves itself.

        Needs a running event loop (call from within it).
        """
        if len(hold_pcm) == 0:
            raise ValueError("hold audio is empty")
        low, high = port_range
        self._bind_host = bind_host
        self._inband_dtmf = inband_dtmf
        self._learning = learning
        # Ports are drawn at random from `_free`, so nobody can guess the next call's port and
        # spray it; a freed port rests (oldest first) before it is drawn again.
        self._free = list(range(low + low % 2, high, 2))
        self._resting: deque[tuple[float, int]] = deque()  # (freed at, port)
        self._loop = asyncio.get_running_loop()
        self._pacer = _HoldPacer(self._loop, hold_pcm)
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

    async def _bind(self, port: int) -> MediaLeg | None:
        leg = MediaLeg(
            self._loop, port, self._pacer, self._release, inband_dtmf=self._inband_dtmf, learning=self._learning
        )
        try:
            await self._loop.create_datagram_endpoint(lambda: leg, local_addr=(self._bind_host, port))
        except OSError:
            return None
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
        """Close every leg and stop the pacer. Sockets close on the loop's next iteration."""
        self._closed = True
        for leg in list(self._legs):
            leg.close()
        self._pacer.stop()


@dataclass(frozen=True)
class LegStats:
    """Anonymous figures of one leg: what it received, sent, and what its peer reported."""

    packets_in: int
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


class MediaLeg(asyncio.DatagramProtocol):
    """The media of one call: an RTP socket that hears hold audio or another leg.

    Call `start` once the SDP is negotiated; `hold` and `listen_to` need it.
    Digits the caller presses (RFC 4733 events, or in-band tones when the SDP
    has no telephone-event) go to `on_digit`; neither reaches the partner.
    """

    _transport: asyncio.DatagramTransport  # set by connection_made, before open_leg returns the leg

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        port: int,
        pacer: _HoldPacer,
        on_close: Callable[[MediaLeg], None],
        *,
        inband_dtmf: bool = True,
        learning: Learning = Learning(),
    ) -> None:
        self.local_port = port
        self.packets_in = 0
        self.packets_out = 0
        self.packets_dropped = 0
        self.octets_out = 0
        self.last_received = 0.0  # loop time (monotonic) of the last valid packet
        self.sending = True  # False while the peer holds us (set_sending)
        self.on_digit: Callable[[str], None] | None = None
        self._loop = loop
        self._pacer = pacer
        self._on_close = on_close
        self._rtcp: asyncio.DatagramTransport | None = None
        self._rtcp_remote: tuple[str, int] | None = None  # where the peer's RTCP came from (the peer's host)
        self._reception = ReceptionStats(8000)  # replaced by start
        self._peer_report: tuple[int, float] | None = None  # (cumulative lost, jitter seconds)
        self._cname = new_cname()
        self._srtp: SrtpContext | None = None  # set by start for an SRTP stream
        self._report_timer: asyncio.TimerHandle | None = None
        self._packets_at_last_report = 0
        self._concealed_before = 0
        self._stream = OutboundStream()
        self._new_buffer()
        self._remote: tuple[str, int] | None = None  # where we send: the peer, else the SDP address
        self._peer: tuple[str, int] | None = None  # the latched source; packets from it pass at once
        self._learning = learning
        self._sources: SourceFilter | None = None  # the latch rules, from start
        self._codec = PCMU  # replaced by start
        self._coder: Coder | None = None
        self._audio_pt = _NO_PAYLOAD_TYPE  # matches no packet until started
        self._event_pt = _NO_PAYLOAD_TYPE
        self._events = TelephoneEventReceiver()
        self._inband_dtmf = inband_dtmf
        self._tones: ToneDetector | None = None
        # True when received audio must be decoded: in-band DTMF, or a listener that needs PCM.
        self._decoding = False
        self._translate: bytes | None = None
        self._transcodes = False  # from our source's codec to ours only through PCM
        self._resampler: Resampler | None = None
        self._reframed: np.ndarray | None = None  # samples waiting for a whole frame (see _send_reframed)
        self._source: MediaLeg | None = None
        self._listeners: list[MediaLeg] = []
        self._holding = False
        self._hold_frames: list[bytes] = []
        self._hold_position = 0
        self._prompt: Prompt | None = None
        self._jitter: JitterBuffer | None = None
        self._closed = False

    # -- control --------------------------------------------------------------

    def start(
        self,
        remote: tuple[str, int],
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
        spec = codec
        if self._remote is not None:
            raise MediaError("media leg already started")
        if srtp is not None:
            self._srtp = SrtpContext(srtp)
        self._remote = remote
        self._sources = SourceFilter(remote, signalling_host, self._loop.time(), self._learning)
        self._codec = spec
        self._stream = OutboundStream(spec.clock_rate)
        self._reception = ReceptionStats(spec.clock_rate)
        self._report_timer = self._loop.call_later(report_interval(), self._send_report)
        self._audio_pt = payload_type
        if telephone_event_pt is not None:
            self._event_pt = telephone_event_pt
        elif self._inband_dtmf:
            self._tones = ToneDetector(spec.rate)
        self._update_decoding()

    def rekey(self, srtp: SrtpKeys) -> None:
        """New SRTP keys from a re-offer (a direction whose key is unchanged carries on as it was)."""
        if self._srtp is None:
            raise MediaError("media leg is not SRTP")
        self._srtp.rekey(srtp)

    @property
    def codec(self) -> Codec:
        return self._codec

    def hold(self) -> None:
        """Hear hold audio, from the start of the pattern."""
        self._require_usable()
        if self._holding:
            return
        self._detach()
        self._holding = True
        self._hold_frames = self._pacer.frames(self._codec)
        self._hold_position = 0
        self._stream.source_changed()
        self._pacer.add(self)

    def listen_to(self, other: MediaLeg) -> None:
        """Hear what `other` receives: relayed as is for the same codec, else transcoded."""
        self._require_usable()
        other._require_usable()
        if self._source is other:
            return
        self._detach()
        self._source = other
        try:
            self._translate, self._transcodes = translation(other._codec, self._codec), False
        except ValueError:
            self._translate, self._transcodes = None, True
        self._resampler = Resampler(other._codec.rate, self._codec.rate)
        self._reframed = None
        other._listeners.append(self)
        other._update_decoding()
        self._stream.source_changed()

    def set_sending(self, enabled: bool) -> None:
        """Stop or allow sending to the peer (it put us on hold with sendonly/inactive).

        Stopping detaches the leg from hold audio and from its partner; whoever
        controls it (pairing) tells it what to hear again once sending is allowed.
        """
        self.sending = enabled
        if not enabled:
            self._detach()

    def update_remote(self, remote: tuple[str, int]) -> None:
        """The SDP address of a new offer or answer: a new one is sent to and learnt afresh;
        the same one (hold, resume, a refresh) keeps the latched peer."""
        self._require_usable()
        assert self._sources is not None  # set with _remote
        if remote == self._sources.announced:
            return
        self._sources.restart(remote, self._loop.time())
        self._remote = remote
        self._peer = self._rtcp_remote = None

    def play_over(self, pcm: np.ndarray, rate: int = 8000) -> None:
        """Mix a prompt (int16 at `rate`) into what this leg hears, from now until it ends.

        A partner keeps being heard under it (through a jitter buffer, since
        our clock now paces the frames); hold audio pauses while it plays.
        """
        self._require_usable()
        if len(pcm) == 0:
            return
        samples = Resampler(rate, self._codec.rate).process(np.asarray(pcm, dtype=np.int16))
        self._prompt = Prompt(samples, self._codec.frame_samples)
        if self._jitter is None:  # a prompt replacing another keeps the partner's buffered audio
            self._jitter = JitterBuffer(self._codec.frame_samples)
        self._stream.source_changed()
        self._pacer.add(self)
        if self._source is not None:
            self._source._update_decoding()

    def close(self) -> None:
        """Release the ports; anyone listening to this leg goes silent until told otherwise."""
        if self._closed:
            return
        self._closed = True
        self._detach()
        self._end_prompt()
        for listener in self._listeners:
            listener._source = None
        self._listeners.clear()
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._send_report(bye=True)
        self._transport.close()
        if self._rtcp is not None:
            self._rtcp.close()
        self._on_close(self)

    def stats(self) -> LegStats:
        expected = self._reception.expected
        lost = max(0, self._reception.lost)
        peer_lost, peer_jitter = self._peer_report if self._peer_report is not None else (None, None)
        concealed = self._concealed_before + (self._jitter.concealed_frames if self._jitter is not None else 0)
        return LegStats(
            packets_in=self.packets_in,
            packets_out=self.packets_out,
            packets_dropped=self.packets_dropped,
            packets_expected=expected,
            packets_lost=lost,
            loss_fraction=round(lost / expected, 4) if expected else 0.0,
            jitter_ms=round(self._reception.jitter_seconds * 1000, 2),
            peer_lost=peer_lost,
            peer_jitter_ms=None if peer_jitter is None else round(peer_jitter * 1000, 2),
            concealed_frames=concealed,
            srtp_suite=self._srtp.keys.suite if self._srtp is not None else None,
            srtp_auth_failures=self._srtp.auth_failures if self._srtp is not None else 0,
        )

    # -- RTCP -------------------------------------------------------------------

    def _send_report(self, bye: bool = False) -> None:
        """An SR when we sent RTP since the last report, else an RR; BYE when closing."""
        if self._rtcp is not None and self._remote is not None:
            sent = self.packets_out != self._packets_at_last_report
            self._packets_at_last_report = self.packets_out
            sender = (self._stream.timestamp, self.packets_out, self.octets_out) if sent else None
            packet = build_report(
                self._stream.ssrc, self._cname, self._reception, self._loop.time(), time.time(), sender, bye
            )
            outgoing = packet if self._srtp is None else self._srtp.protect_rtcp(packet)
            if outgoing is not None:
                self._rtcp.sendto(outgoing, self._rtcp_remote or (self._remote[0], self._remote[1] + 1))
        if not bye and not self._closed:
            self._report_timer = self._loop.call_later(report_interval(), self._send_report)

    def _rtcp_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._peer is None or addr[0] != self._peer[0]:
            return  # only the latched RTP peer's host may report
        if self._srtp is not None:
            plain = self._srtp.unprotect_rtcp(data)
            if plain is None:
                return
            data = plain
        parsed = parse(data, self._stream.ssrc)
        if parsed is None:
            return
        self._rtcp_remote = addr
        if parsed.about_us is not None:
            self._peer_report = (parsed.about_us.cumulative_lost, parsed.about_us.jitter_ticks / self._codec.clock_rate)
        if parsed.sr_ntp_middle is not None:
            self._reception.last_sr = parsed.sr_ntp_middle
            self._reception.last_sr_at = self._loop.time()

    def _new_buffer(self) -> None:
        self._buf = bytearray(HEADER_SIZE + MAX_PAYLOAD)
        self._view = memoryview(self._buf)  # never resized from here on: slices of it are sent

    def _require_usable(self) -> None:
        if self._closed:
            raise MediaError("media leg is closed")
        if self._remote is None:
            raise MediaError("media leg not started")

    def _detach(self) -> None:
        """Stop hearing anything."""
        if self._holding:
            self._holding = False
            if self._prompt is None:
                self._pacer.discard(self)
        if self._source is not None:
            self._source._listeners.remove(self)
            self._source._update_decoding()
            self._source = None

    def _end_prompt(self) -> None:
        if self._prompt is None:
            return
        assert self._jitter is not None
        self._concealed_before += self._jitter.concealed_frames
        self._prompt = self._jitter = None
        if not self._holding:
            self._pacer.discard(self)
        if self._source is not None:
            self._source._update_decoding()
        self._stream.source_changed()

    def _update_decoding(self) -> None:
        self._decoding = self._tones is not None or any(
            listener._transcodes or listener._prompt is not None for listener in self._listeners
        )

    def _own_coder(self) -> Coder:
        if self._coder is None:
            self._coder = new_coder(self._codec)
        return self._coder

    def _admit(self, data: bytes, addr: tuple[str, int]) -> bool:
        """A packet from anywhere but the latched peer: the source filter decides whether it
        latches (or moves) the peer, else it is dropped as injection."""
        assert self._sources is not None  # before start no payload type matches
        sequence, ssrc = _SEQ_SSRC.unpack_from(data)
        heard = Heard(self._reception.ssrc, self._reception.highest_sequence, self.last_received)
        if not self._sources.admit(addr, ssrc, sequence, self._loop.time(), heard):
            return False
        self._peer = self._remote = addr  # symmetric RTP: answer where the peer really sends from
        self._rtcp_remote = None
        return True

    # -- per packet -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A datagram endpoint's transport (3.11's does not subclass DatagramTransport).
        self._transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()  # a dead socket must not stay in the pacer or behind a partner

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._srtp is not None:
            plain = self._srtp.unprotect(data)
            if plain is None:  # forged, corrupted or replayed: never reaches the latch or a listener
                self.packets_dropped += 1
                return
            data = plain
        size = len(data)
        if HEADER_SIZE <= size <= _MAX_PLAIN_PACKET and data[0] == _PLAIN_FIRST_BYTE:
            offset, end = HEADER_SIZE, size  # nearly every packet: a plain header, nothing to parse
        else:
            offset = payload_offset(data)
            if offset < 0 or size - offset > MAX_PAYLOAD:
                self.packets_dropped += 1
                return
            end = payload_end(data)
        payload_type = data[1] & 0x7F
        if payload_type != self._audio_pt and payload_type != self._event_pt:
            self.packets_dropped += 1
            return
        if addr != self._peer and not self._admit(data, addr):
            self.packets_dropped += 1
            return
        now = self._loop.time()
        self.packets_in += 1
        self.last_received = now
        self._reception.update(data, now)
        if payload_type == self._audio_pt:
            if self._decoding:
                self._receive_pcm(data, offset, end, now)
            else:
                for listener in self._listeners:
                    listener._relay(data, offset, end, now)
        else:  # telephone-events are for us, never the partner
            self._receive_event(data, offset)

    def _receive_event(self, data: bytes, offset: int) -> None:
        digit = self._events.feed(data[offset : offset + 4], _EVENT_TIMESTAMP.unpack_from(data)[0])
        if digit is not None and self.on_digit is not None:
            self.on_digit(digit)

    def _receive_pcm(self, data: bytes, offset: int, end: int, now: float) -> None:
        """The slow path: decode, look for in-band DTMF (muting it), then relay or hand PCM on."""
        pcm = self._own_coder().decode(data[offset:end])
        muted = False
        if self._tones is not None:
            digit, muted = self._tones.feed(pcm)
            if muted:
                pcm = np.zeros_like(pcm)
            if digit is not None and self.on_digit is not None:
                self.on_digit(digit)
        for listener in self._listeners:
            if muted or listener._transcodes or listener._prompt is not None:
                listener._hear_pcm(data, pcm, self._codec, now)
            else:
                listener._relay(data, offset, end, now)

    def _hear_pcm(self, packet: bytes, pcm: np.ndarray, codec: Codec, now: float) -> None:
        """Our source's audio as PCM: into the jitter buffer under a prompt, else encoded in our
        codec and sent with the packet's own sequence and timestamp (in our clock), or re-framed
        into 20 ms frames when our codec cannot take the packet's duration (Opus and 30 ms)."""
        assert self._resampler is not None  # set with the source
        pcm = self._resampler.process(pcm)
        if self._jitter is not None:
            self._jitter.push(pcm)
            return
        coder = self._own_coder()
        if not coder.accepts(len(pcm)) or self._reframed is not None:
            self._send_reframed(pcm, coder, now)
            return
        second, sequence, timestamp = _SECOND_SEQ_TS.unpack_from(packet)
        timestamp = timestamp * self._codec.clock_rate // codec.clock_rate & _TS_MASK
        ours = build_packet(0, sequence, timestamp, 0, coder.encode(pcm), bool(second & MARKER))
        self._send(self._stream.relay_into(self._buf, ours, HEADER_SIZE, len(ours), self._audio_pt, now))

    def _send_reframed(self, pcm: np.ndarray, coder: Coder, now: float) -> None:
        """Whole 20 ms frames out of whatever durations arrive, paced by arrival (the rare path:
        a source whose packet duration our codec cannot encode). Leaves it when durations fit."""
        if self._reframed is None:
            self._reframed = np.zeros(0, dtype=np.int16)
            self._stream.source_changed()
        pending = np.concatenate((self._reframed, pcm))
        size = self._codec.frame_samples
        for first in range(0, len(pending) - size + 1, size):
            payload = coder.encode(pending[first : first + size])
            self._send(self._stream.next_generated(self._buf, payload, self._audio_pt, now))
        pending = pending[len(pending) - len(pending) % size :]
        if len(pending) == 0 and coder.accepts(len(pcm)):
            self._reframed = None  # back to one packet per packet, with the source's numbering
            self._stream.source_changed()
        else:
            self._reframed = pending

    def _relay(self, packet: bytes, offset: int, end: int, now: float) -> None:
        size = self._stream.relay_into(self._buf, packet, offset, end, self._audio_pt, now, self._translate)
        self._send(size)

    def _tick(self, due: float) -> None:
        """The pacer's 20 ms tick: the next mixed frame under a prompt, else the next hold frame."""
        if self._prompt is None:
            payload = self._hold_frames[self._hold_position]
            self._hold_position = (self._hold_position + 1) % len(self._hold_frames)
            self._send(self._stream.next_generated(self._buf, payload, self._audio_pt, due))
            return
        assert self._jitter is not None
        under = self._jitter.pop() if self._source is not None else np.zeros(self._codec.frame_samples, np.int16)
        mixed = self._prompt.mix(under)
        if self.sending:  # else the peer holds us: the prompt runs on, unheard
            payload = self._own_coder().encode(mixed)
            self._send(self._stream.next_generated(self._buf, payload, self._audio_pt, due))
        if self._prompt.done:
            self._end_prompt()  # after sending: the next packet, from the partner or hold, is marked

    def _send(self, size: int) -> None:
        if self._srtp is None:
            self._transport.sendto(self._view[:size], self._remote)
        else:
            packet = self._srtp.protect(bytes(self._view[:size]))  # a new object: the buffer stays ours
            if packet is None:
                return
            self._transport.sendto(packet, self._remote)
        self.packets_out += 1
        self.octets_out += size - HEADER_SIZE
        # If the socket was full the packet is queued, and uvloop queues a view of our buffer,
        # not a copy: leave that buffer to the queue and write into a new one. (asyncio's and
        # uvloop's datagram transports both have get_write_buffer_size; the stubs lack it.)
        if self._transport.get_write_buffer_size():  # type: ignore[attr-defined]
            self._new_buffer()
