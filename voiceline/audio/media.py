"""RTP media: the engine (port allocation, one shared hold-audio pacer) and one leg per call.

A leg owns one RTP socket (plus an RTCP socket whose packets are read and
discarded for now). It either hears hold audio or listens to another leg,
whose received packets it re-sends as its own stream. Everything per packet
runs inside `datagram_received`: validate, then `transport.sendto` from a
reused buffer; nothing is queued or logged.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import cast

import numpy as np

from voiceline.audio.g711 import CODECS, translation
from voiceline.audio.hold import encode_frames
from voiceline.audio.rtp import HEADER_SIZE, OutboundStream, payload_end, payload_offset

FRAME_SECONDS = 0.020
MAX_LATE_FRAMES = 3  # a pacer later than this skips ahead instead of sending a burst
MAX_PAYLOAD = 1460  # bigger than any sane G.711 packet; larger ones are dropped
_NO_PAYLOAD_TYPE = -1
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
        self._frames = {codec: encode_frames(hold_pcm, codec) for codec in CODECS}
        self._legs: set[MediaLeg] = set()
        self._start = 0.0
        self._tick = 0
        self._timer: asyncio.TimerHandle | None = None

    def frames(self, codec: str) -> list[bytes]:
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
        for leg in self._legs:
            leg._send_hold(due)
        self._tick += 1
        self._timer = self._loop.call_at(self._start + self._tick * FRAME_SECONDS, self._run)


class MediaEngine:
    """Opens media legs on even ports of a range and drives hold audio for all of them."""

    def __init__(self, bind_host: str, port_range: tuple[int, int], hold_pcm: np.ndarray) -> None:
        """`port_range` is inclusive; each leg takes an even port and the odd one above it.

        Needs a running event loop (call from within it).
        """
        if len(hold_pcm) == 0:
            raise ValueError("hold audio is empty")
        low, high = port_range
        self._bind_host = bind_host
        # Free ports in the order to try them: taken from the left, returned on the right,
        # so a just-freed port is the last to be reused.
        self._free = deque(range(low + low % 2, high, 2))
        self._loop = asyncio.get_running_loop()
        self._pacer = _HoldPacer(self._loop, hold_pcm)
        self._legs: set[MediaLeg] = set()
        self._closed = False

    @property
    def legs(self) -> int:
        """How many legs are open."""
        return len(self._legs)

    async def open_leg(self) -> MediaLeg:
        for _ in range(len(self._free)):
            if self._closed or not self._free:  # another open_leg may have taken the rest
                break
            port = self._free.popleft()
            leg = await self._bind(port)
            if leg is None:
                self._free.append(port)
                continue
            if self._closed:  # closed while we were binding
                leg.close()
                break
            self._legs.add(leg)
            return leg
        raise MediaError("no free RTP port in the configured range")

    async def _bind(self, port: int) -> MediaLeg | None:
        leg = MediaLeg(self._loop, port, self._pacer, self._release)
        try:
            await self._loop.create_datagram_endpoint(lambda: leg, local_addr=(self._bind_host, port))
        except OSError:
            return None
        try:
            rtcp, _ = await self._loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, local_addr=(self._bind_host, port + 1)
            )
        except OSError:
            leg.close()
            return None
        leg._rtcp = rtcp
        return leg

    def _release(self, leg: MediaLeg) -> None:
        if leg in self._legs:
            self._legs.discard(leg)
            self._free.append(leg.local_port)

    def close(self) -> None:
        """Close every leg and stop the pacer. Sockets close on the loop's next iteration."""
        self._closed = True
        for leg in list(self._legs):
            leg.close()
        self._pacer.stop()


class MediaLeg(asyncio.DatagramProtocol):
    """The media of one call: an RTP socket that hears hold audio or another leg.

    Call `start` once the SDP is negotiated; `hold` and `listen_to` need it.
    """

    _transport: asyncio.DatagramTransport  # set by connection_made, before open_leg returns the leg

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        port: int,
        pacer: _HoldPacer,
        on_close: Callable[[MediaLeg], None],
    ) -> None:
        self.local_port = port
        self.packets_in = 0
        self.packets_out = 0
        self.packets_dropped = 0
        self.last_received = 0.0  # loop time (monotonic) of the last valid packet
        self._loop = loop
        self._pacer = pacer
        self._on_close = on_close
        self._rtcp: asyncio.BaseTransport | None = None
        self._stream = OutboundStream()
        self._new_buffer()
        self._remote: tuple[str, int] | None = None
        self._latched = False
        self._codec = ""
        self._audio_pt = _NO_PAYLOAD_TYPE  # matches no packet until started
        self._event_pt = _NO_PAYLOAD_TYPE
        self._translate: bytes | None = None
        self._source: MediaLeg | None = None
        self._listeners: list[MediaLeg] = []
        self._holding = False
        self._hold_frames: list[bytes] = []
        self._hold_position = 0
        self._closed = False

    # -- control --------------------------------------------------------------

    def start(self, remote: tuple[str, int], codec: str, payload_type: int, telephone_event_pt: int | None) -> None:
        """Send to `remote` (the SDP address, an IP) until the first valid packet received latches
        the peer's real address; from then on packets from anywhere else are dropped."""
        if codec not in CODECS:
            raise ValueError("unsupported codec: expected PCMU or PCMA")
        if self._remote is not None:
            raise MediaError("media leg already started")
        self._remote = remote
        self._codec = codec
        self._audio_pt = payload_type
        self._event_pt = _NO_PAYLOAD_TYPE if telephone_event_pt is None else telephone_event_pt

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
        """Hear what `other` receives, transcoded when the two legs use different codecs."""
        self._require_usable()
        other._require_usable()
        if self._source is other:
            return
        self._detach()
        self._source = other
        self._translate = translation(other._codec, self._codec)
        other._listeners.append(self)
        self._stream.source_changed()

    def close(self) -> None:
        """Release the ports; anyone listening to this leg goes silent until told otherwise."""
        if self._closed:
            return
        self._closed = True
        self._detach()
        for listener in self._listeners:
            listener._source = None
        self._listeners.clear()
        self._transport.close()
        if self._rtcp is not None:
            self._rtcp.close()
        self._on_close(self)

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
            self._pacer.discard(self)
        if self._source is not None:
            self._source._listeners.remove(self)
            self._source = None

    # -- per packet -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A datagram endpoint's transport (3.11's does not subclass DatagramTransport).
        self._transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()  # a dead socket must not stay in the pacer or behind a partner

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
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
        if not self._latched:
            self._latched = True
            self._remote = addr  # symmetric RTP: answer where the peer really sends from
        elif addr != self._remote:
            self.packets_dropped += 1
            return
        now = self._loop.time()
        self.packets_in += 1
        self.last_received = now
        if payload_type == self._audio_pt:  # telephone-events are for us, never the partner
            for listener in self._listeners:
                listener._relay(data, offset, end, now)

    def _relay(self, packet: bytes, offset: int, end: int, now: float) -> None:
        size = self._stream.relay_into(self._buf, packet, offset, end, self._audio_pt, now, self._translate)
        self._send(size)

    def _send_hold(self, due: float) -> None:
        payload = self._hold_frames[self._hold_position]
        self._hold_position = (self._hold_position + 1) % len(self._hold_frames)
        self._send(self._stream.next_generated(self._buf, payload, self._audio_pt, due))

    def _send(self, size: int) -> None:
        self._transport.sendto(self._view[:size], self._remote)
        self.packets_out += 1
        # If the socket was full the packet is queued, and uvloop queues a view of our buffer,
        # not a copy: leave that buffer to the queue and write into a new one. (asyncio's and
        # uvloop's datagram transports both have get_write_buffer_size; the stubs lack it.)
        if self._transport.get_write_buffer_size():  # type: ignore[attr-defined]
            self._new_buffer()
