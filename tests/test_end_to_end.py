"""Real PJSIP callers (pjsua2, in their own processes) dial the real server and talk.

Audio is checked by content: each caller sends its own tone and a Goertzel
filter on what the other side recorded must find it far above the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from voiceline.audio.hold import PAD_HZ
from voiceline.audio.prompts import PromptSet
from voiceline.sim.analysis import read_wav, rms_dbfs_windows, tone_levels
from voiceline.sim.runner import CallReport, CallSpec

pytestmark = pytest.mark.interop

A_HZ, B_HZ, C_HZ = 697.0, 1209.0, 1477.0
HOLD_HZ = (PAD_HZ,)  # the built-in hold music's steady pedal note
# How far a partner's tone must stand above one's own echo in a recording.
SEPARATION_DB = 30.0
SILENCE_DBFS = -50.0
PROMPTS = PromptSet.load("en")


def prompt_seconds(*prompt_ids: str, prompts: PromptSet = PROMPTS) -> float:
    return sum(len(prompts[prompt_id]) for prompt_id in prompt_ids) / 16000  # PROMPT_RATE


# A pair hears the connect cue and "you're connected" before the two are bridged (and a margin);
# one whose partner left hears so before it is offered to the pool again.
CONNECTED_AFTER = prompt_seconds("connect_cue", "connected") + 0.4
PARTNER_LEFT = prompt_seconds("partner_left") + 0.2


def assert_hears(report: CallReport, partner_hz: float, own_hz: float, start: float, end: float) -> None:
    """Within [start, end) s of the recording the partner's tone dominates the caller's own."""
    levels = tone_levels(report.recording, (partner_hz, own_hz), start, end)
    assert levels[partner_hz] - levels[own_hz] > SEPARATION_DB, levels
    samples, rate = read_wav(report.recording)
    window = samples[int(start * rate) : int(end * rate)]
    assert min(rms_dbfs_windows(window, rate, 0.25)) > SILENCE_DBFS


def assert_hold_audio(report: CallReport, start: float, end: float, not_hz: tuple[float, ...]) -> None:
    """Non-silent hold audio in [start, end): loud enough, the pedal note present, no caller tone."""
    samples, rate = read_wav(report.recording)
    window = samples[int(start * rate) : int(end * rate)]
    assert len(window) > 0.2 * rate
    assert min(rms_dbfs_windows(window, rate, 0.1)) > SILENCE_DBFS
    levels = tone_levels(report.recording, (*HOLD_HZ, *not_hz), start, end)
    strongest_hold = max(levels[hz] for hz in HOLD_HZ)
    assert all(strongest_hold - levels[hz] > 20 for hz in not_hz), levels


def test_two_callers_are_paired_and_hear_each_other(
    voiceline_server: Callable[..., object], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.1}})
    target = server.uri("line")  # type: ignore[attr-defined]
    a, b = sim_calls(
        [
            CallSpec(target, tone_hz=A_HZ, seconds=8.0),
            CallSpec(target, tone_hz=B_HZ, seconds=7.5, start_after=0.5),
        ]
    )
    for report in (a, b):
        assert report.final_status == 200 and report.connected and report.media_started, report
        assert report.error is None
    # Before B arrives, A waits and hears hold audio.
    b_joined = b.connected_at - a.connected_at
    assert b_joined > 0.3
    assert_hold_audio(a, 0.05, b_joined - 0.05, not_hz=(A_HZ, B_HZ))
    # Then, after the connect prompts, each hears the other, and not itself.
    assert_hears(a, B_HZ, A_HZ, b_joined + CONNECTED_AFTER, b_joined + CONNECTED_AFTER + 3.0)
    assert_hears(b, A_HZ, B_HZ, CONNECTED_AFTER, CONNECTED_AFTER + 3.0)


def test_remaining_caller_is_paired_with_the_next_waiting_one(
    voiceline_server: Callable[..., object], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.1}})
    target = server.uri("line")  # type: ignore[attr-defined]
    a, b, c = sim_calls(
        [
            CallSpec(target, tone_hz=A_HZ, seconds=6.5),
            CallSpec(target, tone_hz=B_HZ, seconds=16.0, start_after=0.5),
            CallSpec(target, tone_hz=C_HZ, seconds=15.0, start_after=1.5),
        ]
    )
    for report in (a, b, c):
        assert report.connected and report.media_started and report.error is None, report
    assert a.hangup_by == "us"
    a_left = a.disconnected_at
    # A and B talk first; C waits on hold meanwhile.
    assert_hears(b, A_HZ, B_HZ, CONNECTED_AFTER, a_left - b.connected_at - 0.3)
    assert_hold_audio(c, 0.1, a_left - c.connected_at - 0.2, not_hz=(A_HZ, B_HZ, C_HZ))
    # A hangs up: B is told so, goes back to the pool and meets C, who waited longest.
    met = a_left + PARTNER_LEFT + CONNECTED_AFTER
    assert_hears(b, C_HZ, B_HZ, met - b.connected_at, met - b.connected_at + 3.0)
    assert_hears(c, B_HZ, C_HZ, met - c.connected_at, met - c.connected_at + 3.0)


def test_stopping_the_service_sends_bye_to_every_caller(
    voiceline_server: Callable[..., object], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.1}})
    target = server.uri("line")  # type: ignore[attr-defined]
    specs = [CallSpec(target, tone_hz=A_HZ, seconds=20.0), CallSpec(target, tone_hz=B_HZ, seconds=20.0, start_after=0.3)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        placing = pool.submit(sim_calls, specs, 45.0)
        assert len(server.wait_for_event("pairing.talking")) == 1  # type: ignore[attr-defined]  # one line per pair
        assert server.stop() == 0  # type: ignore[attr-defined]
        reports = placing.result(timeout=60)
    for report in reports:
        assert report.connected and report.hangup_by == "remote", report
        assert report.disconnected_at - report.connected_at < 15
    events = [e["event"] for e in server.log_events()]  # type: ignore[attr-defined]
    assert events.count("call.ended") == 2 and events[-1] == "service.stopped"
