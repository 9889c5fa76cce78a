"""RTCP (RFC 3550 section 6): reception statistics, SR/RR/SDES/BYE packets and their parsing.

Sans-I/O: `ReceptionStats` is fed each received RTP packet's sequence,
timestamp and arrival time (appendix A.1 and A.8, kept simple: no probation,
a new SSRC starts over); the builders return bytes and `parse` reads a
compound packet. Nothing here knows sockets or the loop.
"""

from __future__ import annotations

import random
import secrets
import struct
from dataclasses import dataclass

SR, RR, SDES, BYE = 200, 201, 202, 203
VERSION_BITS = 0x80
MIN_INTERVAL_SECONDS = 5.0  # RFC 3550 6.2: the recommended minimum; randomised by 0.5-1.5
NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900 (NTP) to 1970 (Unix)
_SEQ_MOD = 1 << 16
_SEQ_MASK = _SEQ_MOD - 1
_MAX_DROPOUT = 3000
_MAX_MISORDER = 100
_SDES_CNAME = 1

_HEADER = struct.Struct("!BBH")
_SSRC = struct.Struct("!I")
_SENDER_INFO = struct.Struct("!IIIII")  # NTP seconds, NTP fraction, RTP timestamp, packets, octets
_REPORT_BLOCK = struct.Struct("!IIIIII")  # SSRC, fraction|cumulative, highest seq, jitter, LSR, DLSR
_RTP_SEQ_TS_SSRC = struct.Struct("!2xHII")


def report_interval() -> float:
    return MIN_INTERVAL_SECONDS * random.uniform(0.5, 1.5)


def ntp_time(unix_seconds: float) -> tuple[int, int]:
    seconds = int(unix_seconds) + NTP_EPOCH_OFFSET
    return seconds & 0xFFFFFFFF, int((unix_seconds % 1.0) * (1 << 32)) & 0xFFFFFFFF


def ntp_middle(seconds: int, fraction: int) -> int:
    """The middle 32 bits of an NTP timestamp, as LSR carries it."""
    return ((seconds & 0xFFFF) << 16) | (fraction >> 16)


class ReceptionStats:
    """What one leg received from its peer: loss by sequence numbers, interarrival jitter."""

    def __init__(self, clock_rate: int) -> None:
        self.clock_rate = clock_rate
        self.ssrc: int | None = None
        self.received = 0
        self._base = 0
        self._max = 0
        self._cycles = 0
        self._transit: float | None = None
        self._jitter = 0.0  # in timestamp units
        self._expected_prior = 0
        self._received_prior = 0
        self.last_sr = 0  # middle bits of the last SR's NTP time, and when it arrived (loop time)
        self.last_sr_at = 0.0

    def update(self, packet: bytes, arrival: float) -> None:
        """A valid RTP packet arrived at `arrival` (seconds, any monotonic clock)."""
        sequence, timestamp, ssrc = _RTP_SEQ_TS_SSRC.unpack_from(packet)
        self.arrived(sequence, timestamp, ssrc, arrival)

    def arrived(self, sequence: int, timestamp: int, ssrc: int, arrival: float) -> None:
        """`update` for a packet whose header fields the caller has read already (the per-packet path):
        a few integer and float operations, no object made."""
        if ssrc != self.ssrc:
            self.ssrc, self.received, self._cycles, self._transit, self._jitter = ssrc, 0, 0, None, 0.0
            self._base = self._max = sequence
            self._expected_prior = self._received_prior = 0
        delta = (sequence - self._max) & _SEQ_MASK
        if delta < _MAX_DROPOUT:
            if sequence < self._max:
                self._cycles += _SEQ_MOD
            self._max = sequence
        elif delta <= _SEQ_MOD - _MAX_MISORDER:  # a big jump: the peer restarted its numbering
            self._base = self._max = sequence
            self._cycles = 0
            self.received = self._expected_prior = self._received_prior = 0
        self.received += 1
        transit = arrival * self.clock_rate - timestamp
        if self._transit is not None:
            difference = abs(transit - self._transit)
            if difference < (1 << 31):  # not a timestamp wrap or a new talkspurt base
                self._jitter += (difference - self._jitter) / 16
        self._transit = transit

    @property
    def jitter_ticks(self) -> float:
        return self._jitter

    def forwarded(self, packets: int, highest: int, wraps: int, jitter_ticks: float) -> None:
        """`packets` of this SSRC were received and counted elsewhere (the kernel path), bringing the
        highest sequence number to `highest` after `wraps` wraps and the jitter to `jitter_ticks`
        (timestamp units). The next packet starts its transit time afresh (another clock took it)."""
        if packets:
            self.received += packets
            self._max = highest
            self._cycles += wraps * _SEQ_MOD
            self._jitter = jitter_ticks
            self._transit = None

    @property
    def highest_sequence(self) -> int:
        return self._max

    @property
    def extended_max(self) -> int:
        return self._cycles + self._max

    @property
    def expected(self) -> int:
        return 0 if self.ssrc is None else self.extended_max - self._base + 1

    @property
    def lost(self) -> int:
        """Cumulative packets lost (duplicates can make it negative, as RFC 3550 allows)."""
        return self.expected - self.received

    @property
    def jitter_seconds(self) -> float:
        return self._jitter / self.clock_rate

    def report_block(self, now: float) -> bytes:
        """A report block about this source; advances the interval used for the fraction lost."""
        assert self.ssrc is not None
        expected, received = self.expected, self.received
        expected_interval = expected - self._expected_prior
        lost_interval = expected_interval - (received - self._received_prior)
        self._expected_prior, self._received_prior = expected, received
        fraction = 0 if expected_interval <= 0 or lost_interval <= 0 else (lost_interval << 8) // expected_interval
        cumulative = max(-(1 << 23), min(self.lost, (1 << 23) - 1)) & 0xFFFFFF
        delay = 0 if not self.last_sr else int((now - self.last_sr_at) * 65536) & 0xFFFFFFFF
        return _REPORT_BLOCK.pack(
            self.ssrc,
            (min(fraction, 255) << 24) | cumulative,
            self.extended_max & 0xFFFFFFFF,
            int(self._jitter) & 0xFFFFFFFF,
            self.last_sr,
            delay,
        )


@dataclass(frozen=True)
class PeerReport:
    """What a peer's report block says about our stream."""

    fraction_lost: float
    cumulative_lost: int
    jitter_ticks: int


@dataclass
class ParsedRtcp:
    sender_ssrc: int | None = None
    sr_ntp_middle: int | None = None  # set when the compound held a sender report
    about_us: PeerReport | None = None
    bye: bool = False


def _packet(packet_type: int, count: int, body: bytes) -> bytes:
    return _HEADER.pack(VERSION_BITS | count, packet_type, len(body) // 4) + body


def _sdes(ssrc: int, cname: bytes) -> bytes:
    item = _SSRC.pack(ssrc) + bytes([_SDES_CNAME, len(cname)]) + cname
    item += b"\x00" * (4 - len(item) % 4)  # the item list ends with a null octet, padded to 32 bits
    return _packet(SDES, 1, item)


def new_cname() -> bytes:
    """A random canonical name per leg: RFC 7022 style, never derived from anything about a caller."""
    return secrets.token_hex(8).encode()


def build_report(
    ssrc: int,
    cname: bytes,
    reception: ReceptionStats | None,
    now: float,
    wall_time: float,
    sender: tuple[int, int, int] | None,
    bye: bool = False,
) -> bytes:
    """A compound packet: SR (when `sender` gives RTP timestamp, packets, octets) or RR, then SDES
    CNAME, then BYE if asked. `reception` adds a report block once the peer has sent something."""
    block = reception.report_block(now) if reception is not None and reception.ssrc is not None else b""
    count = 1 if block else 0
    if sender is not None:
        rtp_timestamp, packets, octets = sender
        info = _SENDER_INFO.pack(
            *ntp_time(wall_time), rtp_timestamp & 0xFFFFFFFF, packets & 0xFFFFFFFF, octets & 0xFFFFFFFF
        )
        first = _packet(SR, count, _SSRC.pack(ssrc) + info + block)
    else:
        first = _packet(RR, count, _SSRC.pack(ssrc) + block)
    compound = first + _sdes(ssrc, cname)
    if bye:
        compound += _packet(BYE, 1, _SSRC.pack(ssrc))
    return compound


def parse(data: bytes, our_ssrc: int) -> ParsedRtcp | None:
    """A compound RTCP packet, or None when malformed (RFC 3550 A.2 checks, simplified)."""
    if len(data) < 8 or data[0] >> 6 != 2 or data[1] not in (SR, RR):
        return None
    parsed = ParsedRtcp()
    offset = 0
    while offset < len(data):
        if len(data) - offset < 4:
            return None
        first, packet_type, words = _HEADER.unpack_from(data, offset)
        end = offset + 4 + 4 * words
        if first >> 6 != 2 or end > len(data):
            return None
        count = first & 0x1F
        if packet_type in (SR, RR) and end - offset >= 8:
            parsed.sender_ssrc = _SSRC.unpack_from(data, offset + 4)[0]
            blocks = offset + 8
            if packet_type == SR:
                if end - offset < 28:
                    return None
                seconds, fraction = _SENDER_INFO.unpack_from(data, offset + 8)[:2]
                parsed.sr_ntp_middle = ntp_middle(seconds, fraction)
                blocks += _SENDER_INFO.size
            for index in range(count):
                position = blocks + index * _REPORT_BLOCK.size
                if position + _REPORT_BLOCK.size > end:
                    return None
                ssrc, lost_word, _, jitter, _, _ = _REPORT_BLOCK.unpack_from(data, position)
                if ssrc == our_ssrc:
                    cumulative = lost_word & 0xFFFFFF
                    if cumulative & 0x800000:
                        cumulative -= 1 << 24
                    parsed.about_us = PeerReport((lost_word >> 24) / 256, cumulative, jitter)
        elif packet_type == BYE:
            parsed.bye = True
        offset = end
    return parsed
