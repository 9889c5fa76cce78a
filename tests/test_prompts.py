"""Prompt sets: the shipped prompts, an admin's replacements, refusal of bad files, rates and levels."""

from __future__ import annotations

import tomllib
import wave
from pathlib import Path

import numpy as np
import pytest

from voiceline.audio.prompts import (
    ACTIVE_LEVEL_DBFS,
    BUILT_IN,
    CONNECT_CUE,
    LIMIT_DBFS,
    MAX_PROMPT_SECONDS,
    PROMPT_RATE,
    PromptError,
    PromptSet,
    active_level,
    telephone_band,
)

TEXTS = Path(__file__).resolve().parent.parent / "prompts" / "en.toml"

# What the caller's journey says at each step (the talk/listen choice, the keys help and the
# busiest hours are spoken as several prompts one after another).
JOURNEY = (
    "welcome",
    "skip_welcome_hint",
    "keys_intro",
    "key_someone_else",
    "key_talk",
    "key_listen",
    "key_keys_again",
    "key_help",
    "key_report",
    "hang_up_to_leave",
    "preference_or_wait",
    "preference_talk",
    "preference_listen",
    "reassure_1",
    "reassure_2",
    "reassure_3",
    "quiet_line",
    "busiest_between",
    "and",
    "max_wait_goodbye",
    "goodbye",
    CONNECT_CUE,
    "connected",
    "partner_left",
    "looking_for_someone_new",
    "nobody_else_here",
    "talk_time_warning",
    "talk_time_over",
    "end_of_talk_choice",
    "end_of_talk_or_hang_up",
    "help_message",
    "report_thanks",
    "cooldown",
    "stepped_away",
    "line_dropped",
    "closed",
    "key_star",
    "key_hash",
    *(f"number_{number}" for number in range(13)),  # the digit keys, and hours

    *(f"hour_{hour}" for hour in range(24)),
)


def dbfs(level: float) -> float:
    return float(20 * np.log10(level / 32767))


def band_fraction(pcm: np.ndarray, rate: int, low: float, high: float) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64))) ** 2
    frequencies = np.fft.rfftfreq(len(pcm), 1 / rate)
    return float(spectrum[(frequencies >= low) & (frequencies <= high)].sum() / spectrum.sum())


def speech_level(pcm: np.ndarray, rate: int = PROMPT_RATE) -> float:
    return dbfs(active_level(telephone_band(pcm.astype(np.float64), rate), rate))


def write_wav(path: Path, samples: np.ndarray, rate: int, channels: int = 1, width: int = 2) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(samples.tobytes())
    return path


def syllables(rate: int, seconds: float, hz: float = 500.0, amplitude: float = 3000.0) -> np.ndarray:
    """Speech-like test audio: a tone rising and falling four times a second, like syllables."""
    t = np.arange(int(seconds * rate)) / rate
    envelope = np.sin(np.pi * 4 * t) ** 2
    return np.rint(amplitude * envelope * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def peak_hz(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64)))
    return float(np.fft.rfftfreq(len(pcm), 1 / rate)[np.argmax(spectrum)])


@pytest.fixture(scope="module")
def default() -> PromptSet:
    return PromptSet.load("en")


# -- the shipped English prompts ---------------------------------------------------


def test_every_prompt_the_journey_needs_is_shipped(default: PromptSet) -> None:
    assert set(JOURNEY) <= set(default)
    assert not default.replaced


def test_every_text_is_rendered_and_every_file_has_a_text(default: PromptSet) -> None:
    with open(TEXTS, "rb") as file:
        texts = tomllib.load(file)["prompts"]
    assert set(default) == set(texts) | {CONNECT_CUE}
    assert all(text.strip() for text in texts.values())
    assert {path.stem for path in (BUILT_IN / "en").glob("*.wav")} == set(default)


@pytest.mark.parametrize("prompt_id", JOURNEY)
def test_each_prompt_is_speech_like_audio_at_one_level(default: PromptSet, prompt_id: str) -> None:
    pcm = default[prompt_id]
    assert pcm.dtype == np.int16 and not pcm.flags.writeable
    seconds = len(pcm) / PROMPT_RATE
    assert 0.3 <= seconds <= (12.0 if prompt_id in ("welcome", "help_message") else 8.0)
    assert band_fraction(pcm, PROMPT_RATE, 300, 3400) > 0.1  # what a phone plays carries it
    assert abs(speech_level(pcm) - ACTIVE_LEVEL_DBFS) < 0.5  # every prompt equally loud on the phone
    assert dbfs(np.max(np.abs(pcm.astype(np.int32)))) <= LIMIT_DBFS  # headroom for mixing
    assert abs(int(pcm[0])) < 100 and abs(int(pcm[-1])) < 100  # faded: no click
    if prompt_id != CONNECT_CUE:  # speech rises and falls, syllable by syllable; a tone or noise would not
        frames = pcm[: len(pcm) // 160 * 160].astype(np.float64).reshape(-1, 160)
        levels = 20 * np.log10(np.sqrt(np.mean(frames**2, axis=1)) + 1)
        assert np.percentile(levels, 90) - np.percentile(levels, 10) > 15
        assert band_fraction(pcm, PROMPT_RATE, 1000, 4000) > 0.002  # consonants and formants, not a hum


def test_the_connect_cue_is_two_soft_notes_clear_of_dtmf(default: PromptSet) -> None:
    cue = default[CONNECT_CUE]
    assert len(cue) < PROMPT_RATE  # short: then "you're connected"
    assert band_fraction(cue, PROMPT_RATE, 480, 510) + band_fraction(cue, PROMPT_RATE, 645, 675) > 0.8
    for dtmf in (697, 770, 852, 941, 1209, 1336, 1477):
        assert band_fraction(cue, PROMPT_RATE, dtmf - 15, dtmf + 15) < 1e-3


def test_unknown_or_odd_languages_are_refused() -> None:
    for language in ("xx", "../en", "EN", ""):
        with pytest.raises(PromptError, match="no built-in prompts for language"):
            PromptSet.load(language)


# -- rates -------------------------------------------------------------------------


def test_a_prompt_at_8_khz_is_the_same_speech_at_half_the_samples(default: PromptSet) -> None:
    wide = default["welcome"]
    narrow = default.at("welcome", 8000)
    assert narrow is default.at("welcome", 8000)  # resampled once, then kept
    assert default.at("welcome", PROMPT_RATE) is wide
    assert abs(len(narrow) - len(wide) // 2) <= 1 and narrow.dtype == np.int16 and not narrow.flags.writeable
    # The same speech: the telephone band of both lines up sample for sample (allowing the filter's delay).
    wide_band = telephone_band(wide.astype(np.float64), PROMPT_RATE)[::2]
    narrow_band = telephone_band(narrow.astype(np.float64), 8000)
    best = max(
        float(np.corrcoef(wide_band[: len(narrow_band) - 20], narrow_band[shift : len(narrow_band) - 20 + shift])[0, 1])
        for shift in range(20)
    )
    assert best > 0.98


def test_joined_prompts_play_one_after_another(default: PromptSet) -> None:
    parts = ("busiest_between", "number_7", "and", "hour_22")
    joined = default.join(parts, 8000)
    assert np.array_equal(joined, np.concatenate([default.at(part, 8000) for part in parts]))


# -- an admin's recordings ---------------------------------------------------------


def test_a_recording_replaces_its_namesake_and_the_rest_stay_default(tmp_path: Path, default: PromptSet) -> None:
    left = syllables(44100, 2.0, hz=440.0)
    stereo = np.column_stack([left, left]).ravel()
    write_wav(tmp_path / "welcome.wav", stereo, 44100, channels=2)
    write_wav(tmp_path / "goodbye.wav", syllables(8000, 1.0, hz=600.0), 8000)
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")  # hidden files are not prompts
    own = PromptSet.load("en", tmp_path)
    assert own.replaced == {"welcome", "goodbye"}
    assert set(own) == set(default)
    assert abs(len(own["welcome"]) - 2 * PROMPT_RATE) <= 1  # resampled from 44.1 kHz
    assert abs(peak_hz(own["welcome"], PROMPT_RATE) - 440) < 2
    assert abs(len(own["goodbye"]) - PROMPT_RATE) <= 1  # from 8 kHz
    assert abs(peak_hz(own["goodbye"], PROMPT_RATE) - 600) < 2
    for prompt_id in set(default) - own.replaced:
        assert own[prompt_id] is default[prompt_id]  # a missing file: the default


def test_an_empty_directory_changes_nothing(tmp_path: Path, default: PromptSet) -> None:
    own = PromptSet.load("en", tmp_path)
    assert not own.replaced and all(own[prompt_id] is default[prompt_id] for prompt_id in default)


def test_a_quiet_recording_is_brought_to_the_level_of_the_others(tmp_path: Path) -> None:
    write_wav(tmp_path / "connected.wav", syllables(16000, 1.5, amplitude=300.0), 16000)  # about -40 dBFS
    own = PromptSet.load("en", tmp_path)
    assert abs(speech_level(own["connected"]) - ACTIVE_LEVEL_DBFS) < 0.5


def test_a_loud_recording_keeps_its_peaks_under_the_limit(tmp_path: Path) -> None:
    loud = syllables(16000, 1.5, amplitude=32000.0)
    loud[::400] = 32767  # clicks well above the speech: levelled, they would clip
    write_wav(tmp_path / "connected.wav", loud, 16000)
    own = PromptSet.load("en", tmp_path)
    assert dbfs(np.max(np.abs(own["connected"].astype(np.int32)))) <= LIMIT_DBFS


def _not_a_wav(path: Path) -> None:
    path.write_bytes(b"ID3\x03 this is an mp3, honestly")


def _eight_bit(path: Path) -> None:
    write_wav(path, np.full(800, 128, dtype=np.uint8), 8000, width=1)


def _three_channels(path: Path) -> None:
    write_wav(path, np.zeros(2400, dtype=np.int16), 8000, channels=3)


def _empty(path: Path) -> None:
    write_wav(path, np.zeros(0, dtype=np.int16), 8000)


def _silent(path: Path) -> None:
    write_wav(path, np.zeros(8000, dtype=np.int16), 8000)


def _too_short(path: Path) -> None:
    write_wav(path, np.array([8000, -8000, 8000], dtype=np.int16), 8000)


def _too_long(path: Path) -> None:
    write_wav(path, syllables(4000, MAX_PROMPT_SECONDS + 1), 4000)


def _truncated(path: Path) -> None:
    write_wav(path, syllables(8000, 0.5), 8000)
    path.write_bytes(path.read_bytes()[:30])


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_not_a_wav, "not a PCM WAV file"),
        (_eight_bit, "not 16-bit PCM"),
        (_three_channels, "neither mono nor stereo"),
        (_empty, "no audio"),
        (_silent, "silent"),
        (_too_short, "s long, too short"),
        (_too_long, "s long, over the 120 s"),
        (_truncated, "not a PCM WAV file"),
    ],
)
def test_a_bad_recording_is_refused_at_load_naming_the_file(tmp_path: Path, make, reason: str) -> None:
    write_wav(tmp_path / "welcome.wav", syllables(8000, 1.0), 8000)  # a good one beside it
    bad = tmp_path / "partner_left.wav"
    make(bad)
    with pytest.raises(PromptError) as refused:
        PromptSet.load("en", tmp_path)
    assert str(bad) in str(refused.value) and reason in str(refused.value)


@pytest.mark.parametrize("name", ["welcom.wav", "welcome.mp3", "Welcome.wav", "welcome.wav.bak", "notes.txt"])
def test_a_file_with_a_wrong_name_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    write_wav(tmp_path / name, syllables(8000, 1.0), 8000)
    with pytest.raises(PromptError) as refused:
        PromptSet.load("en", tmp_path)
    assert str(tmp_path / name) in str(refused.value) and "not a prompt name" in str(refused.value)


def test_a_missing_directory_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match=f"prompt directory {tmp_path / 'none'}: not found"):
        PromptSet.load("en", tmp_path / "none")
