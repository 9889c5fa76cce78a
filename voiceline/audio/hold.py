"""Hold audio: the built-in music or a WAV file, cut into encoded 20 ms frames.

The built-in music is made here, so it is ours to ship: a slow progression
of soft pads over a steady pedal note, with a gentle melody, 48 s before it
repeats. A caller waiting in the pool must be able to tell the line is alive,
so the pedal never stops. Every partial lies in the telephone band and keeps
clear of the DTMF and test tones, so echoed music never reads as a digit.
Each note is rendered onto a circular buffer, so the loop joins exactly as
the music would continue: no click at the seam.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from voiceline.audio.codecs import Resampler, new_coder
from voiceline.audio.wavfile import decode_wav, resample
from voiceline.codec_table import Codec

SAMPLE_RATE = 8000
PAD_HZ = 330.0  # the pedal (E4, 2 cents sharp): 15840 whole cycles per loop, always sounding
BAR_SECONDS = 6.0
BEAT_SECONDS = BAR_SECONDS / 4
PEAK_DBFS = -20.0  # well below the prompts' speech (about -20 dBFS RMS), so they mix over it
TELEPHONE_BAND_HZ = (300.0, 3400.0)
AVOIDED_HZ = (697, 770, 852, 941, 1209, 1336, 1477, 1633, 1000, 1500)  # DTMF rows, columns; test tones
AVOID_FRACTION = 0.035  # a DTMF receiver must reject a tone this far off (ITU-T Q.24)

# One chord per bar (MIDI note numbers, E4 = 64), voiced between F#4 and F#5 over the pedal:
# E add9, C#m7, A maj7, B sus4, G#m7, C#m9, A add9, B7 sus4.
CHORDS = (
    (68, 71, 78),
    (68, 71, 73, 76),
    (68, 69, 73, 76),
    (66, 71, 76),
    (68, 71, 75, 78),
    (68, 71, 73, 75),
    (69, 71, 73, 76),
    (66, 69, 71, 76),
)
# The melody: (bar, beat, MIDI note, beats), in E major's pentatonic notes that stay clear of DTMF.
MELODY = (
    (0, 0, 71, 2), (0, 2, 73, 1), (0, 3, 76, 1),
    (1, 0, 76, 2), (1, 2, 73, 2),
    (2, 0, 73, 1), (2, 1, 71, 1), (2, 2, 69, 2),
    (3, 0, 71, 3),
    (4, 0, 75, 2), (4, 2, 78, 1), (4, 3, 76, 1),
    (5, 0, 73, 2), (5, 2, 71, 1), (5, 3, 68, 1),
    (6, 0, 69, 1.5), (6, 1.5, 71, 1.5), (6, 3, 73, 1),
    (7, 0, 71, 4),
)  # fmt: skip
LOOP_SECONDS = BAR_SECONDS * len(CHORDS)

_PAD_HARMONICS = ((1, 1.0), (2, 0.25), (3, 0.08))  # soft, mostly fundamental
_MELODY_HARMONICS = ((1, 1.0), (2, 0.3), (3, 0.1), (4, 0.04))  # a little brighter than the pads
_PAD_DETUNE = 0.0015  # two voices a few cents apart: a slow, warm beating
_PAD_FADE_SECONDS = 1.5  # pads swell in and out, overlapping the next chord
_MELODY_ATTACK_SECONDS = 0.06
_MELODY_DECAY_SECONDS = 1.2
_PEDAL_SWELL_BARS = 1  # the pedal breathes once a bar
_PEDAL_LEVEL, _PAD_LEVEL, _MELODY_LEVEL = 0.16, 0.11, 0.3  # before the whole is scaled to PEAK_DBFS
_FULL_SCALE = 32767.0

_UNSUPPORTED_WAV = "hold audio must be a non-empty 16-bit PCM WAV file, mono or stereo"


def note_hz(midi: float) -> float:
    """Equal temperament tuned to the pedal: E4 (MIDI 64) is PAD_HZ."""
    return PAD_HZ * 2 ** ((midi - 64) / 12)


def clear_partial(frequency: float) -> bool:
    """Whether a partial may sound: in the telephone band and clear of every avoided tone."""
    low, high = TELEPHONE_BAND_HZ
    return low <= frequency <= high and all(abs(frequency - hz) > AVOID_FRACTION * hz for hz in AVOIDED_HZ)


def _tone(frequency: float, harmonics: tuple[tuple[int, float], ...], t: np.ndarray) -> np.ndarray:
    """The clear partials of one note."""
    wave = np.zeros(len(t))
    for multiple, level in harmonics:
        if clear_partial(frequency * multiple):
            wave += level * np.sin(2 * np.pi * frequency * multiple * t)
    return wave


def _pad_note(frequency: float, seconds: float, rate: int) -> np.ndarray:
    """A sustained pad voice: two slightly detuned tones under a raised-cosine swell in and out."""
    t = np.arange(int(seconds * rate)) / rate
    swell = np.minimum(np.minimum(t, seconds - t) / _PAD_FADE_SECONDS, 1.0)
    envelope = np.sin(0.5 * np.pi * swell) ** 2
    voices = _tone(frequency * (1 - _PAD_DETUNE), _PAD_HARMONICS, t) + _tone(
        frequency * (1 + _PAD_DETUNE), _PAD_HARMONICS, t
    )
    return 0.5 * voices * envelope


def soft_note(frequency: float, seconds: float, rate: int) -> np.ndarray:
    """A soft struck note: smooth attack, slow exponential decay, a smooth end at exactly zero."""
    t = np.arange(int(seconds * rate)) / rate
    attack = np.sin(0.5 * np.pi * np.minimum(t / _MELODY_ATTACK_SECONDS, 1.0)) ** 2
    release = np.sin(0.5 * np.pi * np.minimum((seconds - t) / (0.25 * seconds), 1.0)) ** 2
    return _tone(frequency, _MELODY_HARMONICS, t) * attack * release * np.exp(-t / _MELODY_DECAY_SECONDS)


def _add_circular(loop: np.ndarray, sound: np.ndarray, start: int) -> None:
    """Mix `sound` into `loop` from `start`, wrapping past the end to the beginning."""
    positions = (start + np.arange(len(sound))) % len(loop)
    np.add.at(loop, positions, sound)


@cache
def _music(rate: int) -> np.ndarray:
    loop = np.zeros(int(LOOP_SECONDS * rate))
    t = np.arange(len(loop)) / rate
    swell_period = _PEDAL_SWELL_BARS * BAR_SECONDS  # whole swells per loop, so the pedal joins too
    loop += _PEDAL_LEVEL * (0.8 + 0.2 * np.cos(2 * np.pi * t / swell_period)) * np.sin(2 * np.pi * PAD_HZ * t)
    for bar, chord in enumerate(CHORDS):
        start = int((bar * BAR_SECONDS - _PAD_FADE_SECONDS / 2) * rate) % len(loop)
        for midi in chord:
            _add_circular(loop, _PAD_LEVEL * _pad_note(note_hz(midi), BAR_SECONDS + _PAD_FADE_SECONDS, rate), start)
    for bar, beat, midi, beats in MELODY:
        start = int((bar * BAR_SECONDS + beat * BEAT_SECONDS) * rate)
        seconds = beats * BEAT_SECONDS + 1.0  # rings on a little into the next note
        _add_circular(loop, _MELODY_LEVEL * soft_note(note_hz(midi), seconds, rate), start)
    peak = _FULL_SCALE * 10 ** (PEAK_DBFS / 20)
    music = np.rint(loop * (peak / np.max(np.abs(loop)))).astype(np.int16)
    music.flags.writeable = False  # shared by every caller of hold_music
    return music


def hold_music(rate: int = SAMPLE_RATE) -> np.ndarray:
    """The built-in hold music, one loop of it (play it round and round), as int16 at `rate`.

    Made once per rate and shared (read-only).
    """
    return _music(rate)


@cache
def ringback(frequencies: tuple[float, ...], on: float, period: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    """One period of a ringing tone (`frequencies` together, `on` seconds of tone, then silence), as
    int16 at `rate`: play it round and round. Made once per tone and shared (read-only)."""
    t = np.arange(int(on * rate)) / rate
    tone = sum((np.sin(2 * np.pi * hz * t) for hz in frequencies), np.zeros(len(t)))
    ramp = min(len(t) // 2, int(0.01 * rate))  # 10 ms edges: no clicks
    if ramp:
        edge = np.linspace(0.0, 1.0, ramp)
        tone[:ramp] *= edge
        tone[len(t) - ramp :] *= edge[::-1]
    loop = np.zeros(int(period * rate), dtype=np.int16)
    loop[: len(t)] = np.rint(tone * (0.25 * 32767 / max(1, len(frequencies)))).astype(np.int16)
    loop.flags.writeable = False
    return loop


def load_wav(path: str | Path) -> np.ndarray:
    """A 16-bit PCM WAV file (mono or stereo, any rate) as 8 kHz mono int16.

    Blocking file I/O: call it at start-up or in an executor.
    """
    try:
        samples, rate = decode_wav(Path(path).read_bytes())
    except ValueError:
        raise ValueError(_UNSUPPORTED_WAV) from None
    return resample(samples, rate, SAMPLE_RATE)


class EncodedLoop:
    """8 kHz `pcm` as payloads of `codec` (resampled to its rate), `samples_per_frame` 8 kHz samples
    each (default 20 ms), the last padded with silence. One coder encodes them in sequence, so the
    frames play back to back.

    Frames are encoded the first time they are asked for, in order: the hold pacer asks for one
    per tick, so a long loop in a costly codec (48 s of Opus takes about half a second) never
    stalls the event loop at once.
    """

    def __init__(self, pcm: np.ndarray, codec: Codec, samples_per_frame: int | None = None) -> None:
        self._size = (samples_per_frame or SAMPLE_RATE // 50) * codec.rate // SAMPLE_RATE
        if codec.rate != SAMPLE_RATE:
            pcm = Resampler(SAMPLE_RATE, codec.rate).process(pcm)
        self._padded = np.zeros(-(-len(pcm) // self._size) * self._size, dtype=np.int16)
        self._padded[: len(pcm)] = pcm
        self._coder = new_coder(codec)
        self._frames: list[bytes] = []

    def __len__(self) -> int:
        return len(self._padded) // self._size

    def __getitem__(self, index: int) -> bytes:
        if not 0 <= index < len(self):
            raise IndexError(index)
        size = self._size
        while len(self._frames) <= index:
            start = len(self._frames) * size
            self._frames.append(self._coder.encode(self._padded[start : start + size]))
        return self._frames[index]


def encode_frames(pcm: np.ndarray, codec: Codec, samples_per_frame: int | None = None) -> list[bytes]:
    """Every frame of an `EncodedLoop` at once."""
    loop = EncodedLoop(pcm, codec, samples_per_frame)
    return [loop[index] for index in range(len(loop))]
