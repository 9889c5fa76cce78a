"""Prompt sets: the spoken prompts of one language, built in or replaced file by file by an admin.

The package ships one WAV file per prompt id for each language
(`prompt_audio/<language>/<id>.wav`, rendered from the texts in the repository's
`prompts/<language>.toml`). An admin directory holds recordings named like
them; each replaces its built-in namesake and any prompt it lacks stays the
default. Every file is checked when the set loads, and a bad one is refused
with an error naming it, so a broken recording never reaches a caller.
Prompts are kept as int16 at PROMPT_RATE and, once asked for, at the rate a
leg needs. Every prompt, built in or recorded, is brought to one level of
speech in the telephone band, so a quiet recording sounds as loud as the
rest, with its peaks kept under LIMIT_DBFS (headroom for mixing).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from functools import cache
from pathlib import Path

import numpy as np

from voiceline.audio.wavfile import decode_wav, resample

BUILT_IN = Path(__file__).resolve().parent / "prompt_audio"
PROMPT_RATE = 16000  # wideband, for G.722 and Opus legs
CONNECT_CUE = "connect_cue"  # the one prompt that is not speech: a short sound before "you're connected"
MIN_PROMPT_SECONDS, MAX_PROMPT_SECONDS = 0.1, 120.0
ACTIVE_LEVEL_DBFS = -24.0  # speech in the telephone band (its pauses left out): one loudness on any phone
TELEPHONE_BAND_HZ = (300.0, 3400.0)
KNEE_DBFS, LIMIT_DBFS = -9.0, -3.0  # peaks above the knee bend smoothly towards the limit
ACTIVE_WITHIN_DB = 25.0  # 10 ms frames this close to the loudest are speech, the rest pauses
_FULL_SCALE = 32767.0
_LANGUAGE = re.compile(r"[a-z]{2,3}(-[a-z0-9]{2,8})*")


class PromptError(ValueError):
    """A prompt set cannot load; the message names the file or directory at fault."""


def telephone_band(samples: np.ndarray, rate: int) -> np.ndarray:
    """Only what a narrowband handset plays (300-3400 Hz): the part that makes a prompt sound loud."""
    spectrum = np.fft.rfft(samples)
    frequencies = np.fft.rfftfreq(len(samples), 1 / rate)
    low, high = TELEPHONE_BAND_HZ
    spectrum[(frequencies < low) | (frequencies > high)] = 0
    return np.fft.irfft(spectrum, len(samples))


def active_level(samples: np.ndarray, rate: int) -> float:
    """The RMS of the speech: the 10 ms frames within ACTIVE_WITHIN_DB of the loudest one."""
    size = rate // 100
    padded = np.zeros(-(-len(samples) // size) * size)  # the last frame filled up with silence
    padded[: len(samples)] = samples
    frames = padded.reshape(-1, size)
    levels = np.sqrt(np.mean(frames**2, axis=1))
    active = levels[levels >= np.max(levels) * 10 ** (-ACTIVE_WITHIN_DB / 20)]
    return float(np.sqrt(np.mean(active**2)))


def level_speech(samples: np.ndarray, rate: int) -> np.ndarray:
    """`samples` (not silent) with their speech at ACTIVE_LEVEL_DBFS in the telephone band, as int16;
    peaks that would pass the knee bend (slope 1 there) and never reach LIMIT_DBFS."""
    target = _FULL_SCALE * 10 ** (ACTIVE_LEVEL_DBFS / 20)
    levelled = np.asarray(samples, dtype=np.float64) * (target / active_level(telephone_band(samples, rate), rate))
    knee, limit = (_FULL_SCALE * 10 ** (db / 20) for db in (KNEE_DBFS, LIMIT_DBFS))
    magnitude = np.abs(levelled)
    if np.max(magnitude) > limit:  # only then: a prompt within the limit keeps its exact shape
        over = magnitude > knee
        bent = knee + (limit - knee) * np.tanh((magnitude[over] - knee) / (limit - knee))
        levelled[over] = np.sign(levelled[over]) * bent
    return np.clip(np.rint(levelled), -32768, 32767).astype(np.int16)


def decode_prompt(data: bytes, name: str) -> np.ndarray:
    """A prompt file's bytes as int16 at PROMPT_RATE; `name` is what an error calls the file."""
    try:
        samples, rate = decode_wav(data)
    except ValueError as error:
        raise PromptError(f"prompt file {name}: {error}; it must be a 16-bit PCM WAV file, mono or stereo") from None
    seconds = len(samples) / rate
    if seconds > MAX_PROMPT_SECONDS:
        raise PromptError(f"prompt file {name}: {seconds:.0f} s long, over the {MAX_PROMPT_SECONDS:.0f} s a prompt may last")
    if seconds < MIN_PROMPT_SECONDS:
        raise PromptError(f"prompt file {name}: {seconds:.3f} s long, too short to say anything")
    resampled = resample(samples, rate, PROMPT_RATE)
    if not np.any(resampled):
        raise PromptError(f"prompt file {name}: silent")
    pcm = level_speech(resampled, PROMPT_RATE)
    pcm.flags.writeable = False  # shared by every leg that plays it
    return pcm


def _read_directory(directory: Path, known: Iterable[str] | None) -> dict[str, np.ndarray]:
    """Every `<id>.wav` in `directory`, decoded. Only `known` ids may appear (None: any);
    hidden files are skipped, anything else is refused."""
    if not directory.is_dir():
        raise PromptError(f"prompt directory {directory}: not found")
    names = None if known is None else set(known)
    prompts = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith("."):
            continue
        if path.suffix != ".wav" or not path.is_file() or (names is not None and path.stem not in names):
            raise PromptError(f"prompt file {path}: not a prompt name (expected <id>.wav, ids as the built-in set's)")
        prompts[path.stem] = decode_prompt(path.read_bytes(), str(path))
    return prompts


@cache
def _built_in(language: str) -> Mapping[str, np.ndarray]:
    if not _LANGUAGE.fullmatch(language) or not (BUILT_IN / language).is_dir():
        raise PromptError(f"no built-in prompts for language {language!r}")
    return _read_directory(BUILT_IN / language, None)


class PromptSet:
    """The prompts of one language: `prompt_set["welcome"]` is int16 at PROMPT_RATE."""

    def __init__(self, language: str, prompts: Mapping[str, np.ndarray], replaced: Iterable[str] = ()) -> None:
        self.language = language
        self.replaced = frozenset(replaced)  # ids an admin's recording replaces
        self._prompts = dict(prompts)
        self._at_rate: dict[tuple[str, int], np.ndarray] = {}

    @classmethod
    def load(cls, language: str = "en", directory: str | Path | None = None) -> PromptSet:
        """The built-in prompts of `language`, with those in `directory` (an admin's) instead.

        Blocking file I/O: call it at start-up or in an executor. Raises PromptError.
        """
        built_in = _built_in(language)
        replacements = _read_directory(Path(directory), built_in) if directory is not None else {}
        return cls(language, {**built_in, **replacements}, replacements)

    def __getitem__(self, prompt_id: str) -> np.ndarray:
        return self._prompts[prompt_id]

    def __contains__(self, prompt_id: object) -> bool:
        return prompt_id in self._prompts

    def __iter__(self) -> Iterator[str]:
        return iter(self._prompts)

    def __len__(self) -> int:
        return len(self._prompts)

    def at(self, prompt_id: str, rate: int) -> np.ndarray:
        """The prompt as int16 at `rate` (what a leg plays), resampled once and kept."""
        if rate == PROMPT_RATE:
            return self._prompts[prompt_id]
        key = (prompt_id, rate)
        if key not in self._at_rate:
            pcm = resample(self._prompts[prompt_id].astype(np.float64), PROMPT_RATE, rate)
            pcm.flags.writeable = False
            self._at_rate[key] = pcm
        return self._at_rate[key]

    def join(self, prompt_ids: Iterable[str], rate: int) -> np.ndarray:
        """Prompts one after another, as one: e.g. busiest_between, number_7, and, hour_22."""
        return np.concatenate([self.at(prompt_id, rate) for prompt_id in prompt_ids])
