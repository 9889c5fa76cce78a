"""The media source filter on a fake clock: learning, probation, NAT rebinding and what an attacker cannot do."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from voiceline.audio.latch import REBIND_MAX_SEQUENCE_STEP, REBIND_SILENCE_SECONDS, Heard, Learning, SourceFilter

SDP = ("10.0.0.5", 4000)  # the address the caller's SDP announced (behind its NAT)
NAT = "203.0.113.9"  # where the caller's INVITE came from
STRANGER = "198.51.100.66"
LEARNING = Learning(packets=4, seconds=1.5)


class Leg:
    """What a media leg does around the filter: the peer passes by one comparison, the rest ask."""

    def __init__(self, signalling_host: str | None = NAT, announced: tuple[str, int] = SDP) -> None:
        self.filter = SourceFilter(announced, signalling_host, 0.0, LEARNING)
        self.heard = Heard(None, 0, 0.0)

    def packet(self, source: tuple[str, int], ssrc: int, sequence: int, now: float) -> bool:
        accepted = source == self.filter.peer or self.filter.admit(source, ssrc, sequence, now, self.heard)
        if accepted:
            self.heard = Heard(ssrc, sequence, now)
        return accepted

    def stream(self, source: tuple[str, int], ssrc: int, first: int, count: int, start: float) -> list[bool]:
        """`count` packets 20 ms apart, in sequence from `first`."""
        return [self.packet(source, ssrc, (first + n) % 65536, start + n * 0.02) for n in range(count)]


# -- learning --------------------------------------------------------------------------------


def test_the_sdp_address_latches_at_once() -> None:
    leg = Leg()
    assert leg.filter.peer is None
    assert leg.packet(SDP, 1, 100, 0.01)
    assert leg.filter.peer == SDP


def test_the_sdp_host_on_another_port_and_the_signalling_host_latch_at_once() -> None:
    leg = Leg()
    assert leg.packet((SDP[0], 4002), 1, 100, 0.01) and leg.filter.peer == (SDP[0], 4002)
    nat = Leg()
    assert nat.packet((NAT, 61234), 1, 100, 0.01) and nat.filter.peer == (NAT, 61234)


def test_a_lone_packet_from_elsewhere_never_latches() -> None:
    leg = Leg()
    assert not any(leg.packet((STRANGER, 5000 + n), 7, 100, 2.0 + n) for n in range(10))  # one per address
    assert not any(leg.packet((STRANGER, 5000), 7, 100 + 2 * n, 2.0 + n) for n in range(10))  # never in sequence
    assert leg.filter.peer is None


def test_a_stranger_on_probation_latches_after_a_run_and_the_learning_window() -> None:
    leg = Leg()
    source = (STRANGER, 5000)
    assert leg.stream(source, 7, 65534, 4, 0.0) == [False] * 4  # a whole run, but inside the window
    assert leg.filter.peer is None
    assert leg.packet(source, 7, 2, 1.5)  # the run goes on (through the wrap) past the window
    assert leg.filter.peer == source


def test_the_run_restarts_on_a_gap_another_ssrc_or_another_source() -> None:
    for interruption in (((STRANGER, 5000), 7, 110), ((STRANGER, 5000), 8, 103), ((STRANGER, 5002), 7, 103)):
        leg = Leg()
        leg.stream((STRANGER, 5000), 7, 100, 3, 2.0)
        assert not leg.packet(*interruption, 2.1)
        assert leg.stream((STRANGER, 5000), 7, 103, 3, 2.2) == [False, False, False]
        assert leg.packet((STRANGER, 5000), 7, 106, 2.3)


def test_the_caller_speaking_within_the_window_beats_a_sprayer() -> None:
    leg = Leg()
    sprayer = (STRANGER, 5000)
    assert leg.stream(sprayer, 9, 1, 50, 0.0) == [False] * 50  # a second of good-looking RTP
    assert leg.packet((NAT, 61234), 1, 100, 1.0)
    assert not any(leg.stream(sprayer, 9, 51, 100, 1.02))
    assert leg.filter.peer == (NAT, 61234)


def test_a_probation_peer_gives_way_to_the_caller_at_once() -> None:
    leg = Leg()
    sprayer = (STRANGER, 5000)
    assert leg.stream(sprayer, 9, 1, 80, 0.0)[-1]  # latched after the window: the caller was late
    assert leg.packet(SDP, 1, 500, 1.7)  # any packet from a trusted host, whatever its SSRC
    assert leg.filter.peer == SDP
    assert not any(leg.stream(sprayer, 1, 501, 100, 1.72))  # even with the caller's SSRC and sequence


# -- latched: NAT rebinding and takeovers ---------------------------------------------------


def latched() -> Leg:
    leg = Leg()
    assert all(leg.stream((NAT, 61234), 0xCA11, 1000, 50, 0.5))
    return leg  # last packet: sequence 1049 at 1.48 s


QUIET = 1.48 + REBIND_SILENCE_SECONDS


def test_a_nat_rebinding_moves_the_peer() -> None:
    leg = latched()
    assert not leg.packet((NAT, 61300), 0xCA11, 1050, QUIET - 0.01)  # not yet quiet long enough
    assert leg.packet((NAT, 61300), 0xCA11, 1051, QUIET)  # one lost on the way
    assert leg.filter.peer == (NAT, 61300)


def test_a_rebinding_to_the_sdp_host_is_accepted_too() -> None:
    leg = latched()
    assert leg.packet((SDP[0], 4000), 0xCA11, 1050, QUIET)


def test_attack_3_the_ssrc_from_another_host_after_silence_never_takes_over() -> None:
    leg = latched()
    assert not any(leg.stream((STRANGER, 5000), 0xCA11, 1050, 200, QUIET + 1))
    assert leg.filter.peer == (NAT, 61234)
    assert leg.packet((NAT, 61234), 0xCA11, 1050, QUIET + 5)  # the caller speaks again


def test_a_rebinding_needs_the_ssrc_and_a_sequence_just_after_the_last() -> None:
    for ssrc, sequence in ((0xBAD, 1050), (0xCA11, 1049), (0xCA11, 1000), (0xCA11, 1049 + REBIND_MAX_SEQUENCE_STEP + 1)):
        leg = latched()
        assert not leg.packet((NAT, 61300), ssrc, sequence, QUIET + 1)
    leg = latched()
    assert leg.packet((NAT, 61300), 0xCA11, 1049 + REBIND_MAX_SEQUENCE_STEP, QUIET + 1)


def test_the_address_moved_away_from_takes_the_stream_back_at_once() -> None:
    leg = latched()
    assert leg.packet((NAT, 61300), 0xCA11, 1050, QUIET)  # e.g. someone behind the same NAT, replaying
    assert leg.packet((NAT, 61234), 0xCA11, 1051, QUIET + 0.01)  # the caller was only quiet
    assert leg.filter.peer == (NAT, 61234)
    assert not leg.packet((NAT, 61300), 0xCA11, 1052, QUIET + 0.02)  # no ping-pong: that needs silence again


def test_a_probation_peer_may_rebind_only_on_its_own_host() -> None:
    leg = Leg()
    assert leg.stream((STRANGER, 5000), 9, 1, 80, 0.0)[-1]
    assert not leg.packet(("192.0.2.1", 5000), 9, 81, 3.0)
    assert leg.packet((STRANGER, 5010), 9, 81, 3.0)


def test_a_new_sdp_address_restarts_learning() -> None:
    leg = latched()
    leg.filter.restart(("10.0.0.6", 4100), 10.0)
    assert leg.filter.peer is None and leg.filter.announced == ("10.0.0.6", 4100)
    assert not leg.packet((STRANGER, 5000), 0xCA11, 1050, 10.1)
    assert leg.packet(("10.0.0.6", 4100), 0xCA11, 1, 10.2)


def test_without_a_signalling_host_only_the_sdp_host_is_trusted() -> None:
    leg = Leg(signalling_host=None)
    assert not leg.packet((NAT, 61234), 1, 1, 0.1)
    assert leg.packet((SDP[0], 1), 1, 1, 0.2)


# -- properties ----------------------------------------------------------------------------

packets = st.lists(
    st.tuples(
        st.sampled_from([(STRANGER, 5000), (STRANGER, 5002), ("192.0.2.1", 4000)]),
        st.sampled_from([0xCA11, 9]),
        st.integers(0, 65535),
        st.floats(0, 30),
    ),
    max_size=60,
)


@given(packets)
def test_no_stranger_packet_moves_a_peer_on_a_trusted_host(attack: list[tuple[tuple[str, int], int, int, float]]) -> None:
    leg = latched()
    for source, ssrc, sequence, delay in sorted(attack, key=lambda packet: packet[3]):
        assert not leg.packet(source, ssrc, sequence, QUIET + delay)
    assert leg.filter.peer == (NAT, 61234)


@given(st.lists(st.tuples(st.integers(0, 65535), st.integers(0, 3), st.floats(0, 30)), max_size=LEARNING.packets - 1))
def test_fewer_packets_than_a_run_never_latch(spray: list[tuple[int, int, float]]) -> None:
    leg = Leg()
    for sequence, ssrc, at in sorted(spray, key=lambda packet: packet[2]):
        assert not leg.packet((STRANGER, 5000), ssrc, sequence, at)
