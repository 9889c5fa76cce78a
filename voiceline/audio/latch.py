"""Which source a media leg takes RTP from, and so where it sends (strict symmetric RTP).

Sans-I/O: `SourceFilter` is asked about each packet that does not come from
the latched peer (the leg compares that one address itself, per packet) and
answers whether the packet is accepted; when it is, its source is the new peer.
Nothing is relayed to or from a source before it latched: until then the leg
sends to the address the SDP announced.

Trusted hosts are the SDP's IP and the IP the call's signalling came from (a
phone behind NAT sends RTP from the NAT's address, the one its INVITE came
from). An off-path attacker can send from neither.

- Learning (nothing latched): a packet from a trusted host (any port) latches
  at once. Any other source is on probation: it latches only with
  `Learning.packets` packets in sequence, one SSRC, from one address, and not
  before `Learning.seconds` after learning began, so a caller on a trusted host
  who speaks within that time wins over anyone spraying the port; a lone
  injected packet never latches.
- A peer that latched by probation gives way at once to a packet from a
  trusted host: the caller is never locked out by an early sprayer.
- NAT rebinding: the peer moves to a new address only when that address is on
  the peer's host or a trusted host, the packet carries the stream's SSRC with
  a sequence number just after the last one, and the peer has been silent for
  `REBIND_SILENCE_SECONDS`. The address it moved away from may take the stream
  back at once, with the same SSRC, should it speak again.
- A new SDP address (`restart`) begins learning again for that address.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

Address = tuple[str, int]

REBIND_SILENCE_SECONDS = 0.5  # the peer must be this quiet before its stream may move
REBIND_MAX_SEQUENCE_STEP = 500  # 10 s of 20 ms packets lost while the NAT rebound
_SEQUENCE_MOD = 1 << 16


@dataclass(frozen=True)
class Learning:
    """Probation for a source on an untrusted host (`media.learning_packets`, `media.learning_seconds`)."""

    packets: int = 4
    seconds: float = 1.5


class Heard(NamedTuple):
    """The latched stream as last heard: its SSRC, highest sequence number and when (loop time)."""

    ssrc: int | None
    sequence: int
    at: float


class SourceFilter:
    """The latch rules of one leg; `peer` is the latched address, None while learning."""

    def __init__(self, announced: Address, signalling_host: str | None, now: float, learning: Learning) -> None:
        self._signalling_host = signalling_host
        self._learning = learning
        self.restart(announced, now)

    def restart(self, announced: Address, now: float) -> None:
        """Learn again, for a new SDP address."""
        self.announced = announced
        self.peer: Address | None = None
        self._previous: Address | None = None  # the address the peer moved away from
        self._learning_until = now + self._learning.seconds
        self._candidate: Address | None = None  # the source on probation
        self._candidate_ssrc = -1
        self._next_sequence = -1
        self._run = 0

    def trusted(self, host: str) -> bool:
        return host == self.announced[0] or host == self._signalling_host

    def admit(self, source: Address, ssrc: int, sequence: int, now: float, heard: Heard) -> bool:
        """Whether a valid packet from `source` (not the peer) is accepted; if so, `source` is the peer.

        `heard` describes the peer's stream (ignored while learning)."""
        if self.peer is None:
            return self._learn(source, ssrc, sequence, now)
        if self.trusted(source[0]) and not self.trusted(self.peer[0]):
            self.peer, self._previous = source, None  # the caller takes over from a probation peer
            return True
        if ssrc != heard.ssrc:
            return False
        if source == self._previous:
            self.peer, self._previous = source, None  # it speaks again: never locked out
            return True
        if (
            (source[0] == self.peer[0] or self.trusted(source[0]))
            and 0 < (sequence - heard.sequence) % _SEQUENCE_MOD <= REBIND_MAX_SEQUENCE_STEP
            and now - heard.at >= REBIND_SILENCE_SECONDS
        ):
            self.peer, self._previous = source, self.peer
            return True
        return False

    def _learn(self, source: Address, ssrc: int, sequence: int, now: float) -> bool:
        if self.trusted(source[0]):
            self.peer = source
            return True
        if source == self._candidate and ssrc == self._candidate_ssrc and sequence == self._next_sequence:
            self._run += 1
        else:
            self._candidate, self._candidate_ssrc, self._run = source, ssrc, 1
        self._next_sequence = (sequence + 1) % _SEQUENCE_MOD
        if self._run >= self._learning.packets and now >= self._learning_until:
            self.peer = source
            return True
        return False
