"""pjsua2 callers in G.722 (wideband) and in PCMU talk through the server, checked by content."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from test_end_to_end import CONNECTED_AFTER

from voiceline.sim.analysis import tone_levels
from voiceline.sim.runner import CallReport, CallSpec

pytestmark = pytest.mark.interop


def logged(server: Any, event: str) -> list[dict[str, Any]]:
    """The server's log events of one kind."""
    return [entry for entry in server.log_events() if entry.get("event") == event]

WIDE_HZ = 5000.0  # above 4 kHz: only a wideband path carries it
LOW_HZ = 697.0
OTHER_HZ = (300.0, 1500.0, 2500.0)


def assert_tone_heard(report: CallReport, hz: float, start: float, end: float, own_hz: float) -> None:
    levels = tone_levels(report.recording, (hz, own_hz, *OTHER_HZ), start, end)
    assert levels[hz] > -40, levels
    assert all(levels[hz] - levels[other] > 30 for other in (own_hz, *OTHER_HZ)), levels


def test_two_g722_callers_hear_each_other_in_wideband(
    voiceline_server: Callable[..., object], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.1}})
    target = server.uri("line")  # type: ignore[attr-defined]
    a, b = sim_calls(
        [
            CallSpec(target, tone_hz=WIDE_HZ, seconds=CONNECTED_AFTER + 4.5, codec="G722"),
            CallSpec(target, tone_hz=LOW_HZ, seconds=CONNECTED_AFTER + 4.0, start_after=0.5, codec="G722"),
        ]
    )
    for report in (a, b):
        assert report.connected and report.media_started and report.error is None, report
    offered = logged(server, "call.offered")
    assert [event["codec"] for event in offered] == ["G722", "G722"]
    joined = b.connected_at - a.connected_at
    assert_tone_heard(b, WIDE_HZ, CONNECTED_AFTER, CONNECTED_AFTER + 3.0, LOW_HZ)  # 5 kHz arrives: nothing narrowband on the way
    assert_tone_heard(a, LOW_HZ, joined + CONNECTED_AFTER, joined + CONNECTED_AFTER + 3.0, WIDE_HZ)


def test_a_g722_caller_and_a_pcmu_caller_talk_through_transcoding(
    voiceline_server: Callable[..., object], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.1}})
    target = server.uri("line")  # type: ignore[attr-defined]
    wide, narrow = sim_calls(
        [
            CallSpec(target, tone_hz=1209.0, seconds=CONNECTED_AFTER + 4.5, codec="G722"),
            CallSpec(target, tone_hz=LOW_HZ, seconds=CONNECTED_AFTER + 4.0, start_after=0.5, codec="PCMU"),
        ]
    )
    for report in (wide, narrow):
        assert report.connected and report.media_started and report.error is None, report
    offered = logged(server, "call.offered")
    assert sorted(event["codec"] for event in offered) == ["G722", "PCMU"]
    joined = narrow.connected_at - wide.connected_at
    assert_tone_heard(narrow, 1209.0, CONNECTED_AFTER, CONNECTED_AFTER + 3.0, LOW_HZ)
    assert_tone_heard(wide, LOW_HZ, joined + CONNECTED_AFTER, joined + CONNECTED_AFTER + 3.0, 1209.0)
    # Each leg's anonymous media figures are logged when its call ends.
    stats = logged(server, "call.media_stats")
    assert len(stats) == 2
    for event in stats:
        assert event["packets_in"] > 100 and event["packets_out"] > 100
        assert event["loss_fraction"] < 0.02 and event["jitter_ms"] < 20
