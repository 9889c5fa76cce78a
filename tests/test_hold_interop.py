"""pjsua2 callers hold and resume by re-INVITE; what the partner hears is checked by content."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from test_end_to_end import CONNECTED_AFTER, PROMPTS, prompt_seconds

from voiceline.audio.hold import PAD_HZ
from voiceline.sim.analysis import find_sound, read_wav, rms_dbfs_windows, tone_levels
from voiceline.sim.runner import CallReport, CallSpec

pytestmark = pytest.mark.interop

A_HZ, B_HZ = 697.0, 1209.0
SEPARATION_DB = 25.0
HOLD_AT, RESUME_AT = CONNECTED_AFTER + 2.5, CONNECTED_AFTER + 9.0  # seconds after A connects
STEPPED_AWAY = prompt_seconds("stepped_away")  # what the partner of a held caller is told


def levels(report: CallReport, start: float, end: float) -> dict[float, float]:
    return tone_levels(report.recording, (A_HZ, B_HZ, PAD_HZ), start, end)


def test_held_caller_s_partner_hears_hold_audio_then_the_caller_again(
    voiceline_server: Callable[..., object], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.1}})
    target = server.uri("line")  # type: ignore[attr-defined]
    a, b = sim_calls(
        [
            CallSpec(target, tone_hz=A_HZ, seconds=RESUME_AT + 2.5, hold=(HOLD_AT, RESUME_AT)),
            CallSpec(target, tone_hz=B_HZ, seconds=RESUME_AT + 2.5, start_after=0.3),
        ]
    )
    for report in (a, b):
        assert report.connected and report.media_started and report.error is None, report
    assert a.connected_at is not None and b.connected_at is not None
    # B's recording starts when B connects; A's hold and resume happen on A's clock.
    offset = a.connected_at - b.connected_at
    held = (offset + HOLD_AT + STEPPED_AWAY + 0.5, offset + RESUME_AT - 0.2)
    resumed = (offset + RESUME_AT + 0.6, offset + RESUME_AT + 2.0)

    before = levels(b, CONNECTED_AFTER, offset + HOLD_AT - 0.2)
    assert before[A_HZ] - before[PAD_HZ] > SEPARATION_DB, before  # talking: B hears A
    samples, rate = read_wav(b.recording)
    told = find_sound(samples, PROMPTS.at("stepped_away", rate), rate)  # A on hold: B is told A stepped away
    assert len(told) == 1 and offset + HOLD_AT < told[0][0] < offset + HOLD_AT + 0.6, told
    during = levels(b, *held)
    assert during[PAD_HZ] - during[A_HZ] > SEPARATION_DB, during  # then hears hold audio
    assert min(rms_dbfs_windows(samples[int(held[0] * rate) : int(held[1] * rate)], rate, 0.25)) > -50
    after = levels(b, *resumed)
    assert after[A_HZ] - after[PAD_HZ] > SEPARATION_DB, after  # resumed: B hears A again
    # A hears B again after resuming. (pjsua's recorder skips the held stretch, so A's recording
    # is shorter than the call: take its end. That we send nothing to a held caller is checked
    # with plain RTP sockets in test_dialogs.py.)
    a_samples, a_rate = read_wav(a.recording)
    a_end = len(a_samples) / a_rate
    a_after = levels(a, a_end - 1.5, a_end - 0.2)
    assert a_after[B_HZ] - a_after[PAD_HZ] > SEPARATION_DB, a_after
    events = [e["event"] for e in server.log_events()]  # type: ignore[attr-defined]
    assert events.count("pairing.held") == 1 and events.count("pairing.resumed") == 1
