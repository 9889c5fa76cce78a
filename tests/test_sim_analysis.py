"""Tone analysis used by simulated-call reports and end-to-end audio checks."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from voiceline.audio.g711 import ulaw_decode, ulaw_encode
from voiceline.audio.hold import hold_music
from voiceline.audio.prompts import PromptSet
from voiceline.sim.analysis import FLOOR_DB, find_sound, goertzel_db, read_wav, rms_dbfs_windows, tone_levels, wav_complete

RATE = 8000


def sine(hz: float, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * hz * np.arange(int(seconds * RATE)) / RATE)


def write_wav(path: Path, samples: np.ndarray, channels: int = 1) -> Path:
    pcm = np.round(samples * 32767).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(np.repeat(pcm, channels).tobytes())
    return path


def test_goertzel_reads_a_tone_at_its_level_and_far_above_other_frequencies() -> None:
    tone = sine(697, 1.0, amplitude=0.5)
    assert goertzel_db(tone, RATE, 697) == pytest.approx(-6.02, abs=0.1)
    assert goertzel_db(tone, RATE, 697) - goertzel_db(tone, RATE, 1209) > 60


def test_goertzel_is_accurate_off_bin_and_in_short_windows() -> None:
    tone = sine(1209.7, 0.137, amplitude=0.1)
    assert goertzel_db(tone, RATE, 1209.7) == pytest.approx(-20.0, abs=0.2)
    assert goertzel_db(tone, RATE, 697) < -80


def test_silence_reads_as_the_floor() -> None:
    silence = np.zeros(RATE)
    assert goertzel_db(silence, RATE, 1000) == FLOOR_DB
    assert goertzel_db(np.zeros(0), RATE, 1000) == FLOOR_DB
    assert rms_dbfs_windows(silence, RATE) == [FLOOR_DB, FLOOR_DB]


def test_rms_windows_follow_the_level_and_drop_a_partial_tail() -> None:
    loud, quiet = sine(440, 1.0, amplitude=1.0), sine(440, 0.5, amplitude=0.1)
    samples = np.concatenate([loud, np.zeros(RATE), quiet, np.zeros(100)])
    levels = rms_dbfs_windows(samples, RATE, window=0.5)
    assert len(levels) == 5
    assert levels[0] == pytest.approx(0.0, abs=0.05)  # full-scale sine is 0 dBFS
    assert levels[1] == pytest.approx(0.0, abs=0.05)
    assert levels[2] == levels[3] == FLOOR_DB
    assert levels[4] == pytest.approx(-20.0, abs=0.05)


def test_rms_window_must_hold_samples() -> None:
    with pytest.raises(ValueError):
        rms_dbfs_windows(np.zeros(10), RATE, window=0.0)


def test_tone_levels_analyse_a_time_window_of_a_recording(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "two.wav", np.concatenate([sine(697, 1.0), sine(1209, 1.0)]))
    first = tone_levels(path, [697, 1209], start=0.0, end=1.0)
    second = tone_levels(path, [697, 1209], start=1.0)
    assert first[697] - first[1209] > 60
    assert second[1209] - second[697] > 60
    whole = tone_levels(path, [697, 1209])
    assert whole[697] == pytest.approx(whole[1209], abs=0.5)


def test_read_wav_scales_to_unit_range_and_takes_the_first_channel(tmp_path: Path) -> None:
    samples = sine(1000, 0.25, amplitude=0.25)
    read, rate = read_wav(write_wav(tmp_path / "stereo.wav", samples, channels=2))
    assert rate == RATE
    assert len(read) == len(samples)
    np.testing.assert_allclose(read, samples, atol=1 / 32768)


def test_a_wav_is_complete_once_its_header_counts_every_byte(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "done.wav", sine(1000, 0.25, amplitude=0.25))
    assert wav_complete(path)
    recording = path.read_bytes()
    open_recorder = recording[:4] + bytes(4) + recording[8:]  # as pjmedia's recorder writes it until closed
    (tmp_path / "open.wav").write_bytes(open_recorder)
    assert not wav_complete(tmp_path / "open.wav")
    (tmp_path / "grown.wav").write_bytes(recording + bytes(320))  # more written after the header's sizes
    assert not wav_complete(tmp_path / "grown.wav")
    assert not wav_complete(tmp_path / "missing.wav")


def test_read_wav_rejects_other_sample_widths(tmp_path: Path) -> None:
    path = tmp_path / "eight.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(1)
        wav.setframerate(RATE)
        wav.writeframes(bytes(100))
    with pytest.raises(ValueError, match="16-bit"):
        read_wav(path)


def test_find_sound_places_a_prompt_under_music_through_mu_law_and_not_another_one() -> None:
    prompts = PromptSet.load("en")
    wanted, other = prompts.at("reassure_1", RATE), prompts.at("reassure_2", RATE)
    heard = hold_music()[: 12 * RATE].astype(np.float64) * 0.5  # music under it, as a leg hears it ducked
    heard[3 * RATE : 3 * RATE + len(wanted)] += wanted * 0.3  # a quiet phone
    pcm = ulaw_decode(ulaw_encode(np.clip(heard, -32768, 32767).astype(np.int16)))
    found = find_sound(pcm, wanted, RATE)
    assert len(found) == 1 and found[0][0] == pytest.approx(3.0, abs=0.01) and found[0][1] > 0.8
    assert find_sound(pcm, other, RATE) == []
    assert find_sound(pcm[: 2 * RATE], wanted, RATE) == []  # shorter than the prompt: nowhere
