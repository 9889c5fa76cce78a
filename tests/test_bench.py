"""The `make bench` load generator: its measurements, its SIP UAC, and a tiny run against a real server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from voiceline.bench.measure import (
    BUCKET_NS,
    BUCKETS,
    LatencyHistogram,
    LevelResult,
    WindowCounts,
    largest_within_budget,
)
from voiceline.bench.runner import BenchOptions, run_levels
from voiceline.bench.uac import MAX_TRANSMISSIONS, RETRANSMIT_SECONDS, BenchCall, CallState
from voiceline.sim.plugin import VoicelineServer
from voiceline.sip.message import SipRequest, SipResponse, parse_message, response_to, serialize
from voiceline.sip.sdp import parse_sdp

MS = 1_000_000


def level(pairs: int, sent: int, received: int, latencies_ms: list[float], held: int | None = None) -> LevelResult:
    histogram = LatencyHistogram()
    for latency in latencies_ms:
        histogram.add(int(latency * MS))
    return LevelResult(
        pairs=pairs,
        pairs_held=pairs if held is None else held,
        counts=WindowCounts(sent=sent, received=received),
        latency=histogram,
        setup_rate=0.0,
        server_cpu=0.0,
        server_rss_mb=0.0,
        generator_cpu=0.0,
        seconds=1.0,
    )


# -- measurement ---------------------------------------------------------------------


def test_percentiles_are_bucket_upper_edges() -> None:
    histogram = LatencyHistogram()
    for _ in range(98):
        histogram.add(250_000)  # 0.25 ms
    histogram.add(4_000_000)
    histogram.add(9_000_000)
    assert histogram.total == 100
    assert histogram.percentile_ms(0.50) == pytest.approx(0.26)
    assert histogram.percentile_ms(0.98) == pytest.approx(0.26)
    assert histogram.percentile_ms(0.99) == pytest.approx(4.01)
    assert histogram.percentile_ms(1.0) == pytest.approx(9.01)


def test_out_of_range_latencies_are_clamped_and_empty_is_zero() -> None:
    histogram = LatencyHistogram()
    assert histogram.percentile_ms(0.99) == 0.0
    histogram.add(-5)  # clocks a hair apart
    histogram.add(BUCKETS * BUCKET_NS * 10)
    assert histogram.counts[0] == 1 and histogram.counts[-1] == 1


def test_histograms_merge() -> None:
    one, other = LatencyHistogram(), LatencyHistogram()
    one.add(1 * MS)
    other.add(1 * MS)
    other.add(3 * MS)
    one.merge(other)
    assert one.total == 3 and one.percentile_ms(0.5) == pytest.approx(1.01)


def test_loss_is_the_share_of_window_probes_that_never_came_back() -> None:
    assert level(10, 10_000, 9_990, [0.1]).loss == pytest.approx(0.001)
    assert level(10, 0, 0, []).loss == 0.0
    counts = WindowCounts(sent=5, received=4, foreign=1)
    counts.merge(WindowCounts(sent=5, received=5))
    assert (counts.sent, counts.received, counts.foreign) == (10, 9, 1)


def test_budget_needs_low_loss_low_p99_and_every_pair_held() -> None:
    fast = [0.3] * 990 + [4.0] * 10
    # 100 pairs for 1 s: 200 legs x 50 packets.
    assert level(100, 10_000, 10_000, fast).within_budget
    assert not level(100, 10_000, 9_980, fast).within_budget  # 0.2 % lost
    assert not level(100, 10_000, 10_000, [0.3] * 980 + [6.0] * 20).within_budget  # p99 6 ms
    assert not level(100, 10_000, 10_000, fast, held=99).within_budget
    assert not level(100, 0, 0, []).within_budget  # nothing measured proves nothing
    assert not level(100, 9_600, 9_600, fast).within_budget  # the generator fell behind: not the full load


def test_largest_within_budget_stops_at_the_first_failed_level() -> None:
    good, bad = [0.2] * 100, [0.2] * 90 + [20.0] * 10
    results = [level(pairs, 100 * pairs, 100 * pairs, bad if pairs == 300 else good) for pairs in (400, 100, 200, 300)]
    assert largest_within_budget(results) == 200
    assert largest_within_budget(results[:2]) == 400
    assert largest_within_budget([level(100, 10_000, 10_000, bad)]) == 0


# -- the UAC -------------------------------------------------------------------------

LOCAL, SERVER = ("127.0.0.1", 5999), ("127.0.0.1", 5060)
ANSWER = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 24002 RTP/AVP 0\r\n"


def sent_request(data: bytes) -> SipRequest:
    message = parse_message(data)
    assert isinstance(message, SipRequest)
    return message


def answer(invite: SipRequest, status: int, body: bytes = ANSWER) -> SipResponse:
    extra = [("Contact", "<sip:voiceline@127.0.0.1:5060;transport=udp>")] if status < 300 else []
    return response_to(invite, status, to_tag="srv1", headers=extra, body=body if status < 300 else b"")


def test_invite_offers_pcmu_and_telephone_event_at_the_leg_port() -> None:
    invite = sent_request(BenchCall(LOCAL, SERVER, 40002).invite(0.0))
    assert invite.method == "INVITE" and invite.headers.get("CSeq") == "1 INVITE"
    media = parse_sdp(invite.body).media[0]
    assert (media.port, media.formats) == (40002, ["0", "101"])


def test_answer_is_acked_in_the_dialog_and_gives_the_server_rtp_address() -> None:
    call = BenchCall(LOCAL, SERVER, 40002)
    invite = sent_request(call.invite(0.0))
    ack = sent_request(call.on_response(answer(invite, 200), 0.1) or b"")
    assert call.state is CallState.ANSWERED and call.remote_rtp == ("127.0.0.1", 24002)
    assert ack.method == "ACK" and ack.headers.get("CSeq") == "1 ACK"
    assert ack.uri == "sip:voiceline@127.0.0.1:5060;transport=udp"
    assert "tag=srv1" in (ack.headers.get("To") or "")
    assert call.on_response(answer(invite, 200), 0.6) == serialize(ack)  # a retransmitted 200 gets the same ACK
    assert call.due(5.0) is None  # nothing left to retransmit
    bye = sent_request(call.hangup(6.0) or b"")
    assert bye.method == "BYE" and bye.headers.get("CSeq") == "2 BYE"
    call.on_response(response_to(bye, 200), 6.1)
    assert call.state is CallState.ENDED


def test_a_rejected_call_fails_and_acks_the_invite_transaction() -> None:
    call = BenchCall(LOCAL, SERVER, 40002)
    invite = sent_request(call.invite(0.0))
    ack = sent_request(call.on_response(answer(invite, 503), 0.1) or b"")
    assert call.state is CallState.FAILED
    assert ack.headers.get("Via") == invite.headers.get("Via")  # same branch: the INVITE's transaction


def test_an_answer_without_usable_sdp_fails() -> None:
    call = BenchCall(LOCAL, SERVER, 40002)
    invite = sent_request(call.invite(0.0))
    call.on_response(answer(invite, 200, body=b"garbage"), 0.1)
    assert call.state is CallState.FAILED and call.remote_rtp is None


def test_invite_is_retransmitted_then_given_up() -> None:
    call = BenchCall(LOCAL, SERVER, 40002)
    first = call.invite(0.0)
    assert call.due(RETRANSMIT_SECONDS / 2) is None
    now = 0.0
    for _ in range(MAX_TRANSMISSIONS - 1):
        now += RETRANSMIT_SECONDS
        assert call.due(now) == first
    assert call.due(now + RETRANSMIT_SECONDS) is None and call.state is CallState.FAILED


def test_a_bye_from_the_server_ends_the_call() -> None:
    call = BenchCall(LOCAL, SERVER, 40002)
    invite = sent_request(call.invite(0.0))
    call.on_response(answer(invite, 200), 0.1)
    bye = SipRequest("BYE", "sip:bench@127.0.0.1:5999", invite.headers.copy())
    bye.headers.set("CSeq", "1 BYE")
    reply = parse_message(call.on_request(bye))
    assert isinstance(reply, SipResponse) and reply.status == 200
    assert call.state is CallState.ENDED


# -- a real run --------------------------------------------------------------------------


@pytest.mark.interop
def test_a_tiny_run_relays_every_probe_both_ways(voiceline_server: Callable[..., VoicelineServer]) -> None:
    """One pair, then a second, over two generator processes (so pairs may span them)."""
    server = voiceline_server({"sip": {"answer_delay": 0.0}})
    results = run_levels((server.host, server.port), server.process.pid, BenchOptions([1, 2], 1.0, workers=2))
    assert [result.pairs for result in results] == [1, 2]
    for result in results:
        assert result.pairs_held == result.pairs
        assert result.counts.sent > 0
        assert result.counts.received == result.counts.sent and result.loss == 0.0
        assert result.latency.total == result.counts.received
        assert result.server_rss_mb > 0


def can_use_realtime() -> bool:
    probe = "import os; os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


@pytest.mark.interop
def test_realtime_priority_puts_the_server_under_sched_rr(voiceline_server: Callable[..., VoicelineServer]) -> None:
    server = voiceline_server({"media": {"realtime_priority": 3}})
    events = [event["event"] for event in server.log_events()]
    if can_use_realtime():
        assert os.sched_getscheduler(server.process.pid) == os.SCHED_RR
        assert os.sched_getparam(server.process.pid).sched_priority == 3
        assert "process.realtime" in events
    else:
        assert os.sched_getscheduler(server.process.pid) == os.SCHED_OTHER
        assert "process.realtime_unavailable" in events
