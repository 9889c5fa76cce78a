"""Coders between RTP payloads and PCM, for the codecs of the codec table.

PCM is mono int16 numpy at the codec's own audio rate (`Codec.rate`: 8 kHz for
G.711, 16 kHz for G.722 and, as we run it, Opus). Coders are stateful (ADPCM
and Opus keep history), so each leg makes its own.

Same-codec legs never come here: they are relayed packet for packet; G.711
pairs switch laws with one `bytes.translate`. Everything else is decoded,
resampled and encoded again (transcoding).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from voiceline.audio import g711
from voiceline.codec_table import G722, OPUS, PCMA, PCMU, Codec

NARROWBAND = frozenset((PCMU, PCMA))


class Coder(Protocol):
    def accepts(self, samples: int) -> bool:
        """Whether `encode` takes a frame of this many samples."""
        ...

    def encode(self, pcm: np.ndarray) -> bytes: ...

    def decode(self, payload: bytes) -> np.ndarray: ...


class _AnyFrame:
    """Sample-by-sample codecs (G.711, G.722) encode frames of any non-zero even length."""

    @staticmethod
    def accepts(samples: int) -> bool:
        return samples > 0 and samples % 2 == 0


class G711Coder(_AnyFrame):
    def __init__(self, name: str) -> None:
        self.encode = g711.encoder(name)
        self.decode = g711.decoder(name)


class G722Coder(_AnyFrame):
    """G.722 at 64 kbit/s (mode 1), through the `g722` package (libg722)."""

    def __init__(self) -> None:
        import G722 as libg722  # imported here: only legs in G.722 need it

        self._encoder = libg722.G722(G722.rate, 64000)
        self._decoder = libg722.G722(G722.rate, 64000)

    def encode(self, pcm: np.ndarray) -> bytes:
        return bytes(self._encoder.encode(np.ascontiguousarray(pcm, dtype=np.int16)))

    def decode(self, payload: bytes) -> np.ndarray:
        return np.frombuffer(self._decoder.decode(payload), dtype=np.int16)


class OpusCoder:
    """Opus (RFC 7587) for voice, mono at 16 kHz, through `opuslib-next` and libopus."""

    MAX_FRAME_SAMPLES = 16000 * 120 // 1000  # the longest Opus packet, 120 ms
    FRAME_SAMPLES = frozenset(16000 * tenths // 10000 for tenths in (25, 50, 100, 200, 400, 600))  # 2.5-60 ms

    def accepts(self, samples: int) -> bool:
        return samples in self.FRAME_SAMPLES

    def __init__(self) -> None:
        import opuslib_next as opus  # imported here: needs libopus, only legs in Opus use it

        self._encoder = opus.Encoder(OPUS.rate, 1, opus.APPLICATION_VOIP)
        self._decoder = opus.Decoder(OPUS.rate, 1)
        self._error = opus.OpusError

    def encode(self, pcm: np.ndarray) -> bytes:
        pcm = np.ascontiguousarray(pcm, dtype=np.int16)
        return bytes(self._encoder.encode(pcm.tobytes(), len(pcm)))

    def decode(self, payload: bytes) -> np.ndarray:
        try:
            return np.frombuffer(self._decoder.decode(bytes(payload), self.MAX_FRAME_SAMPLES), dtype=np.int16)
        except self._error:  # a corrupt packet from the network: nothing to play
            return np.zeros(0, dtype=np.int16)


def new_coder(codec: Codec) -> Coder:
    """A fresh (stateful) coder for a codec of the table."""
    if codec in NARROWBAND:
        return G711Coder(codec.name)
    if codec == G722:
        return G722Coder()
    if codec == OPUS:
        return OpusCoder()
    raise ValueError("unsupported codec")


def available(codec: Codec) -> bool:
    """Whether the codec's library loads here (G.711 always does)."""
    try:
        new_coder(codec)
    except Exception:  # ImportError, OSError, or opuslib's bare Exception when libopus is missing
        return False
    return True


def translation(source: Codec, target: Codec) -> bytes | None:
    """How a relayed payload changes codec without PCM: None keeps it as is,
    a table switches G.711 laws. Raises ValueError when only transcoding can."""
    if source == target:
        return None
    if source in NARROWBAND and target in NARROWBAND:
        return g711.translation(source.name, target.name)
    raise ValueError("needs transcoding")


_RESAMPLE_TAPS_PER_PHASE = 16


class Resampler:
    """Streaming integer-ratio resampler (8, 16 and 48 kHz), frame by frame without seams.

    Up by L: zero-stuff and low-pass; down by M: low-pass and keep every M-th
    sample. The filter's history carries across frames, so consecutive frames
    join exactly as one signal would.
    """

    def __init__(self, source_rate: int, target_rate: int) -> None:
        self.source_rate, self.target_rate = source_rate, target_rate
        high = max(source_rate, target_rate)
        if high % source_rate or high % target_rate:
            raise ValueError("only integer resampling ratios are supported")
        self._up = high // source_rate
        self._down = high // target_rate
        ratio = max(self._up, self._down)
        taps = _RESAMPLE_TAPS_PER_PHASE * ratio + 1
        n = np.arange(taps) - taps // 2
        cutoff = 0.45 / ratio  # of the high rate: just under the lower Nyquist frequency
        kernel = np.sinc(2 * cutoff * n) * np.hamming(taps)
        self._kernel = kernel * (self._up / kernel.sum())  # zero-stuffing loses a factor L
        self._history = np.zeros(taps - 1)
        self._phase = 0  # samples into the next decimation step

    def process(self, pcm: np.ndarray) -> np.ndarray:
        if self._up == 1 and self._down == 1:
            return pcm
        if self._up > 1:
            high = np.zeros(len(pcm) * self._up)
            high[:: self._up] = pcm
        else:
            high = pcm.astype(np.float64)
        joined = np.concatenate((self._history, high))
        filtered = np.convolve(joined, self._kernel, mode="valid")
        self._history = joined[len(joined) - len(self._history) :]
        if self._down > 1:
            filtered = filtered[self._phase :: self._down]
            self._phase = (self._phase - len(high)) % self._down
        return np.clip(np.rint(filtered), -32768, 32767).astype(np.int16)

