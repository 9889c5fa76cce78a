"""Re-clocked audio: a jitter buffer with packet-loss concealment, and a prompt mixed over it (ducking).

Only the mixing path uses these: there our own 20 ms clock, not the
partner's packets, decides when a frame goes out, so the partner's audio
waits in a short buffer and a missing frame is concealed. Sans-I/O and
vectorised with numpy: frames in, frames out.
"""

from __future__ import annotations

import numpy as np

from voiceline.codec_table import FRAME_SECONDS

PREFILL_FRAMES = 2  # buffered before playout starts (absorbs 40 ms of jitter)
MAX_FRAMES = 6  # more than this and the oldest audio is dropped, so delay stays bounded
CONCEALED_FRAMES = 3  # a lost frame is replaced by the last one, fading, this many times
CONCEAL_GAIN = 0.5
DUCK_DB = -12.0  # what plays under a prompt, while it speaks
DUCK_RAMP_SECONDS = 0.08
FADE_SECONDS = 0.01  # a prompt's own fade in and out

_DUCK_GAIN = 10 ** (DUCK_DB / 20)
_DUCK_SHAPE = np.array([1.0, _DUCK_GAIN, _DUCK_GAIN, 1.0])  # gain at the prompt's start, ramp ends, end


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
    """A prompt played over other audio, frame by frame: what is under it ducks, the sum saturates.

    The audio under the prompt (a partner, hold music) eases down by DUCK_DB
    over the prompt's first DUCK_RAMP_SECONDS and back up over its last ones,
    so speech stays clear without the other audio vanishing. The prompt's own
    first and last FADE_SECONDS fade in and out: a file that starts or ends
    mid-wave does not click.
    """

    def __init__(self, pcm: np.ndarray, frame_samples: int) -> None:
        rate = round(frame_samples / FRAME_SECONDS)
        speech = np.asarray(pcm, dtype=np.float32)
        fade = min(round(FADE_SECONDS * rate), len(speech) // 2)
        if fade:
            rise = np.sin(0.5 * np.pi * (np.arange(fade) + 0.5) / fade).astype(np.float32) ** 2
            speech = speech.copy()
            speech[:fade] *= rise
            speech[len(speech) - fade :] *= rise[::-1]
        self._speech = speech
        ramp = min(round(DUCK_RAMP_SECONDS * rate), len(speech) // 2)
        self._gain_at = np.array([0, ramp, len(speech) - ramp, len(speech)], dtype=np.float64)
        self._position = 0
        self.frame_samples = frame_samples

    @property
    def done(self) -> bool:
        return self._position >= len(self._speech)

    def mix(self, under: np.ndarray) -> np.ndarray:
        """`under` ducked, with the next prompt frame added (a frame of `frame_samples`)."""
        start = self._position
        self._position += self.frame_samples
        part = self._speech[start : self._position]
        gain = np.interp(np.arange(start, start + len(under)), self._gain_at, _DUCK_SHAPE)
        mixed = under * gain
        mixed[: len(part)] += part
        return np.clip(np.rint(mixed), -32768, 32767).astype(np.int16)
