"""DTMF digits: RFC 4733 telephone-events and in-band Goertzel detection, sans-I/O."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from voiceline.audio import dtmf as dtmf_module
from voiceline.audio.dtmf import (
    COLUMN_HZ,
    KEYPAD,
    MIN_TONE_AMPLITUDE,
    ROW_HZ,
    TelephoneEventReceiver,
    ToneDetector,
    frame_digits,
)
from voiceline.audio.hold import hold_music

RATE = 8000
FRAME = 160


def event(code: int, end: bool = False, duration: int = 400) -> bytes:
    return bytes([code, 0x8A if end else 0x0A]) + duration.to_bytes(2, "big")


def dtmf(digit: str, seconds: float, rate: int = RATE, amplitude: float = 5000.0) -> np.ndarray:
    row = next(r for r, keys in enumerate(KEYPAD) if digit in keys)
    column = KEYPAD[row].index(digit)
    t = np.arange(int(seconds * rate)) / rate
    tones = np.sin(2 * np.pi * ROW_HZ[row] * t) + np.sin(2 * np.pi * COLUMN_HZ[column] * t)
    return (amplitude * tones).astype(np.int16)


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.int16)


def detect(detector: ToneDetector, pcm: np.ndarray) -> tuple[str, int]:
    """Digits reported over `pcm` fed in frames, and how many frames counted as DTMF."""
    size = detector.frame_samples
    digits, flagged = "", 0
    for first in range(0, len(pcm) - size + 1, size):
        digit, is_dtmf = detector.feed(pcm[first : first + size])
        digits += digit or ""
        flagged += is_dtmf
    return digits, flagged


# -- RFC 4733 ------------------------------------------------------------------------


def test_one_digit_per_event_with_the_end_packet_sent_three_times() -> None:
    receiver = TelephoneEventReceiver()
    packets = [(event(11), 1000), (event(11, duration=800), 1000), (event(11, duration=1200), 1000)]
    packets += [(event(11, end=True, duration=1600), 1000)] * 3
    packets += [(event(5), 3000), (event(5, end=True), 3000), (event(5, end=True), 3000)]
    assert [receiver.feed(payload, ts) for payload, ts in packets] == ["#"] + [None] * 5 + ["5", None, None]


def test_every_key_maps_to_its_digit() -> None:
    receiver = TelephoneEventReceiver()
    assert "".join(receiver.feed(event(code), 160 * code) or "?" for code in range(16)) == "0123456789*#ABCD"


def test_a_lost_start_still_yields_the_digit_once() -> None:
    receiver = TelephoneEventReceiver()
    assert receiver.feed(event(1, end=True), 500) == "1"
    assert receiver.feed(event(1, end=True), 500) is None


def test_the_same_key_twice_is_two_digits() -> None:
    receiver = TelephoneEventReceiver()
    assert [receiver.feed(event(0), ts) for ts in (100, 100, 900, 900)] == ["0", None, "0", None]


@pytest.mark.parametrize("payload", [b"", b"\x0b\x0a", bytes([16, 0x0A, 0, 100]), bytes([200, 0x8A, 0, 1])])
def test_short_and_non_dtmf_events_are_ignored(payload: bytes) -> None:
    assert TelephoneEventReceiver().feed(payload, 1) is None


# -- in-band (Goertzel) -----------------------------------------------------------------


@pytest.mark.parametrize("digit", "0123456789*#ABCD")
def test_each_key_is_detected_once_per_press(digit: str) -> None:
    detector = ToneDetector()
    pcm = np.concatenate((silence(0.1), dtmf(digit, 0.2), silence(0.1)))
    digits, flagged = detect(detector, pcm)
    assert digits == digit
    assert flagged >= 9  # the frames of the press, which the leg mutes


def test_wideband_legs_detect_at_16_khz() -> None:
    detector = ToneDetector(16000, 320)
    digits, _ = detect(detector, np.concatenate((dtmf("#", 0.12, 16000), silence(0.1, 16000), dtmf("9", 0.12, 16000))))
    assert digits == "#9"


def test_a_sequence_with_short_gaps_and_a_repeated_key() -> None:
    pcm = np.concatenate([np.concatenate((dtmf(d, 0.07), silence(0.06))) for d in "1155#"])
    assert detect(ToneDetector(), pcm)[0] == "1155#"


def test_a_dropout_inside_one_press_is_still_one_digit() -> None:
    pcm = np.concatenate((dtmf("7", 0.1), silence(0.02), dtmf("7", 0.1)))
    assert detect(ToneDetector(), pcm)[0] == "7"


def test_a_single_frame_blip_is_not_a_digit() -> None:
    assert detect(ToneDetector(), np.concatenate((silence(0.1), dtmf("3", 0.02), silence(0.1))))[0] == ""


def test_quiet_and_twisted_tones_are_rejected() -> None:
    assert detect(ToneDetector(), dtmf("5", 0.2, amplitude=100))[0] == ""
    t = np.arange(int(0.2 * RATE)) / RATE
    twisted = 6000 * np.sin(2 * np.pi * 770 * t) + 500 * np.sin(2 * np.pi * 1336 * t)  # 21.6 dB apart
    assert detect(ToneDetector(), twisted.astype(np.int16))[0] == ""


def test_a_single_tone_is_not_a_digit() -> None:
    t = np.arange(RATE) / RATE
    assert detect(ToneDetector(), (8000 * np.sin(2 * np.pi * 697 * t)).astype(np.int16)) == ("", 0)


def speech_like(seconds: float, seed: int = 1) -> np.ndarray:
    """A voiced, gliding harmonic series (pitch 110-180 Hz) with formant-like weights and noise:
    energy near the DTMF rows and columns, but never two clean tones."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    pitch = 145 + 35 * np.sin(2 * np.pi * 1.3 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voice = sum(np.sin(k * phase) * np.exp(-(((k * 145) - 700) ** 2) / 2e5) for k in range(1, 25))
    voice += 0.6 * sum(np.sin(k * phase) * np.exp(-(((k * 145) - 1300) ** 2) / 2e5) for k in range(1, 25))
    syllables = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    signal = syllables * voice + 0.05 * rng.standard_normal(len(t))
    return (6000 * signal / np.max(np.abs(signal))).astype(np.int16)


def test_no_false_digit_on_speech_like_audio() -> None:
    for seed in range(3):
        assert detect(ToneDetector(), speech_like(5.0, seed))[0] == ""


def test_no_false_digit_on_the_hold_music() -> None:
    assert detect(ToneDetector(), np.tile(hold_music(), 3)) == ("", 0)


def test_a_press_over_speech_is_still_found() -> None:
    pcm = speech_like(0.5).astype(np.int32) // 8 + np.concatenate((silence(0.15), dtmf("#", 0.2), silence(0.15)))
    assert detect(ToneDetector(), pcm.astype(np.int16))[0] == "#"


def test_a_batch_of_many_legs_frames_finds_in_each_what_it_finds_alone() -> None:
    """The frames of one loop iteration, from many legs, measured in one pass (as the media engine
    does): each frame's digit is the one it holds on its own, keys and rejects alike."""
    twisted = dtmf("5", 0.02).astype(np.float64)
    twisted += 6 * np.sin(2 * np.pi * COLUMN_HZ[1] * np.arange(FRAME) / RATE) * 2000
    frames = [
        dtmf("1", 0.02),
        speech_like(0.02),
        dtmf("#", 0.02),
        silence(0.02),
        dtmf("D", 0.02, amplitude=100),  # too quiet
        twisted.astype(np.int16),
        hold_music()[:FRAME],
        dtmf("0", 0.02),
    ]
    alone = [ToneDetector().frame_digit(frame) for frame in frames]
    assert alone == ["1", None, "#", None, None, None, None, "0"]
    assert frame_digits(np.stack(frames), RATE) == alone
    assert frame_digits(np.zeros((0, FRAME), dtype=np.int16), RATE) == []


def _each_frame_judged(frames: np.ndarray) -> list[str | None]:
    """`frame_digits` without its vectorised screen: every frame's eight powers judged by `_digit`."""
    samples = frames.astype(np.float32)
    matrix, min_power = dtmf_module._probe(RATE, FRAME, np.float32)
    terms = samples @ matrix
    powers = (terms * terms).reshape(len(frames), 2, 8).sum(axis=1).tolist()
    energies = np.einsum("ij,ij->i", samples, samples).tolist()
    return [dtmf_module._digit(power, energy, FRAME, min_power) for power, energy in zip(powers, energies)]


def test_the_vectorised_screen_never_changes_a_verdict() -> None:
    """Most frames are let through by a cheap screen on all of a batch at once; frames at the very
    edges of the rules (just loud enough, just the tones' share of the energy, speech) are judged
    as they are without it."""
    rng = np.random.default_rng(7)
    frames = []
    for amplitude in np.linspace(0.9, 1.1, 21) * MIN_TONE_AMPLITUDE:  # across the loudness bound
        frames.append(dtmf("5", 0.02, amplitude=amplitude))
    for noise in np.linspace(0.2, 1.4, 41):  # across the tones' share of the energy
        tone = dtmf("9", 0.02, amplitude=2000).astype(np.float64)
        frames.append((tone + rng.normal(0, noise * 2000 / np.sqrt(2), FRAME)).astype(np.int16))
    frames += [speech_like(0.02, seed) for seed in range(20)] + [hold_music()[i : i + FRAME] for i in range(0, 20 * FRAME, FRAME)]
    stacked = np.stack(frames).astype(np.float32)
    expected = _each_frame_judged(stacked)
    assert frame_digits(stacked, RATE) == expected
    assert 5 < expected.count("5") < 21 and 5 < expected.count("9") < 41  # the edges were crossed


def _other_threads_cpu_ticks() -> int:
    """CPU clock ticks (user + system) of every thread of this process but the calling one."""
    calling, ticks = threading.get_native_id(), 0
    for task in Path("/proc/self/task").iterdir():
        if int(task.name) != calling:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks


@pytest.mark.parametrize("dtype", [np.float32, np.int16])  # the media engine's batch, and any other caller's
def test_a_large_batch_is_measured_on_the_calling_thread_alone(dtype: type[np.generic]) -> None:
    """A loaded server checks batches of hundreds of frames. Measured by one BLAS product they were
    split across its worker threads, which, outranked on the other core by real-time processes,
    kept the relay waiting for up to a scheduler time slice (100 ms) at a time."""
    frames = np.tile(speech_like(0.02), (1000, 1)).astype(dtype)
    frame_digits(frames, RATE)
    before = _other_threads_cpu_ticks()
    for _ in range(300):
        frame_digits(frames, RATE)
    assert _other_threads_cpu_ticks() - before <= 2  # through BLAS: about 20 (10 ms ticks)
