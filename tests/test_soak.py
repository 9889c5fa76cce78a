"""The churn soak's harness (`make soak`), kept honest by a tiny run against a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from port_table import port_block
from voiceline.soak.churn import ChurnCounts, ChurnOptions
from voiceline.soak.resources import Sample
from voiceline.soak.runner import SoakReport, run_soak

CALLS = 30
SERVER_RTP = (port_block("test_soak")[0], port_block("test_soak")[0] + 99)
CALLER_PORTS = (port_block("test_soak")[0] + 100, port_block("test_soak")[1])


def idle(label: str, placed: int = 0) -> Sample:
    return Sample(label, placed, calls_up=0, rss_mb=60.0, fds=20, tasks=8, udp_sockets=1, rtp_ports=0)


@pytest.mark.integration
def test_a_tiny_soak_places_every_call_and_finds_the_service_back_where_it_started(tmp_path: Path) -> None:
    options = ChurnOptions(CALLS, rate=30.0, hold=(0.3, 0.5), rtp_every=3)
    report = run_soak(options, SERVER_RTP, CALLER_PORTS, tmp_path)
    assert report.problems() == [], "\n".join(report.lines())
    counts = report.counts
    assert (counts.placed, counts.answered, counts.completed, counts.failed, counts.hung) == (CALLS, CALLS, CALLS, 0, 0)
    assert counts.rtp_calls == CALLS // 3 and counts.packets_sent > 0 and counts.packets_received > 0
    start, middle, end = report.samples
    assert [start.label, middle.label, end.label] == ["start", "middle", "end"]
    assert start.calls_up == 0 and start.rtp_ports == 0
    # Mid-run the service holds calls and their RTP sockets ...
    assert middle.calls_placed >= CALLS // 2 and middle.calls_up > 0 and middle.rtp_ports > 0
    assert middle.udp_sockets > start.udp_sockets and middle.fds > start.fds
    # ... and at the end it holds what it held at the start.
    assert end.calls_placed == CALLS and end.calls_up == 0 and end.rtp_ports == 0
    assert end.udp_sockets == start.udp_sockets and end.fds <= start.fds
    assert report.exit_status == 0 and report.counted == CALLS and report.errors_logged == 0
    table = "\n".join(report.lines())
    assert "middle" in table and f"{CALLS} placed" in table


def test_the_report_fails_a_run_that_lost_calls_or_held_on_to_ports() -> None:
    counts = ChurnCounts(placed=10, answered=9, completed=7, failed=2, hung=1, rtp_calls=3)
    counts.failures.update({"INVITE 503": 1, "BYE unanswered": 1})
    leaking = Sample("end", 10, calls_up=1, rss_mb=61.0, fds=22, tasks=9, udp_sockets=3, rtp_ports=2)
    report = SoakReport(ChurnOptions(10, 10.0), counts, [idle("start"), idle("middle", 5), leaking], 0, counted=8)
    problems = report.problems()
    assert problems == [
        "2 calls failed", "1 calls hung", "no RTP came back to any RTP call",
        "1 calls still up on the service at the end", "RTP ports 0 at the start, 2 at the end",
        "9 calls answered, 8 in the hourly statistics",
    ]  # fmt: skip
    assert "2 failed (INVITE 503 1, BYE unanswered 1)" in "\n".join(report.lines())
    clean = ChurnCounts(placed=10, answered=10, completed=10, rtp_calls=3, packets_received=5)
    assert SoakReport(ChurnOptions(10, 10.0), clean, [idle("start"), idle("middle", 5), idle("end", 10)], 0, 10).problems() == []
