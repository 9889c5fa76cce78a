"""Hold audio: the built-in chime pattern or a WAV file, cut into encoded 20 ms frames.

A caller waiting in the pool must be able to tell the line is alive, so the
built-in pattern is never silent: a soft pad runs under a calm two-note chime.
Every tone keeps well away from the DTMF and test tones (697-1477 Hz).
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from voiceline.audio.codecs import Resampler, new_coder
from voiceline.codec_table import Codec

SAMPLE_RATE = 8000
CYCLE_SECONDS = 3.0
CHIME_HZ = (523.25, 392.0)  # C5 then G4: a gentle descending "ding-dong"
CHIME_START_SECONDS = (0.0, 0.55)
PAD_HZ = 330.0  # E4; a whole number of cycles per pattern, so the loop joins without a click
PEAK_DBFS = -16.0
PAD_LEVEL = 0.1  # relative to the chime, about -20 dB

_NOTE_SECONDS = 2.0
_ATTACK_SECONDS = 0.015
_DECAY_SECONDS = 0.45
_RELEASE_SECONDS = 0.1
_FULL_SCALE = 32767.0

_UNSUPPORTED_WAV = "hold audio must be a non-empty 16-bit PCM WAV file, mono or stereo"
_RESAMPLE_TAPS = 101
_RESAMPLE_CUTOFF_HZ = 3600.0


def _note(frequency: float, rate: int) -> np.ndarray:
    """One soft bell-like note: quick smooth attack, exponential decay, and a fade to exactly zero."""
    t = np.arange(int(_NOTE_SECONDS * rate)) / rate
    attack = np.sin(0.5 * np.pi * np.minimum(t / _ATTACK_SECONDS, 1.0)) ** 2
    release = np.sin(0.5 * np.pi * np.minimum((_NOTE_SECONDS - t) / _RELEASE_SECONDS, 1.0)) ** 2
    return np.sin(2 * np.pi * frequency * t) * attack * np.exp(-t / _DECAY_SECONDS) * release


def chime_pattern(rate: int = SAMPLE_RATE) -> np.ndarray:
    """One cycle of the built-in hold audio (loop it), as int16 at `rate`."""
    length = int(CYCLE_SECONDS * rate)
    t = np.arange(length) / rate
    breathing = 0.75 + 0.25 * np.cos(2 * np.pi * t / CYCLE_SECONDS)  # slow swell, also loops cleanly
    pattern = PAD_LEVEL * breathing * np.sin(2 * np.pi * PAD_HZ * t)
    for frequency, start in zip(CHIME_HZ, CHIME_START_SECONDS):
        note = _note(frequency, rate)
        first = int(start * rate)
        pattern[first : first + len(note)] += note
    peak = _FULL_SCALE * 10 ** (PEAK_DBFS / 20)
    return np.rint(pattern * (peak / np.max(np.abs(pattern)))).astype(np.int16)


def _lowpass(samples: np.ndarray, cutoff: float) -> np.ndarray:
    """Windowed-sinc FIR low-pass; `cutoff` is a fraction of the sample rate."""
    n = np.arange(_RESAMPLE_TAPS) - _RESAMPLE_TAPS // 2
    taps = np.sinc(2 * cutoff * n) * np.hamming(_RESAMPLE_TAPS)
    return np.convolve(samples, taps / taps.sum(), mode="same")


def _resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """Resample float samples from `rate` to SAMPLE_RATE by linear interpolation."""
    if rate == SAMPLE_RATE:
        return samples
    if rate > SAMPLE_RATE:  # remove what would alias below 4 kHz
        samples = _lowpass(samples, _RESAMPLE_CUTOFF_HZ / rate)
    count = max(1, round(len(samples) * SAMPLE_RATE / rate))
    return np.interp(np.arange(count) * (rate / SAMPLE_RATE), np.arange(len(samples)), samples)


def load_wav(path: str | Path) -> np.ndarray:
    """A 16-bit PCM WAV file (mono or stereo, any rate) as 8 kHz mono int16.

    Blocking file I/O: call it at start-up or in an executor.
    """
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError):
        raise ValueError(_UNSUPPORTED_WAV) from None
    if width != 2 or channels not in (1, 2) or rate <= 0:
        raise ValueError(_UNSUPPORTED_WAV)
    frames = len(raw) // (2 * channels)  # a truncated file may end mid-frame
    if frames == 0:
        raise ValueError(_UNSUPPORTED_WAV)
    samples = np.frombuffer(raw, dtype="<i2", count=frames * channels).reshape(frames, channels)
    mono = _resample(samples.mean(axis=1), rate)
    return np.clip(np.rint(mono), -32768, 32767).astype(np.int16)


def encode_frames(pcm: np.ndarray, codec: Codec, samples_per_frame: int | None = None) -> list[bytes]:
    """8 kHz `pcm` as payloads of `codec` (resampled to its rate), `samples_per_frame` 8 kHz samples
    each (default 20 ms), the last padded with silence. One coder encodes them in sequence, so the
    frames play back to back."""
    size = (samples_per_frame or SAMPLE_RATE // 50) * codec.rate // SAMPLE_RATE
    if codec.rate != SAMPLE_RATE:
        pcm = Resampler(SAMPLE_RATE, codec.rate).process(pcm)
    frames = -(-len(pcm) // size)
    padded = np.zeros(frames * size, dtype=np.int16)
    padded[: len(pcm)] = pcm
    coder = new_coder(codec)
    return [coder.encode(padded[i : i + size]) for i in range(0, len(padded), size)]
