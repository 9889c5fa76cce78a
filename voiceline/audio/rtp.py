"""RTP (RFC 3550) header access and the outbound stream of one call leg.

Everything here runs per packet, so it works on the raw bytes with
precompiled `struct` formats and writes into caller-owned, reused buffers.
"""

from __future__ import annotations

import secrets
import struct
from typing import NamedTuple

VERSION = 2
HEADER_SIZE = 12
MAX_PAYLOAD = 1460  # bigger than any sane audio packet; a leg drops larger ones
MARKER = 0x80
CLOCK_RATE = 8000

_FIRST_BYTE = VERSION << 6  # what we send: no padding, no extension, no CSRC
_PADDING = 0x20
_EXTENSION = 0x10
_CSRC_COUNT = 0x0F
_SEQ_MASK = 0xFFFF
_TS_MASK = 0xFFFFFFFF
_HALF_SEQ = 0x8000

_FIXED = struct.Struct("!BBHII")
_SECOND_SEQ_TS = struct.Struct("!xBHI")
_EXTENSION_WORDS = struct.Struct("!H")


class RtpHeader(NamedTuple):
    """The fixed header of a validated packet, and where its payload lies."""

    marker: bool
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload_offset: int
    payload_end: int


def payload_offset(data: bytes) -> int:
    """Where the payload starts, or -1 unless `data` is a well-formed RTP version 2 packet.

    Well-formed: at least the fixed header, and the CSRC list, header extension
    and padding it announces all fit in the datagram.
    """
    size = len(data)
    if size < HEADER_SIZE:
        return -1
    first = data[0]
    if first >> 6 != VERSION:
        return -1
    offset = HEADER_SIZE + 4 * (first & _CSRC_COUNT)
    if first & _EXTENSION:
        if offset + 4 > size:
            return -1
        offset += 4 + 4 * _EXTENSION_WORDS.unpack_from(data, offset + 2)[0]
    if first & _PADDING:
        padding = data[-1]  # the count includes itself, so 0 is malformed
        if padding == 0:
            return -1
        size -= padding
    return offset if offset <= size else -1


def payload_end(data: bytes) -> int:
    """Where the payload ends (before any padding). Only for packets `payload_offset` accepted."""
    return len(data) - data[-1] if data[0] & _PADDING else len(data)


def parse_header(data: bytes) -> RtpHeader | None:
    offset = payload_offset(data)
    if offset < 0:
        return None
    _, second, sequence, timestamp, ssrc = _FIXED.unpack_from(data)
    return RtpHeader(bool(second & MARKER), second & 0x7F, sequence, timestamp, ssrc, offset, payload_end(data))


def build_packet(
    payload_type: int, sequence: int, timestamp: int, ssrc: int, payload: bytes = b"", marker: bool = False
) -> bytes:
    """A minimal RTP packet (no CSRC, extension or padding), e.g. for a simulated phone."""
    second = payload_type | MARKER if marker else payload_type
    return _FIXED.pack(_FIRST_BYTE, second, sequence, timestamp, ssrc) + payload


class StreamPosition(NamedTuple):
    """Where a stream's relaying stands: what another relay (the kernel path) continues from."""

    changed: bool  # the next packet starts a new source
    sent_at: float | None  # when the newest packet went out (the `now` it was sent with)
    sequence: int  # the newest packet sent
    timestamp: int
    sequence_shift: int  # the current source's offsets (fixed by its first packet)
    timestamp_shift: int


class OutboundStream:
    """What one leg sends: one SSRC for life, sequence and timestamp continuous across sources.

    Sources are locally generated frames (hold audio) or a partner's relayed
    packets. A relayed packet keeps the partner's own spacing: its sequence and
    timestamp are shifted by offsets fixed at the first packet after a change
    of source, so the partner's gaps and reordering pass through unchanged.
    Buffers passed in must hold HEADER_SIZE + the payload.
    """

    def __init__(
        self,
        clock_rate: int = CLOCK_RATE,
        *,
        ssrc: int | None = None,
        sequence: int | None = None,
        timestamp: int | None = None,
    ) -> None:
        """`ssrc`, `sequence` and `timestamp` (of the first packet) are random unless given."""
        self.ssrc = secrets.randbits(32) if ssrc is None else ssrc
        self._clock_rate = clock_rate
        self._frame_samples = clock_rate // 50  # 20 ms
        # The newest packet sent, seeded as if one frame went out just before the first.
        self._sequence = ((secrets.randbits(16) if sequence is None else sequence) - 1) & _SEQ_MASK
        first_timestamp = secrets.randbits(32) if timestamp is None else timestamp
        self._timestamp = (first_timestamp - self._frame_samples) & _TS_MASK
        self._sent_at: float | None = None
        self._changed = True  # the first packet of the stream is marked too
        self._sequence_shift = 0
        self._timestamp_shift = 0
        self.packets = 0  # written so far (RTCP's sender packet count)
        self.octets = 0  # of payload

    @property
    def timestamp(self) -> int:
        """The RTP timestamp of the newest packet sent (for RTCP sender reports)."""
        return self._timestamp

    def source_changed(self) -> None:
        """The next packet comes from a new source: continue from our last one and set the marker."""
        self._changed = True

    def position(self) -> StreamPosition:
        return StreamPosition(
            self._changed, self._sent_at, self._sequence, self._timestamp, self._sequence_shift, self._timestamp_shift
        )

    def resume(self, position: StreamPosition, packets: int, octets: int) -> None:
        """Continue from where another relay left the stream, after it sent `packets` more."""
        (self._changed, self._sent_at, self._sequence, self._timestamp, self._sequence_shift, self._timestamp_shift) = (
            position
        )
        self.packets += packets
        self.octets += octets

    def _advance(self, now: float) -> int:
        """Samples from the newest packet sent to one sent at `now`: the time elapsed, but at least
        one frame so a new source never overlaps the playout of the previous one."""
        if self._sent_at is None:
            return self._frame_samples
        return max(self._frame_samples, round((now - self._sent_at) * self._clock_rate))

    def next_generated(self, buf: bytearray, payload: bytes, payload_type: int, now: float) -> int:
        """Write a locally generated frame into `buf`; return the packet length.

        `now` is the frame's scheduled time, so a steady pacer yields exact
        one-frame timestamp steps and a skipped tick shows as a timestamp gap.
        """
        sequence = (self._sequence + 1) & _SEQ_MASK
        timestamp = (self._timestamp + self._advance(now)) & _TS_MASK
        second = payload_type | MARKER if self._changed else payload_type
        self._changed = False
        self._sequence, self._timestamp, self._sent_at = sequence, timestamp, now
        _FIXED.pack_into(buf, 0, _FIRST_BYTE, second, sequence, timestamp, self.ssrc)
        size = HEADER_SIZE + len(payload)
        buf[HEADER_SIZE:size] = payload
        self.packets += 1
        self.octets += len(payload)
        return size

    def relay_into(
        self,
        buf: bytearray,
        packet: bytes,
        offset: int,
        end: int,
        payload_type: int,
        now: float,
        translate: bytes | None = None,
    ) -> int:
        """Write a partner's packet, whose payload is `packet[offset:end]`, into `buf` as ours;
        return the packet length.

        The header becomes a plain fixed header (the partner's CSRCs,
        extension and padding are not passed on) with our SSRC and
        `payload_type`; the payload goes through `translate` when given.
        """
        second, sequence, timestamp = _SECOND_SEQ_TS.unpack_from(packet)
        marker = second & MARKER
        if self._changed:
            self._changed = False
            marker = MARKER
            self._sequence_shift = (self._sequence + 1 - sequence) & _SEQ_MASK
            self._timestamp_shift = (self._timestamp + self._advance(now) - timestamp) & _TS_MASK
        sequence = (sequence + self._sequence_shift) & _SEQ_MASK
        timestamp = (timestamp + self._timestamp_shift) & _TS_MASK
        if (sequence - self._sequence) & _SEQ_MASK < _HALF_SEQ:  # newest yet: a later change continues from it
            self._sequence, self._timestamp, self._sent_at = sequence, timestamp, now
        _FIXED.pack_into(buf, 0, _FIRST_BYTE, marker | payload_type, sequence, timestamp, self.ssrc)
        size = HEADER_SIZE + end - offset
        if translate is None:
            buf[HEADER_SIZE:size] = packet[offset:end]
        else:
            buf[HEADER_SIZE:size] = packet[offset:end].translate(translate)
        self.packets += 1
        self.octets += end - offset
        return size
