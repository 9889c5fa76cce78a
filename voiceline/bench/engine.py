"""`python -m voiceline.bench --engine-only`: the media engine alone, for comparing changes to the
per-packet path with less noise than a whole-service run.

This process runs a `MediaEngine` on uvloop (as `voiceline serve` does) with
`pairs` pairs of legs listening to each other, as after pairing (no SIP, no
pool), in one of three kinds: PCMU with telephone-event, PCMU without it
(in-band DTMF), or PCMU paired with Opus (transcoded both ways); or, as
"waiting", the same number of legs each waiting alone as the caller's journey
has them wait: the generated hold music, with a spoken reassurance mixed over
it every REASSURE_SECONDS (staggered over the legs; the service's default is
45 s, a shorter interval here keeps prompts in every window); a sender process
stands in for the phones: one UDP socket per leg, 20 ms PCMU packets spread
over 1 ms slots, nothing read back. The figure is this process's user and
system CPU time (getrusage, so the sender is excluded) over a window, per
packet the engine relayed (for waiting legs: per packet of music it sent).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import uvloop

from voiceline.audio.codecs import new_coder
from voiceline.audio.hold import hold_music
from voiceline.audio.media import MediaEngine, MediaLeg
from voiceline.audio.prompts import PromptSet
from voiceline.codec_table import OPUS, PCMU, Codec

EVENT_PAYLOAD_TYPE = 101
OPUS_PAYLOAD_TYPE = 96
KINDS = ("plain", "in-band", "transcode", "waiting")
REASSURE_SECONDS = 5.0  # between a waiting leg's reassurances
SETTLE_SECONDS = 1.0
SLOT_SECONDS = 0.001
SLOTS = 20  # 1 ms slots per 20 ms frame
_HEADER = struct.Struct("!BBHII")
_PAYLOAD = bytes(range(160))  # 20 ms of PCMU, no DTMF in it
_TONE_SECONDS = np.arange(OPUS.frame_samples) / OPUS.rate
_SENDER_RECEIVE_BUFFER = 4096  # what the engine relays back is not read: keep the kernel's share small


@dataclass(frozen=True)
class EngineResult:
    pairs: int
    kind: str  # of KINDS
    packets: int  # relayed by the engine in the window
    user_us: float  # per relayed packet
    system_us: float

    @property
    def total_us(self) -> float:
        return self.user_us + self.system_us


def _leg_media(kind: str, index: int) -> tuple[Codec, int, bytes]:
    """A leg's codec, payload type and the payload its phone sends every 20 ms: the second leg of
    each transcoded pair speaks Opus (a real encoded tone, so the engine decodes real audio)."""
    if kind == "transcode" and index % 2:
        tone = (3000 * np.sin(2 * np.pi * 440 * _TONE_SECONDS)).astype(np.int16)
        return OPUS, OPUS_PAYLOAD_TYPE, new_coder(OPUS).encode(tone)
    return PCMU, PCMU.payload_type or 0, _PAYLOAD


def _send(kind: str, fds: list[int], ports: list[int], host: str, stop_at: float) -> None:
    """The phones: every leg's packet once per 20 ms, the legs spread over the 20 1 ms slots."""
    sockets = [socket.socket(fileno=fd) for fd in fds]
    media = [_leg_media(kind, index) for index in range(len(sockets))]
    sequences = [0] * len(sockets)
    slots = [range(first, len(sockets), SLOTS) for first in range(SLOTS)]
    due = time.monotonic()
    tick = 0
    while time.monotonic() < stop_at:
        for leg in slots[tick % SLOTS]:
            codec, payload_type, payload = media[leg]
            sequence = sequences[leg] = (sequences[leg] + 1) & 0xFFFF
            timestamp = sequence * codec.frame_ticks & 0xFFFFFFFF
            packet = _HEADER.pack(0x80, payload_type, sequence, timestamp, leg) + payload
            try:
                sockets[leg].sendto(packet, (host, ports[leg]))
            except OSError:
                pass
        tick += 1
        due += SLOT_SECONDS
        time.sleep(max(0.0, due - time.monotonic()))


async def measure_engine(
    pairs: int, kind: str, seconds: float, port_range: tuple[int, int], host: str = "127.0.0.1"
) -> EngineResult:
    """`pairs` pairs of legs of `kind` (of KINDS) relaying to each other for `seconds` after a
    settling second."""
    engine = MediaEngine(host, port_range, hold_music())
    phones: list[socket.socket] = []
    stop_reassuring: Callable[[], None] | None = None
    try:
        legs = []
        for index in range(2 * pairs):
            phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            phones.append(phone)
            phone.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SENDER_RECEIVE_BUFFER)
            phone.bind((host, 0))
            leg = await engine.open_leg()
            codec, payload_type, _ = _leg_media(kind, index)
            leg.start(phone.getsockname(), codec, payload_type, None if kind == "in-band" else EVENT_PAYLOAD_TYPE)
            legs.append(leg)
        if kind == "waiting":
            stop_reassuring = _wait_alone(legs, PromptSet.load("en").at("reassure_1", PCMU.rate))
        else:
            for first, second in zip(legs[::2], legs[1::2]):
                first.listen_to(second)
                second.listen_to(first)
        stop_at = time.monotonic() + SETTLE_SECONDS + seconds + 0.5
        sender = multiprocessing.get_context("fork").Process(
            target=_send,
            args=(kind, [phone.fileno() for phone in phones], [leg.local_port for leg in legs], host, stop_at),
        )
        sender.start()
        try:
            await asyncio.sleep(SETTLE_SECONDS)
            before, relayed_before = resource.getrusage(resource.RUSAGE_SELF), sum(leg.packets_out for leg in legs)
            await asyncio.sleep(seconds)
            after, relayed = resource.getrusage(resource.RUSAGE_SELF), sum(leg.packets_out for leg in legs)
        finally:
            sender.join()
    finally:
        if stop_reassuring is not None:
            stop_reassuring()
        engine.close()
        for phone in phones:
            phone.close()
    packets = relayed - relayed_before
    per_packet = 1e6 / packets if packets else 0.0
    return EngineResult(
        pairs,
        kind,
        packets,
        (after.ru_utime - before.ru_utime) * per_packet,
        (after.ru_stime - before.ru_stime) * per_packet,
    )


def _wait_alone(legs: list[MediaLeg], reassurance: np.ndarray) -> Callable[[], None]:
    """Each leg hears hold music, and the reassurance over it every REASSURE_SECONDS, staggered.
    Returns what stops the reassurances (before the legs close)."""
    loop = asyncio.get_running_loop()
    timers: dict[MediaLeg, asyncio.TimerHandle] = {}

    def reassure(leg: MediaLeg) -> None:
        leg.play_over(reassurance, PCMU.rate)
        timers[leg] = loop.call_later(REASSURE_SECONDS, reassure, leg)

    for index, leg in enumerate(legs):
        leg.hold()
        timers[leg] = loop.call_later(REASSURE_SECONDS * index / len(legs), reassure, leg)

    def stop() -> None:
        for timer in timers.values():
            timer.cancel()

    return stop


def engine_only(levels: list[int], seconds: float, rtp_ports: str, repetitions: int) -> int:
    """The printed engine-only run: every kind of leg at every level, the order rotated per repetition."""
    low, high = (int(port) for port in rtp_ports.split("-"))
    print(f"{'pairs':>5} {'legs':<9} {'pkts':>8} {'user us/pkt':>11} {'sys us/pkt':>10} {'total us/pkt':>12}")
    for repetition in range(repetitions):
        for level in levels:
            first = repetition % len(KINDS)
            for kind in (*KINDS[first:], *KINDS[:first]):
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    result = runner.run(measure_engine(level, kind, seconds, (low, high)))
                print(
                    f"{result.pairs:>5} {result.kind:<9} {result.packets:>8} "
                    f"{result.user_us:>11.2f} {result.system_us:>10.2f} {result.total_us:>12.2f}",
                    flush=True,
                )
    return 0
