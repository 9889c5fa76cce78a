"""The caller's journey heard by real pjsua2 callers: each prompt found in the recordings by content.

Prompts are found by normalised cross-correlation against the prompt set's own
audio (`find_sound`); timers are short. Times are seconds of a caller's
recording, which starts when its call is confirmed.
"""

from __future__ import annotations

import subprocess
import sys
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rawsip import serving
from test_end_to_end import A_HZ, B_HZ, C_HZ, CONNECTED_AFTER, PROMPTS, assert_hears, assert_hold_audio, prompt_seconds

from voiceline import config as config_module
from voiceline.audio.prompts import PromptSet
from voiceline.sim.analysis import find_sound, read_wav, tone_levels
from voiceline.sim.plugin import to_toml
from voiceline.sim.runner import CallReport, CallSpec

TOLERANCE = 0.4  # seconds: a digit's or a SIP message's way, a pacer tick, the recorder's start


def heard_at(
    report: CallReport, sound: np.ndarray | str, prompts: PromptSet = PROMPTS, threshold: float = 0.5, over: tuple[float, ...] = ()
) -> list[float]:
    """Where in the caller's recording a prompt (an id, or its audio at 8 kHz) starts; `over`: the
    callers' tones it was mixed over."""
    samples, rate = read_wav(report.recording)
    audio = prompts.at(sound, rate) if isinstance(sound, str) else sound
    return sorted(at for at, _ in find_sound(samples, audio, rate, threshold, exclude_hz=over))


def assert_heard_once(
    report: CallReport,
    sound: np.ndarray | str,
    at: float,
    prompts: PromptSet = PROMPTS,
    threshold: float = 0.5,
    over: tuple[float, ...] = (),
) -> None:
    found = heard_at(report, sound, prompts, threshold, over)
    assert len(found) == 1 and abs(found[0] - at) < TOLERANCE, (sound if isinstance(sound, str) else "sound", found, at)


def chirp_wav(path: Path, seconds: float = 2.0, rate: int = 8000, start_hz: float = 400.0, hz_per_second: float = 1000.0) -> None:
    """An admin's "recording" nothing built in sounds like: a sweep (rising by default; sweeps through
    different bands are told apart)."""
    t = np.arange(int(seconds * rate)) / rate
    sweep = 0.3 * np.sin(2 * np.pi * (start_hz * t + hz_per_second / 2 * t**2))
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((sweep * 32767).astype("<i2").tobytes())


@pytest.mark.interop
def test_a_lone_caller_is_welcomed_reassured_told_it_is_quiet_and_said_goodbye_to(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]], tmp_path: Path
) -> None:
    # The line has its own recording of the quiet-line message; everything else is built in.
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    chirp_wav(recordings / "quiet_line.wav")
    own = PromptSet.load("en", recordings)
    every, max_wait, skip_at = 4.5, 13.5, 3.5  # the quiet-line chirp (2 s) and reassure_1 fit in `every`
    server = voiceline_server(
        {
            "sip": {"answer_delay": 0.1},
            "welcome": {"enabled": True, "offer_choice": False},
            "waiting": {"reassure_every": every, "max_wait": max_wait},
            "lines": [{"name": "own", "numbers": ["*"], "prompts": str(recordings)}],
        }
    )
    (caller,) = sim_calls([CallSpec(server.uri("100"), tone_hz=A_HZ, seconds=60.0, dtmf_at=((skip_at, "5"),))])
    assert caller.connected and caller.media_started and caller.error is None, caller
    samples, rate = read_wav(caller.recording)
    # The welcome, from the answer on, until a key skips it ...
    welcome = PROMPTS.at("welcome", rate)
    assert [round(at) for at, _ in find_sound(samples[: 4 * rate], welcome[: 3 * rate], rate)] == [0]
    # ... then hold music until the first reassurance: on an empty line, that it is quiet (the line's own file).
    assert_hold_audio(caller, skip_at + TOLERANCE, skip_at + every - TOLERANCE, not_hz=(A_HZ,))
    assert_heard_once(caller, "quiet_line", skip_at + every, own)
    assert heard_at(caller, "quiet_line") == []  # not the built-in one
    # A reassurance every `every` seconds; at max_wait a goodbye, then our BYE.
    assert_heard_once(caller, "reassure_1", skip_at + 2 * every)
    goodbye_at = skip_at + max_wait
    assert_heard_once(caller, "max_wait_goodbye", goodbye_at)
    assert_heard_once(caller, "goodbye", goodbye_at + prompt_seconds("max_wait_goodbye"))
    assert caller.hangup_by == "remote"
    assert caller.disconnected_at is not None and caller.connected_at is not None
    ended = caller.disconnected_at - caller.connected_at
    assert abs(ended - (goodbye_at + prompt_seconds("max_wait_goodbye", "goodbye"))) < 1.0


@pytest.mark.interop
def test_a_pair_is_connected_warned_together_and_offered_someone_new_when_time_is_up(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]]
) -> None:
    max_talk, warn_before, choice_wait, spread = 9.0, 4.0, 3.0, 1.0
    server = voiceline_server(
        {
            "sip": {"answer_delay": 0.1},
            "talking": {
                "max_talk": max_talk, "warn_before": warn_before, "end_choice_wait": choice_wait, "end_choice_spread": spread
            },
        }
    )
    target = server.uri("100")
    end_prompts = prompt_seconds("talk_time_over", "end_of_talk_choice", "key_hash", "end_of_talk_or_hang_up")
    join = 0.3  # B starts this long after A
    press = join + CONNECTED_AFTER + max_talk + end_prompts + 1.0  # A asks for someone new during the choice
    a, b = sim_calls(
        [
            CallSpec(target, tone_hz=A_HZ, seconds=press + 6.0, dtmf_at=((press, "#"),)),
            CallSpec(target, tone_hz=B_HZ, seconds=press + 8.0 + spread, start_after=join),
        ]
    )
    for report in (a, b):
        assert report.connected and report.media_started and report.error is None, report
    assert a.connected_at is not None and b.connected_at is not None
    offset = b.connected_at - a.connected_at  # B's time 0 on A's recording
    # Both hear the cue and "you're connected" when paired, before they hear each other ...
    for report, paired, partner_hz, own_hz in ((a, offset, B_HZ, A_HZ), (b, 0.0, A_HZ, B_HZ)):
        assert_heard_once(report, "connect_cue", paired, threshold=0.9)  # two notes: the music has notes too
        assert_heard_once(report, "connected", paired + prompt_seconds("connect_cue"))
        before = tone_levels(report.recording, (partner_hz,), paired + 0.2, paired + CONNECTED_AFTER - 0.6)
        talking = tone_levels(report.recording, (partner_hz,), paired + CONNECTED_AFTER, paired + CONNECTED_AFTER + 2.0)
        assert talking[partner_hz] - before[partner_hz] > 20, (before, talking)
        assert_hears(report, partner_hz, own_hz, paired + CONNECTED_AFTER, paired + CONNECTED_AFTER + 3.0)
        # ... a warning `warn_before` the end, mixed over the conversation: the partner still heard under it ...
        warned = paired + CONNECTED_AFTER - 0.4 + max_talk - warn_before
        assert_heard_once(report, "talk_time_warning", warned, over=(A_HZ, B_HZ))
        under = tone_levels(report.recording, (partner_hz, own_hz), warned + 0.3, warned + prompt_seconds("talk_time_warning") - 0.3)
        assert under[partner_hz] > talking[partner_hz] - 20 and under[partner_hz] - under[own_hz] > 20, (under, talking)
        # ... and at the end, the choice instead of a cut.
        assert_heard_once(report, "talk_time_over", warned + warn_before)
        assert_heard_once(report, "end_of_talk_choice", warned + warn_before + prompt_seconds("talk_time_over"))
    # A took the key: it looks for someone new (alone now: hold music). B did not: a goodbye, then our BYE.
    assert_heard_once(a, "looking_for_someone_new", press)
    assert_hold_audio(a, press + prompt_seconds("looking_for_someone_new") + 0.3, press + 5.5, not_hz=(A_HZ, B_HZ))
    assert a.hangup_by == "us" and b.hangup_by == "remote"
    choice_over = offset + CONNECTED_AFTER - 0.4 + max_talk + end_prompts + choice_wait
    [goodbye] = heard_at(b, "goodbye")  # the choice lasts up to `spread` longer, at random per caller
    assert choice_over - offset - TOLERANCE < goodbye < choice_over - offset + spread + TOLERANCE


@pytest.mark.interop
def test_a_talker_is_paired_with_a_listener_before_another_talker_and_told_when_the_partner_leaves(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server(
        {"sip": {"answer_delay": 0.1}, "welcome": {"enabled": True, "offer_choice": True}, "pairing": {"preference_wait": 60.0}}
    )
    target = server.uri("100")
    key_at, listener_joins, listener_stays = 1.0, 2.5, 11.0
    talker, other_talker, listener = sim_calls(
        [
            CallSpec(target, tone_hz=A_HZ, seconds=listener_joins + listener_stays + prompt_seconds("partner_left") + 1.5, dtmf_at=((key_at, "1"),)),
            CallSpec(target, tone_hz=B_HZ, seconds=listener_joins + listener_stays + 0.5, start_after=0.4, dtmf_at=((key_at, "1"),)),
            CallSpec(target, tone_hz=C_HZ, seconds=listener_stays, start_after=listener_joins, dtmf_at=((key_at, "2"),)),
        ]
    )
    for report in (talker, other_talker, listener):
        assert report.connected and report.media_started and report.error is None, report
    assert talker.connected_at is not None and other_talker.connected_at is not None and listener.connected_at is not None
    # A key in the welcome skips it and chooses; the choice is acknowledged.
    assert_heard_once(talker, "preference_talk", key_at)
    assert_heard_once(listener, "preference_listen", key_at)
    # The listener is paired with the first talker; the other talker, who came before it, keeps waiting.
    paired = key_at + prompt_seconds("preference_listen")  # on the listener's recording
    assert_hears(listener, A_HZ, C_HZ, paired + CONNECTED_AFTER, listener_stays - 0.5)
    offset = listener.connected_at - talker.connected_at
    assert_hears(talker, C_HZ, A_HZ, offset + paired + CONNECTED_AFTER, offset + listener_stays - 0.5)
    other = other_talker.connected_at
    assert_hold_audio(
        other_talker,
        key_at + prompt_seconds("preference_talk") + 0.3,
        listener.connected_at + listener_stays - other,
        not_hz=(A_HZ, B_HZ, C_HZ),
    )
    # The listener hangs up: the talker is told the other person has left.
    assert listener.hangup_by == "us" and listener.disconnected_at is not None
    assert_heard_once(talker, "partner_left", listener.disconnected_at - talker.connected_at)


def config_with_own_recordings(tmp_path: Path) -> tuple[Path, Path]:
    """(recordings, config file): the config's one line, "own", plays what the (empty) recordings directory holds."""
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    config_file = tmp_path / "voiceline.toml"
    config_file.write_text(
        to_toml(
            {
                "sip": {"listen": "127.0.0.1:0"},
                "storage": {"data_dir": str(tmp_path / "data")},
                "lines": [{"name": "own", "numbers": ["*"], "prompts": str(recordings)}],
            }
        ),
        encoding="utf-8",
    )
    return recordings, config_file


@pytest.mark.integration
def test_a_broken_prompt_file_stops_the_service_from_starting_and_names_the_file(tmp_path: Path) -> None:
    recordings, config = config_with_own_recordings(tmp_path)
    (recordings / "welcome.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    serve = subprocess.run(
        [sys.executable, "-m", "voiceline", "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert serve.returncode == 2, serve
    assert f"prompt file {recordings / 'welcome.wav'}" in serve.stderr


@pytest.mark.integration
async def test_a_reload_reads_a_line_s_recordings_again_and_keeps_the_old_ones_when_one_is_broken(tmp_path: Path) -> None:
    recordings, config_file = config_with_own_recordings(tmp_path)
    async with serving(config_module.load(config_file)) as app:
        app.config_file = str(config_file)
        assert app.line_setup("own").prompts.replaced == frozenset()
        chirp_wav(recordings / "goodbye.wav")
        await app.reload()
        assert app.line_setup("own").prompts.replaced == {"goodbye"}  # read again
        kept = app.line_setup("own").prompts
        (recordings / "welcome.wav").write_bytes(b"RIFF broken")
        await app.reload()  # logged as prompts.load_failed; the line keeps what it had
        assert app.line_setup("own").prompts is kept
