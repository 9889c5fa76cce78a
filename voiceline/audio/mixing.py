"""Re-clocked audio: a jitter buffer with packet-loss concealment, and a prompt mixed over it.

Only the mixing path uses these: there our own 20 ms clock, not the
partner's packets, decides when a frame goes out, so the partner's audio
waits in a short buffer and a missing frame is concealed. Sans-I/O and
vectorised with numpy: frames in, frames out.
"""

from __future__ import annotations

import numpy as np

PREFILL_FRAMES = 2  # buffered before playout starts (absorbs 40 ms of jitter)
MAX_FRAMES = 6  # more than this and the oldest audio is dropped, so delay stays bounded
CONCEALED_FRAMES = 3  # a lost frame is replaced by the last one, fading, this many times
CONCEAL_GAIN = 0.5


class JitterBuffer:
    """Partner PCM in, fixed-size frames out on our clock; packets of any duration."""

    def __init__(self, frame_samples: int) -> None:
        self.frame_samples = frame_samples
        self._samples = np.zeros(0, dtype=np.int16)
        self._playing = False
        self._last = np.zeros(frame_samples, dtype=np.int16)
        self._concealed = 0
        self.concealed_frames = 0  # how many frames were made up, for statistics

    def push(self, pcm: np.ndarray) -> None:
        self._samples = np.concatenate((self._samples, pcm))
        excess = len(self._samples) - MAX_FRAMES * self.frame_samples
        if excess > 0:
            self._samples = self._samples[excess:]

    def pop(self) -> np.ndarray:
        """The next frame: buffered audio, else the last frame fading out, else silence."""
        size = self.frame_samples
        if not self._playing:
            self._playing = len(self._samples) >= PREFILL_FRAMES * size
        if self._playing and len(self._samples) >= size:
            frame, self._samples = self._samples[:size], self._samples[size:]
            self._last, self._concealed = frame, 0
            return frame
        if self._playing:  # ran dry: play out what is left and wait for a new prefill
            self._playing = False
            if len(self._samples):
                frame = np.zeros(size, dtype=np.int16)
                frame[: len(self._samples)] = self._samples
                self._samples = self._samples[:0]
                return frame
        if self._concealed < CONCEALED_FRAMES and np.any(self._last):
            self._concealed += 1
            self.concealed_frames += 1
            self._last = (self._last * CONCEAL_GAIN).astype(np.int16)
            return self._last
        return np.zeros(size, dtype=np.int16)


class Prompt:
    """A prompt played over other audio, frame by frame, mixed with saturation."""

    def __init__(self, pcm: np.ndarray, frame_samples: int) -> None:
        self._pcm = np.asarray(pcm, dtype=np.int16)
        self._position = 0
        self.frame_samples = frame_samples

    @property
    def done(self) -> bool:
        return self._position >= len(self._pcm)

    def mix(self, under: np.ndarray) -> np.ndarray:
        """`under` with the next prompt frame added (a frame of `frame_samples`)."""
        part = self._pcm[self._position : self._position + self.frame_samples]
        self._position += self.frame_samples
        mixed = under.astype(np.int32)
        mixed[: len(part)] += part
        return np.clip(mixed, -32768, 32767).astype(np.int16)
