"""Two lines, two pools: pjsua2 callers of line A are paired only with each other, never with line B's."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_end_to_end import CONNECTED_AFTER

from voiceline.sim.analysis import tone_levels
from voiceline.sim.runner import CallReport, CallSpec

pytestmark = pytest.mark.interop

A1_HZ, B1_HZ, A2_HZ, B2_HZ = 697.0, 1209.0, 1477.0, 770.0
SEPARATION_DB = 30.0


def test_callers_of_different_lines_are_never_paired(
    voiceline_server: Callable[..., object], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server(
        {
            "sip": {"answer_delay": 0.1},
            "lines": [{"name": "general", "numbers": ["100"]}, {"name": "language", "numbers": ["200"]}],
        }
    )
    line_a, line_b = server.uri("100"), server.uri("200")  # type: ignore[attr-defined]
    # Arrival order A1, B1, A2, B2: one shared pool would pair A1 with B1 and A2 with B2.
    a1, b1, a2, b2 = sim_calls(
        [
            CallSpec(line_a, tone_hz=A1_HZ, seconds=CONNECTED_AFTER + 5.0),
            CallSpec(line_b, tone_hz=B1_HZ, seconds=CONNECTED_AFTER + 5.0, start_after=0.6),
            CallSpec(line_a, tone_hz=A2_HZ, seconds=CONNECTED_AFTER + 4.0, start_after=1.2),
            CallSpec(line_b, tone_hz=B2_HZ, seconds=CONNECTED_AFTER + 3.5, start_after=1.8),
        ],
        analyse_hz=(A1_HZ, B1_HZ, A2_HZ, B2_HZ),
    )
    for report in (a1, b1, a2, b2):
        assert report.connected and report.media_started, report
    pairs = ((a1, a2, B1_HZ, A2_HZ, B2_HZ), (b1, b2, A1_HZ, B2_HZ, A2_HZ))
    for first, second, other_line_early, partner_hz, other_line_late in pairs:
        joined = second.connected_at - first.connected_at
        talking = joined + CONNECTED_AFTER  # after the connect prompts
        levels = tone_levels(first.recording, (partner_hz, other_line_early, other_line_late), talking, talking + 2.0)
        assert levels[partner_hz] - max(levels[other_line_early], levels[other_line_late]) > SEPARATION_DB, levels
        # Before its partner came, the first caller heard nobody from the other line.
        early = tone_levels(first.recording, (partner_hz, other_line_early), 0.1, max(0.3, joined - 0.1))
        assert early[other_line_early] < levels[partner_hz] - SEPARATION_DB, early

    events = server.log_events()  # type: ignore[attr-defined]
    offered = [e for e in events if e.get("event") == "call.offered"]
    assert sorted(e["line"] for e in offered) == ["general", "general", "language", "language"]
