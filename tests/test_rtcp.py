"""RTCP: reception statistics, compound reports and parsing (sans-I/O)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from voiceline.audio.rtcp import BYE, RR, SR, ReceptionStats, build_report, ntp_middle, ntp_time, parse
from voiceline.audio.rtp import build_packet

THEM, US = 0x1111, 0x2222


def feed(stats: ReceptionStats, sequences: list[int], jitter: float = 0.0) -> None:
    for index, sequence in enumerate(sequences):
        arrival = index * 0.02 + (jitter if index % 2 else 0.0)
        stats.update(build_packet(0, sequence % 65536, (sequence * 160) % 2**32, THEM), arrival)


def test_loss_counts_gaps_across_a_sequence_wrap() -> None:
    stats = ReceptionStats(8000)
    sequences = [s for s in range(65500, 65600) if s not in (65510, 65535, 65536, 65590)]
    feed(stats, sequences)
    assert (stats.expected, stats.received, stats.lost) == (100, 96, 4)
    assert stats.extended_max == 65599


def test_reordering_and_duplicates_do_not_count_as_loss() -> None:
    stats = ReceptionStats(8000)
    feed(stats, [1, 2, 4, 3, 5, 5, 6])
    assert stats.expected == 6 and stats.lost == -1  # a duplicate, as RFC 3550 counts it


def test_jitter_is_zero_for_steady_packets_and_tracks_alternating_delay() -> None:
    steady = ReceptionStats(8000)
    feed(steady, list(range(200)))
    assert steady.jitter_seconds < 1e-9
    shaky = ReceptionStats(8000)
    feed(shaky, list(range(400)), jitter=0.005)  # every other packet 5 ms late
    assert 0.0045 < shaky.jitter_seconds < 0.0055


def test_a_new_ssrc_starts_over() -> None:
    stats = ReceptionStats(8000)
    feed(stats, [10, 12])
    stats.update(build_packet(0, 500, 0, 0x9999), 1.0)
    assert (stats.ssrc, stats.expected, stats.lost) == (0x9999, 1, 0)


def test_sender_report_round_trip_with_a_block_sdes_and_bye() -> None:
    stats = ReceptionStats(8000)
    feed(stats, [s for s in range(1, 101) if s % 10 or s == 100])  # 10, 20 ... 90 lost: 9 of 100
    stats.last_sr, stats.last_sr_at = 0x12345678, 1.0
    packet = build_report(US, b"abc", stats, 1.5, 1700000000.25, (160000, 99, 15840), bye=True)
    assert packet[1] == SR and BYE in packet
    parsed = parse(packet, THEM)
    assert parsed is not None and parsed.sender_ssrc == US and parsed.bye
    assert parsed.sr_ntp_middle == ntp_middle(*ntp_time(1700000000.25))
    assert parsed.about_us is not None
    assert parsed.about_us.cumulative_lost == 9
    assert abs(parsed.about_us.fraction_lost - 0.09) < 0.005
    # The next report's fraction covers only the packets since.
    feed(stats, list(range(100, 150)))
    again = parse(build_report(US, b"abc", stats, 2.0, 0.0, None), THEM)
    assert again is not None and again.about_us is not None and again.about_us.fraction_lost == 0.0
    assert again.sr_ntp_middle is None


def test_receiver_report_before_anything_arrived_has_no_block() -> None:
    packet = build_report(US, b"abc", ReceptionStats(8000), 0.0, 0.0, None)
    assert packet[0] & 0x1F == 0 and packet[1] == RR
    parsed = parse(packet, THEM)
    assert parsed is not None and parsed.about_us is None and not parsed.bye


@given(st.binary(max_size=200))
def test_parse_never_raises(data: bytes) -> None:
    parse(data, THEM)


@given(st.binary(max_size=120))
def test_parse_never_raises_on_report_prefixes(tail: bytes) -> None:
    parse(b"\x81\xc9" + tail, THEM)
    parse(b"\x80\xc8" + tail, THEM)
