"""Tone analysis of recordings: Goertzel energy per frequency and RMS levels.

Pure numpy, so tests and reports can use it without pjsua2. Levels are in dB
relative to full scale: a full-scale sine reads 0 dB in both `goertzel_db` and
`rms_dbfs_windows` (RMS per AES17: a sine, not a square wave, is the 0 dB
reference), and a sine at amplitude 0.1 reads -20 dB.
"""

from __future__ import annotations

import wave
from collections.abc import Iterable
from pathlib import Path

import numpy as np

# Stand-in for -inf (digital silence) so reports stay valid JSON.
FLOOR_DB = -200.0
_FLOOR_POWER = 10.0 ** (FLOOR_DB / 10.0)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Return the first channel of a 16-bit PCM WAV as floats in [-1, 1), and its rate."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM, got {8 * wav.getsampwidth()}-bit")
        channels = wav.getnchannels()
        rate = wav.getframerate()
        frames = wav.readframes(wav.getnframes())
    samples = np.frombuffer(frames, dtype="<i2")[::channels]
    return samples.astype(np.float64) / 32768.0, rate


def _power_db(power: float) -> float:
    return float(10.0 * np.log10(max(power, _FLOOR_POWER)))


def goertzel_db(samples: np.ndarray, rate: int, hz: float) -> float:
    """Energy of `samples` at `hz`, in dB relative to a full-scale sine at that frequency.

    A Hann window keeps a strong tone from leaking into far-away frequencies,
    so a tone reads far above the level of other frequencies even in short windows.
    """
    count = len(samples)
    if count == 0:
        return FLOOR_DB
    window = np.hanning(count)
    # Direct evaluation of the single DFT term the Goertzel recursion computes;
    # vectorised it is faster in numpy than the sample-by-sample recursion.
    phase = np.exp(-2j * np.pi * hz / rate * np.arange(count))
    term = np.dot(np.asarray(samples, dtype=np.float64) * window, phase)
    amplitude = 2.0 * abs(term) / window.sum()
    return _power_db(amplitude**2)


def tone_levels(
    path: str | Path, freqs: Iterable[float], start: float = 0.0, end: float | None = None
) -> dict[float, float]:
    """`goertzel_db` for each frequency over the seconds [start, end) of a WAV file."""
    samples, rate = read_wav(path)
    first = int(start * rate)
    last = len(samples) if end is None else int(end * rate)
    window = samples[first:last]
    return {hz: goertzel_db(window, rate, hz) for hz in freqs}


def rms_dbfs_windows(samples: np.ndarray, rate: int, window: float = 0.5) -> list[float]:
    """RMS level in dBFS (sine-referenced) of each complete `window`-second slice."""
    size = int(window * rate)
    if size <= 0:
        raise ValueError(f"window of {window} s holds no samples at {rate} Hz")
    whole = len(samples) // size
    slices = np.asarray(samples[: whole * size], dtype=np.float64).reshape(whole, size)
    # A full-scale sine has mean square 1/2: doubling makes it the 0 dB reference.
    mean_squares = 2.0 * np.mean(slices**2, axis=1)
    return [_power_db(float(power)) for power in mean_squares]


def find_sound(recording: np.ndarray, sound: np.ndarray, rate: int, threshold: float = 0.5) -> list[tuple[float, float]]:
    """Where `sound` (a prompt, at the recording's `rate`) occurs in `recording`: (seconds from the
    recording's start, normalised cross-correlation) of each place whose correlation passes
    `threshold`, best first, places closer than the sound's length counted once. 1.0 is the sound
    itself at any level; unrelated audio (music, tones, other speech) stays far below 0.5."""
    recording = np.asarray(recording, dtype=np.float64)
    sound = np.asarray(sound, dtype=np.float64)
    n = len(sound)
    if n == 0 or len(recording) < n:
        return []
    size = 1 << (len(recording) + n - 1).bit_length()
    correlation = np.fft.irfft(np.fft.rfft(recording, size) * np.conj(np.fft.rfft(sound, size)), size)[: len(recording) - n + 1]
    energy = np.concatenate(([0.0], np.cumsum(recording**2)))
    window_energy = np.maximum(energy[n:] - energy[:-n], 1e-9)
    score = correlation / (np.sqrt(window_energy) * max(float(np.linalg.norm(sound)), 1e-9))
    found: list[tuple[float, float]] = []
    for offset in np.argsort(score)[::-1]:
        if score[offset] < threshold:
            break
        if all(abs(int(offset) - round(at * rate)) >= n for at, _ in found):
            found.append((int(offset) / rate, float(score[offset])))
    return found
