"""16-bit PCM WAV files (hold audio, prompts) as mono samples, and resampling between any two rates.

Sans-I/O: `decode_wav` takes the file's bytes. Raises `ValueError` with a
short reason (safe to show: it names no caller data).
"""

from __future__ import annotations

import io
import wave

import numpy as np

from voiceline.audio.codecs import Resampler

_ANTI_ALIAS_TAPS = 101
_PASSBAND = 0.45  # of the lower rate: just under its Nyquist frequency, as the streaming resampler


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV file (mono or stereo) as mono float64 samples and its sample rate."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError):
        raise ValueError("not a PCM WAV file") from None
    if width != 2:
        raise ValueError("not 16-bit PCM")
    if channels not in (1, 2):
        raise ValueError("neither mono nor stereo")
    if rate <= 0:
        raise ValueError("no sample rate")
    frames = len(raw) // (2 * channels)  # a truncated file may end mid-frame
    if frames == 0:
        raise ValueError("no audio")
    samples = np.frombuffer(raw, dtype="<i2", count=frames * channels).reshape(frames, channels)
    return samples.mean(axis=1), rate


def _lowpass(samples: np.ndarray, cutoff: float) -> np.ndarray:
    """Windowed-sinc FIR low-pass; `cutoff` is a fraction of the sample rate."""
    n = np.arange(_ANTI_ALIAS_TAPS) - _ANTI_ALIAS_TAPS // 2
    taps = np.sinc(2 * cutoff * n) * np.hamming(_ANTI_ALIAS_TAPS)
    return np.convolve(samples, taps / taps.sum(), mode="same")


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Samples at `rate` as int16 at `target`: the streaming resampler for integer ratios
    (8, 16, 48 kHz), else anti-alias filtering and linear interpolation (44.1 kHz, 22.05 kHz...)."""
    high, low = max(rate, target), min(rate, target)
    if high % low == 0:
        pcm = np.clip(np.rint(samples), -32768, 32767).astype(np.int16)
        return Resampler(rate, target).process(pcm)
    if rate > target:  # remove what would alias below the new Nyquist frequency
        samples = _lowpass(samples, _PASSBAND * target / rate)
    count = max(1, round(len(samples) * target / rate))
    interpolated = np.interp(np.arange(count) * (rate / target), np.arange(len(samples)), samples)
    return np.clip(np.rint(interpolated), -32768, 32767).astype(np.int16)
