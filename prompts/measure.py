"""How intelligible rendered prompts stay on a narrowband call: an offline recogniser transcribes them.

    python prompts/measure.py [--language en] [DIR]

Each prompt is taken down to 8 kHz and through G.711 mu-law and back (what a
PCMU caller hears), then transcribed by PyPI `pocketsphinx` (its bundled
en-us model; `pip install -e '.[prompts]'`). Prints each transcript and the
word error rate against the text; short fragments (a key, an hour) are
listed too, but a recogniser without context often misses single words.
Not a test: a measurement to choose a voice by (README, Prompts).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
from pocketsphinx import Decoder

from voiceline.audio import g711
from voiceline.audio.prompts import BUILT_IN, PROMPT_RATE, decode_prompt
from voiceline.audio.wavfile import resample

sys.path.insert(0, str(Path(__file__).resolve().parent))
from render import texts  # noqa: E402  (the texts next to this script)

_RECOGNISER_RATE = 16000  # the bundled model's rate: narrowband audio is carried back up to it


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower().replace("'", "")).split()


def word_errors(reference: list[str], heard: list[str]) -> int:
    """Levenshtein distance in words: substitutions, deletions and insertions."""
    row = list(range(len(heard) + 1))
    for i, expected in enumerate(reference, 1):
        previous, row[0] = row[0], i
        for j, word in enumerate(heard, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (expected != word))
    return row[-1]


def telephone(pcm: np.ndarray) -> np.ndarray:
    """What a PCMU caller hears of `pcm`, at the recogniser's rate."""
    narrow = resample(pcm.astype(np.float64), PROMPT_RATE, 8000)
    heard = g711.decoder("PCMU")(g711.encoder("PCMU")(narrow))
    return resample(heard.astype(np.float64), 8000, _RECOGNISER_RATE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Transcribe rendered prompts as a narrowband caller hears them.")
    parser.add_argument("directory", nargs="?", type=Path)
    parser.add_argument("--language", default="en")
    args = parser.parse_args(argv)
    directory = args.directory or BUILT_IN / args.language
    decoder = Decoder(loglevel="FATAL")
    total_words = total_errors = 0
    for name, text in texts(args.language).items():
        path = directory / f"{name}.wav"
        pcm = decode_prompt(path.read_bytes(), str(path))
        decoder.start_utt()
        decoder.process_raw(telephone(pcm).tobytes(), full_utt=True)
        decoder.end_utt()
        hypothesis = decoder.hyp()
        heard = words(hypothesis.hypstr) if hypothesis is not None else []
        errors = word_errors(words(text), heard)
        total_words += len(words(text))
        total_errors += errors
        print(f"{name:24} {errors:2}/{len(words(text)):2}  {' '.join(heard)}")
    print(f"word error rate: {total_errors / total_words:.1%} of {total_words} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
