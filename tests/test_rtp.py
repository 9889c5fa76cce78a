import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voiceline.audio import g711
from voiceline.audio.rtp import HEADER_SIZE, OutboundStream, RtpHeader, build_packet, parse_header

FRAME = 160
PCMU, PCMA = 0, 8


def raw(first: int, second: int = PCMU, rest: bytes = b"") -> bytes:
    """A packet with a hand-made first byte (version, padding, extension, CSRC count)."""
    return struct.pack("!BBHII", first, second, 1, 2, 3) + rest


# -- parse_header ---------------------------------------------------------------


def test_parse_plain_packet():
    packet = build_packet(PCMA, 65535, 4294967295, 0xDEADBEEF, b"\x01\x02\x03", marker=True)
    assert parse_header(packet) == RtpHeader(True, PCMA, 65535, 4294967295, 0xDEADBEEF, 12, 15)


def test_parse_skips_csrcs_and_extension_and_excludes_padding():
    csrcs = b"\x00" * 8
    extension = b"\xbe\xde\x00\x02" + b"\x00" * 8
    packet = raw(0x80 | 0x20 | 0x10 | 2, rest=csrcs + extension + b"voice" + b"\x00\x00\x03")
    header = parse_header(packet)
    assert header is not None
    assert packet[header.payload_offset : header.payload_end] == b"voice"


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(b"", id="empty"),
        pytest.param(build_packet(PCMU, 1, 2, 3)[:11], id="short"),
        pytest.param(raw(0x40), id="version-1"),
        pytest.param(raw(0x00), id="version-0"),
        pytest.param(raw(0xC0), id="version-3"),
        pytest.param(raw(0x81, rest=b"\x00" * 3), id="csrc-overflow"),
        pytest.param(raw(0x90, rest=b"\xbe\xde"), id="extension-header-cut"),
        pytest.param(raw(0x90, rest=b"\xbe\xde\x00\x01"), id="extension-body-cut"),
        pytest.param(raw(0xA0, rest=b"abc\x00"), id="zero-padding"),
        pytest.param(raw(0xA0, rest=b"abc\x05"), id="padding-overflow"),
    ],
)
def test_parse_rejects_malformed(packet):
    assert parse_header(packet) is None


def test_parse_accepts_empty_payload():
    header = parse_header(build_packet(PCMU, 1, 2, 3))
    assert header is not None and header.payload_offset == header.payload_end == HEADER_SIZE


@given(st.binary(max_size=200))
def test_parse_never_raises(data):
    header = parse_header(data)
    if header is not None:
        assert HEADER_SIZE <= header.payload_offset <= header.payload_end <= len(data)


@given(st.binary(min_size=1, max_size=60).map(lambda tail: b"\x80" + tail))
def test_parse_never_raises_on_version_2_prefixes(data):
    header = parse_header(data)
    if header is not None:
        assert HEADER_SIZE <= header.payload_offset <= header.payload_end <= len(data)


# -- OutboundStream ---------------------------------------------------------------


class Leg:
    """Drives an OutboundStream the way a media leg does and records what it sent."""

    def __init__(self, stream: OutboundStream) -> None:
        self.stream = stream
        self.buf = bytearray(HEADER_SIZE + 400)
        self.sent: list[tuple[RtpHeader, bytes]] = []

    def _record(self, size: int) -> None:
        packet = bytes(self.buf[:size])
        header = parse_header(packet)
        assert header is not None
        self.sent.append((header, packet[header.payload_offset : header.payload_end]))

    def generated(self, now: float, payload: bytes = b"\xff" * FRAME, payload_type: int = PCMU) -> None:
        self._record(self.stream.next_generated(self.buf, payload, payload_type, now))

    def relay(self, packet: bytes, now: float, payload_type: int = PCMU, translate: bytes | None = None) -> None:
        header = parse_header(packet)
        assert header is not None
        size = self.stream.relay_into(
            self.buf, packet, header.payload_offset, header.payload_end, payload_type, now, translate
        )
        self._record(size)

    @property
    def last(self) -> RtpHeader:
        return self.sent[-1][0]


def partner(sequence: int, timestamp: int, payload: bytes = b"\x11" * FRAME, marker: bool = False) -> bytes:
    return build_packet(PCMU, sequence, timestamp, 0xAAAA0001, payload, marker)


def test_first_packet_uses_the_given_start_and_is_marked():
    leg = Leg(OutboundStream(ssrc=7, sequence=100, timestamp=5000))
    leg.generated(1.0)
    leg.generated(1.02)
    first, second = (header for header, _ in leg.sent)
    assert (first.sequence, first.timestamp, first.ssrc, first.marker) == (100, 5000, 7, True)
    assert (second.sequence, second.timestamp, second.marker) == (101, 5160, False)


def test_random_ssrc_differs_between_streams():
    assert len({OutboundStream().ssrc for _ in range(8)}) > 1


def test_generated_frames_skip_timestamps_when_the_pacer_skips_ticks():
    leg = Leg(OutboundStream(sequence=0, timestamp=0))
    leg.generated(10.0)
    leg.generated(10.1)  # four ticks skipped
    assert (leg.last.sequence, leg.last.timestamp) == (1, 800)


def test_continuity_across_hold_partner_a_hold_partner_b():
    # Start near both wrap points so the arithmetic is exercised modulo 2**16 and 2**32.
    leg = Leg(OutboundStream(ssrc=0x5150, sequence=65533, timestamp=2**32 - 400))
    t = 50.0
    for k in range(4):  # hold
        leg.generated(t + 0.02 * k)
    hold_end = leg.last

    # Partner A, 50 ms after the last hold frame: loses 1002, then 1005 overtakes 1004.
    leg.stream.source_changed()
    t_a = t + 0.06 + 0.05
    a_sequences = [1000, 1001, 1003, 1005, 1004]
    for i, sequence in enumerate(a_sequences):
        leg.relay(partner(sequence, 90_000 + (sequence - 1000) * FRAME), t_a + 0.02 * i)
    a_sent = [header for header, _ in leg.sent[4:]]
    assert a_sent[0].sequence == (hold_end.sequence + 1) % 2**16
    assert a_sent[0].timestamp == (hold_end.timestamp + 400) % 2**32  # 50 ms elapsed
    assert [h.marker for h in a_sent] == [True] + [False] * 4
    # The partner's own gap and reordering are preserved exactly.
    assert [(h.sequence - a_sent[0].sequence) % 2**16 for h in a_sent] == [s - 1000 for s in a_sequences]
    assert [(h.timestamp - a_sent[0].timestamp) % 2**32 for h in a_sent] == [
        (s - 1000) * FRAME for s in a_sequences
    ]
    newest_a = a_sent[3]  # 1005: the late 1004 after it does not move the stream back

    # Back on hold 50 ms after A's newest packet.
    leg.stream.source_changed()
    t_hold = t_a + 0.02 * 3 + 0.05
    leg.generated(t_hold)
    assert leg.last.sequence == (newest_a.sequence + 1) % 2**16
    assert leg.last.timestamp == (newest_a.timestamp + 400) % 2**32
    assert leg.last.marker
    hold_again = leg.last

    # Partner B 5 ms later (less than a frame: it must not overlap the last frame),
    # speaking PCMA into our PCMU leg, with a marker of its own on its third packet.
    leg.stream.source_changed()
    payload = bytes(range(FRAME))
    for i in range(3):
        b_packet = build_packet(PCMA, 40_000 + i, 7 + i * FRAME, 0xBBBB0002, payload, marker=i == 2)
        leg.relay(b_packet, t_hold + 0.005 + i * 0.02, translate=g711.ALAW_TO_ULAW)
    b_sent = leg.sent[-3:]
    assert [h.sequence for h, _ in b_sent] == [(hold_again.sequence + 1 + i) % 2**16 for i in range(3)]
    assert [h.timestamp for h, _ in b_sent] == [(hold_again.timestamp + FRAME * (1 + i)) % 2**32 for i in range(3)]
    assert [h.marker for h, _ in b_sent] == [True, False, True]
    assert all(h.payload_type == PCMU for h, _ in b_sent)
    assert all(body == payload.translate(g711.ALAW_TO_ULAW) for _, body in b_sent)

    assert {h.ssrc for h, _ in leg.sent} == {0x5150}
    wrapped = [h.sequence for h, _ in leg.sent]
    assert 65535 in wrapped and 0 in wrapped


def test_relay_rewrites_the_header_to_a_plain_fixed_header():
    leg = Leg(OutboundStream(ssrc=99))
    csrc_and_extension = b"\x00\x00\x00\x01" + b"\xbe\xde\x00\x01" + b"\x00" * 4
    packet = struct.pack("!BBHII", 0x80 | 0x20 | 0x10 | 1, 96, 5, 6, 7) + csrc_and_extension + b"abc" + b"\x02\x02"
    leg.relay(packet, 1.0, payload_type=PCMA)
    header, body = leg.sent[0]
    assert leg.buf[0] == 0x80  # version 2, no padding, extension or CSRCs
    assert (header.payload_type, header.ssrc, body) == (PCMA, 99, b"abc")


def test_reused_buffer_is_not_resized():
    leg = Leg(OutboundStream())
    size = len(leg.buf)
    leg.generated(1.0, payload=b"\xff" * 320)
    leg.relay(partner(1, 1, b"\x01" * 80), 1.05)
    assert len(leg.buf) == size
    assert leg.sent[-1][1] == b"\x01" * 80
