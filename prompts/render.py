"""Render the prompt texts (prompts/<language>.toml) to the WAV files the package ships.

    python prompts/render.py [--language en] [--voice festival-slt-hts] [--out DIR] [ID ...]

Each text is synthesised, resampled to 16 kHz mono 16-bit (wideband for
G.722 and Opus callers; narrowband legs take it down to 8 kHz), trimmed to
the speech with a short margin, brought to the one level of speech every
prompt has (`voiceline.audio.prompts.level_speech`), and faded in and out.
The connect cue is not speech: it is two soft notes made here. `make prompts` runs this; the
result is committed, so the service never needs a synthesiser.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import tomllib
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np

from voiceline.audio.hold import note_hz, soft_note
from voiceline.audio.prompts import BUILT_IN, CONNECT_CUE, PROMPT_RATE, level_speech
from voiceline.audio.wavfile import decode_wav, resample

TEXTS = Path(__file__).resolve().parent
SILENCE_BELOW_DB = 40.0  # trimming: quieter than the loudest 10 ms by this much is silence
MARGIN_SECONDS = 0.08  # kept around the speech; as long as the ducking ramp under a prompt
FADE_SECONDS = 0.01


def _flite_slt(text: str, wav: Path) -> None:
    subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", str(wav)], check=True)


def _festival_slt_hts(text: str, wav: Path) -> None:
    voice = "(voice_cmu_us_slt_arctic_hts)"
    subprocess.run(["text2wave", "-eval", voice, "-o", str(wav)], input=text.encode(), check=True)


VOICES: dict[str, Callable[[str, Path], None]] = {"flite-slt": _flite_slt, "festival-slt-hts": _festival_slt_hts}
DEFAULT_VOICE = "festival-slt-hts"  # the more natural, and the clearer at 8 kHz as measured (README, Prompts)


def finish(samples: np.ndarray) -> np.ndarray:
    """16 kHz speech trimmed to a margin around it, levelled and faded: what the package ships."""
    samples = samples - np.mean(samples)
    size, margin = PROMPT_RATE // 100, round(MARGIN_SECONDS * PROMPT_RATE)
    levels = np.sqrt(np.mean(samples[: len(samples) // size * size].reshape(-1, size) ** 2, axis=1))
    loud = np.nonzero(levels > np.max(levels) * 10 ** (-SILENCE_BELOW_DB / 20))[0]
    first = max(0, loud[0] * size - margin)
    last = min(len(samples), (loud[-1] + 1) * size + margin)
    levelled = level_speech(samples[first:last], PROMPT_RATE).astype(np.float64)
    fade = round(FADE_SECONDS * PROMPT_RATE)
    rise = np.sin(0.5 * np.pi * (np.arange(fade) + 0.5) / fade) ** 2
    levelled[:fade] *= rise
    levelled[-fade:] *= rise[::-1]
    return np.rint(levelled).astype(np.int16)


def connect_cue() -> np.ndarray:
    """Two soft rising notes (B4, E5), clear of DTMF: someone is here."""
    cue = np.zeros(round(0.9 * PROMPT_RATE))
    for start, midi in ((0.0, 71), (0.22, 76)):
        note = soft_note(note_hz(midi), 0.65, PROMPT_RATE)
        first = round(start * PROMPT_RATE)
        cue[first : first + len(note)] += note
    return finish(cue * 10000)


def synthesise(voice: str, text: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as scratch:
        wav = Path(scratch) / "prompt.wav"
        VOICES[voice](text, wav)
        samples, rate = decode_wav(wav.read_bytes())
    return finish(resample(samples, rate, PROMPT_RATE).astype(np.float64))


def write(path: Path, pcm: np.ndarray) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(PROMPT_RATE)
        wav.writeframes(pcm.astype("<i2").tobytes())


def texts(language: str) -> dict[str, str]:
    with open(TEXTS / f"{language}.toml", "rb") as file:
        return dict(tomllib.load(file)["prompts"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render prompt texts to the WAV files the package ships.")
    parser.add_argument("ids", nargs="*", help="only these prompts (default: all, and stale files removed)")
    parser.add_argument("--language", default="en")
    parser.add_argument("--voice", choices=sorted(VOICES), default=DEFAULT_VOICE)
    parser.add_argument("--out", type=Path, help=f"directory (default: the package's, {BUILT_IN}/<language>)")
    args = parser.parse_args(argv)
    out = args.out or BUILT_IN / args.language
    out.mkdir(parents=True, exist_ok=True)
    wanted = texts(args.language)
    unknown = set(args.ids) - set(wanted) - {CONNECT_CUE}
    if unknown:
        parser.error(f"no such prompt: {', '.join(sorted(unknown))}")
    if not args.ids:
        for stale in set(out.glob("*.wav")) - {out / f"{name}.wav" for name in (*wanted, CONNECT_CUE)}:
            stale.unlink()
    for name, text in wanted.items():
        if not args.ids or name in args.ids:
            write(out / f"{name}.wav", synthesise(args.voice, text))
            print(name, file=sys.stderr)
    if not args.ids or CONNECT_CUE in args.ids:
        write(out / f"{CONNECT_CUE}.wav", connect_cue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
