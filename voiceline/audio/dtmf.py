"""DTMF digits from a media leg: RFC 4733 telephone-events and in-band tones (Goertzel).

Sans-I/O: both detectors are fed payloads or PCM frames and return a digit
(or None); the leg decides what to do with it. Neither keeps anything but
the state needed to report each key press once.
"""

from __future__ import annotations

import numpy as np

# RFC 4733 section 3.2: events 0-15 are the DTMF keys in this order.
EVENT_DIGITS = "0123456789*#ABCD"
DIGITS = frozenset(EVENT_DIGITS)
_END_BIT = 0x80

ROW_HZ = (697.0, 770.0, 852.0, 941.0)
COLUMN_HZ = (1209.0, 1336.0, 1477.0, 1633.0)
KEYPAD = ("123A", "456B", "789C", "*0#D")  # KEYPAD[row][column]

# Detection thresholds (after ITU-T Q.24 in spirit, tuned for 20 ms frames).
MIN_TONE_AMPLITUDE = 300.0  # each tone's peak, of 32767: about -40 dBFS
MAX_TWIST_DB = 8.0  # row and column levels may differ this much either way
MIN_TONE_SHARE = 0.7  # the two tones carry at least this share of the frame's energy
MIN_PEAK_RATIO_DB = 6.0  # the strongest row (column) over the next strongest
CONFIRM_FRAMES = 2  # frames in a row with the same digit before it counts (40 ms)
RELEASE_FRAMES = 2  # frames without it before the same key can count again
_MAX_TWIST = 10 ** (MAX_TWIST_DB / 10)
_PEAK_RATIO = 10 ** (MIN_PEAK_RATIO_DB / 10)
_CANDIDATE_SLACK = 0.99


class TelephoneEventReceiver:
    """RFC 4733 events to digits, one per key press.

    Every packet of one event carries the event's start timestamp (the end
    packet is sent three times), so a digit is reported at the first packet
    seen with a new timestamp; a lost start packet only delays it to the next.
    """

    def __init__(self) -> None:
        self._last_timestamp: int | None = None

    def feed(self, payload: bytes, timestamp: int) -> str | None:
        """The digit this packet starts, or None (a repeat, an end, a non-DTMF event or junk)."""
        if len(payload) < 4 or payload[0] >= len(EVENT_DIGITS):
            return None
        if timestamp == self._last_timestamp:
            return None
        self._last_timestamp = timestamp
        return EVENT_DIGITS[payload[0]]


_probes: dict[tuple[int, int, type[np.floating]], tuple[np.ndarray, float]] = {}  # by (rate, frame length, dtype)
# Rows measured per matrix product. A larger product is split by OpenBLAS across its worker
# threads (above about 100 rows of this shape), which are not real-time: outranked on the other
# core by real-time processes they wait, and the relay spins waiting for them for up to a
# scheduler time slice (100 ms). Products this small stay on the calling thread.
PRODUCT_ROWS = 64


def _probe(rate: int, samples: int, dtype: type[np.floating]) -> tuple[np.ndarray, float]:
    """Cosine and sine columns at the eight DTMF frequencies (a DFT term per frequency, all eight in
    one matrix product) for frames of `samples`, and the least power of a loud enough tone."""
    probe = _probes.get((rate, samples, dtype))
    if probe is None:
        t = np.arange(samples) / rate
        freqs = np.array(ROW_HZ + COLUMN_HZ)[None, :]
        matrix = np.hstack([np.cos(2 * np.pi * t[:, None] * freqs), np.sin(2 * np.pi * t[:, None] * freqs)])
        # |DFT term|^2 of a sine of amplitude A over n samples is (A n / 2)^2.
        probe = _probes[(rate, samples, dtype)] = matrix.astype(dtype), (MIN_TONE_AMPLITUDE * samples / 2) ** 2
    return probe


def frame_digits(frames: np.ndarray, rate: int) -> list[str | None]:
    """The digit each row of `frames` (frames of one length, any number of them) holds, without
    debouncing. The measure is a matrix product per PRODUCT_ROWS rows, so many legs' frames cost
    little more than one, and so is the verdict. Float32 samples (G.711
    decodes to them exactly) are measured in float32, anything else in float64.
    """
    count, size = frames.shape
    if count == 0 or size < rate // 100 or size > rate // 10:  # 10-100 ms frames
        return [None] * count
    samples = frames if frames.dtype == np.float32 else frames.astype(np.float64)
    matrix, min_power = _probe(rate, size, samples.dtype.type)
    if count <= PRODUCT_ROWS:
        terms = samples @ matrix
    else:
        terms = np.empty((count, matrix.shape[1]), dtype=samples.dtype)
        for first in range(0, count, PRODUCT_ROWS):
            np.matmul(samples[first : first + PRODUCT_ROWS], matrix, out=terms[first : first + PRODUCT_ROWS])
    terms *= terms
    energies = np.einsum("ij,ij->i", samples, samples)
    # A frame holding a digit has two loud enough tones carrying most of its energy, so the eight
    # powers together reach both bounds: vectorised, this leaves nearly no frame for `_digit`.
    # (Loosened a little: the sums round differently from `_digit`'s.)
    least = np.maximum(energies * (_CANDIDATE_SLACK * MIN_TONE_SHARE * size / 2), _CANDIDATE_SLACK * 2 * min_power)
    candidates = np.flatnonzero(terms.sum(axis=1) >= least)
    digits: list[str | None] = [None] * count
    if len(candidates):
        powers = terms[candidates].reshape(-1, 2, 8).sum(axis=1).tolist()  # cosine^2 + sine^2 per frequency
        for index, power, energy in zip(candidates.tolist(), powers, energies[candidates].tolist()):
            digits[index] = _digit(power, energy, size, min_power)
    return digits


def _digit(power: list[float], energy: float, size: int, min_power: float) -> str | None:
    """The digit of a frame of `size` samples whose powers at the eight frequencies are `power`.

    A frame holds a digit when one row and one column tone are loud enough,
    together carry most of the frame's energy (speech and music spread
    theirs), stand clear of their neighbours, and are within the allowed
    twist of each other. The cheap tests come first: nearly every frame fails them.
    """
    rows, columns = power[:4], power[4:]
    row_power, column_power = max(rows), max(columns)
    if row_power < min_power or column_power < min_power:
        return None
    # A tone's energy over the frame is 2 |term|^2 / n.
    if 2 * (row_power + column_power) / size < MIN_TONE_SHARE * energy:
        return None
    twist = row_power / column_power
    if twist > _MAX_TWIST or twist < 1 / _MAX_TWIST:
        return None
    if sorted(rows)[-2] * _PEAK_RATIO > row_power or sorted(columns)[-2] * _PEAK_RATIO > column_power:
        return None
    return KEYPAD[rows.index(row_power)][columns.index(column_power)]


class ToneDetector:
    """In-band DTMF on frames of decoded PCM, one digit per key press.

    Each frame is measured at the eight DTMF frequencies (the Goertzel term,
    see `frame_digits`); `track` turns the digits frames hold into key
    presses. Frames may be measured one at a time (`feed`) or many legs'
    frames at once (`frame_digits`, then each leg's `track`).
    """

    def __init__(self, rate: int = 8000, frame_samples: int | None = None) -> None:
        self.rate = rate
        self.frame_samples = frame_samples or rate // 50
        self._candidate: str | None = None
        self._count = 0
        self._reported: str | None = None
        self._absent = 0

    def frame_digit(self, pcm: np.ndarray) -> str | None:
        """The digit this one frame holds, without debouncing (for muting it)."""
        return frame_digits(pcm[None, :], self.rate)[0]

    @property
    def idle(self) -> bool:
        """No key press under way: a frame that holds no digit changes nothing (`track(None)` is
        (None, False) and leaves it idle), so a batch may pass such frames on without tracking them."""
        return self._candidate is None and self._reported is None

    def feed(self, pcm: np.ndarray) -> tuple[str | None, bool]:
        """(the digit a key press completes with this frame or None, whether the frame holds DTMF)."""
        return self.track(self.frame_digit(pcm))

    def track(self, digit: str | None) -> tuple[str | None, bool]:
        """The next frame held `digit` (from `frame_digit` or `frame_digits`): (the digit a key press
        completes with it or None, whether the frame holds DTMF)."""
        if digit is None or digit != self._candidate:
            self._candidate, self._count = digit, 0
        if digit is not None:
            self._count += 1
        if digit == self._reported and digit is not None:
            self._absent = 0
            return None, True
        self._absent += 1
        if self._reported is not None and self._absent >= RELEASE_FRAMES:
            self._reported = None
        if digit is not None and self._count >= CONFIRM_FRAMES and self._reported is None:
            self._reported = digit
            self._absent = 0
            return digit, True
        return None, digit is not None
