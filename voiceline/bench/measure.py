"""What the bench measures, kept apart from all I/O so it can be tested on its own.

Every generated RTP payload starts with a probe: a magic tag, the sending
leg's id, its sequence number and the send time (CLOCK_REALTIME ns). The
receiver compares that time with the kernel's receive timestamp of the same
packet (SO_TIMESTAMPNS, also CLOCK_REALTIME), so the latency counted is what
the path through the server added, not the generator's own scheduling delay.

Loss is counted over a measurement window: the packets whose embedded send
time lies in [start, end) that were sent, against those that arrived.

A transcoding relay re-encodes the payload, so no probe survives it. There
each pair has a tone of its own (`pair_tone_hz`) that both legs send: a leg
knows it hears its own partner, transcoded, once its partner's tone stands
out in what it decodes (`ToneMatcher`). From then on the send time of what
it receives is found by sequence number (`SequenceMatch`): relays number a
relayed stream as its source, shifted by an offset fixed at each change of
source (voiceline, and rtpengine while transcoding).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from voiceline.audio.codecs import new_coder
from voiceline.codec_table import Codec

PROBE = struct.Struct("!4sIIQ")  # magic, leg id, sequence, send time (ns)
MAGIC = b"VLB1"
PAYLOAD_SIZE = 160  # 20 ms of PCMU
BUCKET_NS = 10_000  # latency histogram resolution: 10 us
BUCKETS = 10_000  # up to 100 ms; anything later lands in the last bucket

LOSS_BUDGET = 0.001  # < 0.1 %
P99_BUDGET_MS = 5.0
PACKETS_PER_SECOND = 50  # per leg
MIN_OFFERED = 0.97  # a level counts only if the generator sent at least this share of the full load

# Pair tones: multiples of 50 Hz repeat whole in every 20 ms frame; 100 Hz apart, two bins of a
# 20 ms frame, so a Hann-windowed tone leaks next to nothing into its neighbours.
PAIR_TONES_HZ = tuple(range(300, 3300, 100))
TONE_AMPLITUDE = 12000  # what the legs send
MIN_TONE_AMPLITUDE = 0.05  # of full scale: what a heard tone reads at least
TONE_MARGIN = 2.0  # a heard tone against the next strongest (6 dB: a repeated Opus frame has sidebands)
# An Opus encoder's first frames are still settling: its first frame, sent over and over, decodes
# with sidebands that can bury the tone. Its tenth decodes clean for every pair tone (tested).
TONE_ENCODER_FRAMES = 10
SEND_RING = 256  # send times a leg keeps, by sequence number: 5 s of packets
_SEQUENCE_MASK = 0xFFFF


def pair_tone_hz(pair: int) -> int:
    """The tone both legs of pair number `pair` send (neighbouring pairs differ)."""
    return PAIR_TONES_HZ[pair % len(PAIR_TONES_HZ)]


def tone_frame(hz: int, rate: int, samples: int) -> np.ndarray:
    """One frame of a pair's tone (int16), the same in every frame since `hz` is a multiple of 50."""
    return (TONE_AMPLITUDE * np.sin(2 * np.pi * hz * np.arange(samples) / rate)).astype(np.int16)


def encoded_tone_frame(codec: Codec, hz: int) -> bytes:
    """The frame a transcoding leg sends in every packet: its pair's tone in `codec`, as an encoder
    that has been sending the tone for a while encodes it."""
    coder = new_coder(codec)
    pcm = tone_frame(hz, codec.rate, codec.frame_samples)
    for _ in range(TONE_ENCODER_FRAMES - 1):
        coder.encode(pcm)
    return coder.encode(pcm)


class ToneMatcher:
    """Which pair tone a decoded frame carries: the DFT bins of every pair tone, from one real FFT
    under a Hann window. An FFT, not a matrix product: numpy's BLAS hands a product this size to a
    second thread, which on a busy machine waits for a core (milliseconds per frame, not micro)."""

    def __init__(self, rate: int, samples: int) -> None:
        bins = [hz * samples / rate for hz in PAIR_TONES_HZ]
        if any(not b.is_integer() for b in bins):
            raise ValueError("every pair tone must fall on a DFT bin of the frame")
        self._bins = np.array(bins, dtype=np.intp)
        self._window = np.hanning(samples)
        self._samples = samples
        self._scale = 2.0 / self._window.sum() / 32768.0  # a full-scale sine reads 1.0

    def strongest(self, pcm: np.ndarray) -> int | None:
        """The pair tone in `pcm`, if one is loud and stands out from the others; else None."""
        if len(pcm) != self._samples:
            return None
        amplitudes = np.abs(np.fft.rfft(pcm * self._window)[self._bins]) * self._scale
        second, first = np.argsort(amplitudes)[-2:]
        if amplitudes[first] < MIN_TONE_AMPLITUDE or amplitudes[first] < TONE_MARGIN * amplitudes[second]:
            return None
        return PAIR_TONES_HZ[int(first)]


class SendTimes:
    """A leg's recent send times by RTP sequence number."""

    __slots__ = ("times", "sequences")

    def __init__(self) -> None:
        self.times = [0] * SEND_RING
        self.sequences = [-1] * SEND_RING

    def record(self, sequence: int, sent_ns: int) -> None:
        slot = sequence % SEND_RING
        self.times[slot] = sent_ns
        self.sequences[slot] = sequence

    def at(self, sequence: int) -> int | None:
        """When packet `sequence` was sent; None when it is not among the last SEND_RING."""
        slot = sequence % SEND_RING
        return self.times[slot] if self.sequences[slot] == sequence else None


class SequenceMatch:
    """The source packet of each packet a relay sends on, by sequence number.

    The relay's sequence is the source's plus an offset fixed at each change of
    source (marked). A packet received can only come from one its source has
    sent already, so each gives a least offset (its sequence less the newest the
    source has sent); the largest of these since the marker is the offset, exact
    as soon as one packet took less than a frame (20 ms) to come through.
    """

    __slots__ = ("offset",)

    def __init__(self) -> None:
        self.offset: int | None = None

    def source_sequence(self, sequence: int, marker: bool, newest_sent: int) -> int:
        """The source's sequence number of a received packet (`newest_sent`: the source's newest)."""
        least = (sequence - newest_sent) & _SEQUENCE_MASK
        offset = self.offset
        if marker or offset is None or 0 < (least - offset) & _SEQUENCE_MASK < 0x8000:
            self.offset = offset = least
        return (sequence - offset) & _SEQUENCE_MASK


class LatencyHistogram:
    """Counts of latencies in fixed 10 us buckets: cheap to add to, merge and ship between processes."""

    def __init__(self, counts: Sequence[int] | None = None) -> None:
        self.counts = list(counts) if counts is not None else [0] * BUCKETS

    def add(self, latency_ns: int) -> None:
        bucket = latency_ns // BUCKET_NS
        if bucket < 0:
            bucket = 0
        elif bucket >= BUCKETS:
            bucket = BUCKETS - 1
        self.counts[bucket] += 1

    def merge(self, other: LatencyHistogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def percentile_ms(self, fraction: float) -> float:
        """The upper edge of the bucket holding the `fraction` quantile, in ms (0.0 when empty)."""
        total = self.total
        if total == 0:
            return 0.0
        rank = fraction * total
        seen = 0
        for bucket, count in enumerate(self.counts):
            seen += count
            if count and seen >= rank:
                return (bucket + 1) * BUCKET_NS / 1e6
        return BUCKETS * BUCKET_NS / 1e6


@dataclass
class WindowCounts:
    """One generator process's share of a measurement window."""

    sent: int = 0  # probes sent with a send time inside the window
    received: int = 0  # of those, how many came back through the server
    foreign: int = 0  # packets received that carried no probe (e.g. hold audio)

    def merge(self, other: WindowCounts) -> None:
        self.sent += other.sent
        self.received += other.received
        self.foreign += other.foreign


@dataclass(frozen=True)
class LevelResult:
    """The figures of one load level."""

    pairs: int  # pairs requested
    pairs_held: int  # pairs whose both legs were up and hearing each other (transcoding: transcoded) in the window
    counts: WindowCounts
    latency: LatencyHistogram
    setup_rate: float  # calls answered per second while this level was being set up
    server_cpu: float  # % of one core: the relay process (user + system time, all its threads)
    server_rss_mb: float
    generator_cpu: float  # % of one core, all generator processes together
    seconds: float  # window length
    system_cpu: float = 0.0  # % of one core: the whole machine busy (softirq included), generator excluded
    machine_cpu: float = 0.0  # % of one core: the whole machine busy, generator included
    baseline_cpu: float | None = None  # machine_cpu of the same load with no relay, measured in the same run
    baseline_generator_cpu: float | None = None  # generator_cpu in that baseline
    settle_seconds: float = 0.0  # from the level's calls set up to its window: the set-up burst's backlog read
    own_codec_legs: int = 0  # transcoding: legs paired with a leg of their own codec (nothing transcoded)

    @property
    def loss(self) -> float:
        """The fraction of window probes that never came back (0.0 when none were sent)."""
        if self.counts.sent == 0:
            return 0.0
        return max(0, self.counts.sent - self.counts.received) / self.counts.sent

    @property
    def offered(self) -> float:
        """The share of the full load (every leg of every pair, 50 packets a second) the generator sent."""
        return self.counts.sent / (2 * self.pairs * PACKETS_PER_SECOND * self.seconds)

    @property
    def p50_ms(self) -> float:
        return self.latency.percentile_ms(0.50)

    @property
    def p99_ms(self) -> float:
        return self.latency.percentile_ms(0.99)

    @property
    def p999_ms(self) -> float:
        return self.latency.percentile_ms(0.999)

    def per_packet_us(self, cpu_percent: float) -> float:
        """CPU (% of one core over the window) per relayed packet, in microseconds."""
        if self.counts.received == 0:
            return 0.0
        return cpu_percent / 100 * self.seconds / self.counts.received * 1e6

    @property
    def whole_us(self) -> float | None:
        """The relay's whole-system CPU per relayed packet (its process, the kernel's share wherever it
        ran, generator excluded): the machine's busy time beyond the no-relay baseline's."""
        if self.baseline_cpu is None:
            return None
        return self.per_packet_us(self.machine_cpu - self.baseline_cpu)

    @property
    def attributed_us(self) -> float | None:
        """The same by process: the relay's own CPU plus what the generator spent beyond its
        baseline (the kernel's work done in the generator's system calls); blind to softirq run
        elsewhere, but unmoved by other processes' load."""
        if self.baseline_generator_cpu is None:
            return None
        return self.per_packet_us(self.server_cpu + self.generator_cpu - self.baseline_generator_cpu)

    @property
    def within_budget(self) -> bool:
        return (
            self.offered >= MIN_OFFERED
            and self.pairs_held == self.pairs
            and self.loss < LOSS_BUDGET
            and self.p99_ms < P99_BUDGET_MS
        )


def largest_within_budget(results: Iterable[LevelResult]) -> int:
    """The largest pair count that met the budget with every smaller level meeting it too (0 when
    the first did not): a lucky pass above a failed level is noise, not capacity."""
    largest = 0
    for result in sorted(results, key=lambda result: result.pairs):
        if not result.within_budget:
            break
        largest = result.pairs
    return largest
