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
# find_sound: how much around an excluded tone is taken out; the pieces a sound is matched in, how far
# each may slip against the one before, and how many starting places are tried.
EXCLUDE_WIDTH_HZ = 25.0
CHUNK_SECONDS, SLIP_SECONDS = 0.5, 0.03
MAX_CANDIDATES = 20
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


def wav_complete(path: str | Path) -> bool:
    """Whether a WAV file's RIFF header counts all the bytes written: a recorder that is still open
    (or being closed) has not written its final sizes yet."""
    try:
        with open(path, "rb") as wav:
            head = wav.read(8)
        size = Path(path).stat().st_size
    except OSError:
        return False
    return len(head) == 8 and head[:4] == b"RIFF" and int.from_bytes(head[4:], "little") == size - 8


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


def _normalised_correlation(signal: np.ndarray, piece: np.ndarray) -> np.ndarray:
    """For each offset of `piece` inside `signal` (both filtered alike): their normalised correlation."""
    n = len(piece)
    size = 1 << (len(signal) + n - 1).bit_length()
    correlation = np.fft.irfft(np.fft.rfft(signal, size) * np.conj(np.fft.rfft(piece, size)), size)[: len(signal) - n + 1]
    energy = np.concatenate(([0.0], np.cumsum(signal**2)))
    scores: np.ndarray = correlation / (np.sqrt(np.maximum(energy[n:] - energy[:-n], 1e-9)) * max(float(np.linalg.norm(piece)), 1e-9))
    return scores


def _without(samples: np.ndarray, rate: int, exclude_hz: Iterable[float]) -> np.ndarray:
    spectrum = np.fft.rfft(samples)
    frequencies = np.fft.rfftfreq(len(samples), 1 / rate)
    for hz in exclude_hz:
        spectrum[np.abs(frequencies - hz) <= EXCLUDE_WIDTH_HZ] = 0
    return np.fft.irfft(spectrum, len(samples))


def find_sound(
    recording: np.ndarray, sound: np.ndarray, rate: int, threshold: float = 0.5, exclude_hz: Iterable[float] = ()
) -> list[tuple[float, float]]:
    """Where `sound` (a prompt, at the recording's `rate`) occurs in `recording`: (seconds from the
    recording's start, score) of each place whose score passes `threshold`, best first, places closer
    than the sound's length counted once.

    The score is the normalised cross-correlation of the sound with the recording, taken in
    CHUNK_SECONDS pieces that may each slip by up to SLIP_SECONDS against the one before (a phone's
    jitter buffer drops and repeats a little audio), weighted by each piece's energy: 1.0 is the
    sound itself at any level; unrelated audio (music, tones, other speech) stays far below 0.5.
    A sound cut short by the recording's end still counts. `exclude_hz`: tones (a caller's own, a
    partner's) taken out of both first, so speech mixed over them is found as well."""
    n = len(sound)
    if n == 0 or len(recording) == 0:
        return []
    padded = np.concatenate((np.asarray(recording, dtype=np.float64), np.zeros(n)))  # a sound cut short counts
    wanted = np.asarray(sound, dtype=np.float64)
    exclude = tuple(exclude_hz)
    if exclude:
        padded, wanted = _without(padded, rate, exclude), _without(wanted, rate, exclude)
    size, slip = max(1, round(CHUNK_SECONDS * rate)), round(SLIP_SECONDS * rate)
    chunks = [wanted[first : first + size] for first in range(0, n, size)]
    weights = np.array([float(np.sum(chunk**2)) for chunk in chunks])
    if not weights.sum():
        return []
    weights /= weights.sum()
    energy = np.concatenate(([0.0], np.cumsum(padded**2)))
    first = _normalised_correlation(padded, chunks[0])
    found: list[tuple[float, float]] = []
    tried: list[int] = []
    for start in np.argsort(first)[::-1]:
        if first[start] < threshold / 2 or len(tried) >= MAX_CANDIDATES:
            break
        if any(abs(int(start) - other) < n for other in tried):
            continue
        tried.append(int(start))
        score, at = weights[0] * float(first[start]), int(start)
        for chunk, weight in zip(chunks[1:], weights[1:]):
            at += size
            low, high = max(0, at - slip), min(len(padded) - len(chunk), at + slip)
            if high < low:
                break
            segment = padded[low : high + len(chunk)]
            correlation = np.correlate(segment, chunk, "valid")
            windows = np.sqrt(np.maximum(energy[low + len(chunk) : high + len(chunk) + 1] - energy[low : high + 1], 1e-9))
            scores = correlation / (windows * max(float(np.linalg.norm(chunk)), 1e-9))
            best = int(np.argmax(scores))
            score += weight * float(scores[best])
            at = low + best
        if score >= threshold:
            found.append((int(start) / rate, float(score)))
    return sorted(found, key=lambda place: -place[1])
