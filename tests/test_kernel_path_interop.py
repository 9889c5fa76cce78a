"""Real pjsua2 callers talk through the kernel path of a `voiceline serve` process (needs root)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from test_end_to_end import A_HZ, B_HZ, CONNECTED_AFTER, assert_hears

from voiceline.sim.runner import CallReport, CallSpec

pytestmark = pytest.mark.interop


def test_two_callers_hear_each_other_through_the_kernel(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]]
) -> None:
    # A caller silent for 1 s would be hung up: only the kernel's counts show that these talk.
    media = {"kernel_forwarding": "auto", "inactivity_timeout": 1.0}
    server = voiceline_server({"sip": {"answer_delay": 0.1}, "media": media})
    target = server.uri("line")
    a, b = sim_calls(
        [
            CallSpec(target, tone_hz=A_HZ, seconds=5.0 + CONNECTED_AFTER),
            CallSpec(target, tone_hz=B_HZ, seconds=4.5 + CONNECTED_AFTER, start_after=0.5),
        ]
    )
    for report in (a, b):
        assert report.connected and report.media_started and report.error is None, report
        assert report.hangup_by == "us", report  # the caller hung up, not the inactivity reaper
    b_joined = b.connected_at - a.connected_at
    # Bridged once both heard the connect prompts.
    assert_hears(a, B_HZ, A_HZ, b_joined + CONNECTED_AFTER, b_joined + CONNECTED_AFTER + 3.0)
    assert_hears(b, A_HZ, B_HZ, CONNECTED_AFTER, CONNECTED_AFTER + 3.0)
    events = server.log_events()
    assert [e["event"] for e in events].count("media.kernel_path_on") == 1
    stats = [e for e in events if e["event"] == "call.media_stats"]
    assert len(stats) == 2
    # Nearly all of the talk went through the kernel (the 20 ms packets under the connect prompts
    # went through userspace: the prompt is mixed there), and nothing was lost.
    in_userspace = CONNECTED_AFTER / 0.02 + 50
    for leg in stats:
        assert leg["packets_in_kernel"] > 150 and leg["packets_in"] - leg["packets_in_kernel"] < in_userspace, leg
        assert leg["packets_lost"] == 0
