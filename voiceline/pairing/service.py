"""Per-caller sessions and the pairing coordinator.

A caller's session moves waiting -> talking -> waiting ... -> ended. The
coordinator tells each participant what to hear (hold audio or a partner)
and keeps only anonymous durations, handed back when the caller leaves.

Keys mean one thing: `#` while talking asks for someone else. Both callers
go back to waiting, and the two are not paired with each other again for
the rest of these calls while anyone else can be paired with either (the
call ids they skipped live in memory with the sessions, nothing else).

Logs never link two calls at info: lines a partner causes (paired, back to
waiting) carry only the pool's size; which calls, and who with, is debug.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from voiceline.pairing.pool import Pool

log = structlog.get_logger("voiceline.pairing")

NEXT_PARTNER_KEY = "#"
MAX_SKIPPED = 32  # skipped partners remembered per call; the oldest is forgotten first


class Participant(Protocol):
    """What pairing needs of a call: an id for logs and control of what it hears."""

    @property
    def id(self) -> str: ...

    def hear_hold(self) -> None: ...

    def hear(self, other: Participant) -> None: ...


class Phase(enum.Enum):
    WAITING = "waiting"
    TALKING = "talking"
    ENDED = "ended"


@dataclass(eq=False)
class Session:
    participant: Participant
    phase: Phase
    since: float  # when the current phase began
    partner: Session | None = None
    waited: float = 0.0
    talked: float = 0.0
    partners: int = 0
    held: bool = False  # the caller put us on hold: we send it nothing and pair it with nobody new
    skipped: list[str] = field(default_factory=list)  # call ids not to be paired with again

    def may_pair(self, other: Session) -> bool:
        return other.participant.id not in self.skipped and self.participant.id not in other.skipped

    def enter(self, phase: Phase, now: float) -> None:
        elapsed = now - self.since
        if self.phase is Phase.WAITING:
            self.waited += elapsed
        elif self.phase is Phase.TALKING:
            self.talked += elapsed
        self.phase = phase
        self.since = now


@dataclass(frozen=True)
class SessionSummary:
    """Anonymous figures for statistics: no identity, no partner."""

    waited: float
    talked: float
    partners: int


class PairingService:
    def __init__(
        self, clock: Callable[[], float] = time.monotonic, on_change: Callable[[Phase], None] | None = None
    ) -> None:
        self._clock = clock
        # Told when a caller starts waiting (WAITING) and when two start talking (TALKING, once a pair).
        self._on_change = on_change
        self._pool: Pool[Session] = Pool()
        self._sessions: dict[str, Session] = {}

    @property
    def waiting(self) -> int:
        return len(self._pool)

    @property
    def talking(self) -> int:
        return sum(1 for s in self._sessions.values() if s.phase is Phase.TALKING)

    def longest_wait(self) -> float:
        """Seconds the longest-waiting caller has waited in its current wait (0 when nobody waits)."""
        now = self._clock()
        return max((now - s.since for s in self._sessions.values() if s.phase is Phase.WAITING), default=0.0)

    def join(self, participant: Participant, held: bool = False) -> None:
        """A new caller waits for a partner; one that arrives `held` waits for its resume first."""
        if participant.id in self._sessions:
            raise ValueError("participant already joined")
        session = Session(participant, Phase.WAITING, self._clock(), held=held)
        self._sessions[participant.id] = session
        self._wait(session)

    def leave(self, participant_id: str) -> SessionSummary | None:
        """The caller hung up: end their session and send any partner back to waiting."""
        session = self._sessions.pop(participant_id, None)
        if session is None:
            return None
        now = self._clock()
        self._pool.remove(session)
        partner = session.partner
        session.enter(Phase.ENDED, now)
        session.partner = None
        if partner is not None:
            partner.partner = None
            self._wait(partner)
        return SessionSummary(session.waited, session.talked, session.partners)

    def hold(self, participant_id: str) -> None:
        """The caller put the line on hold: a partner stays paired and hears hold audio meanwhile.

        A held caller is told nothing (its media is not sending) and, while waiting,
        leaves the pool so nobody is paired with a silent line.
        """
        session = self._sessions.get(participant_id)
        if session is None or session.held:
            return
        session.held = True
        self._pool.remove(session)
        if session.partner is not None and not session.partner.held:
            session.partner.participant.hear_hold()
        log.info("pairing.held", call=participant_id, paired=session.partner is not None)

    def resume(self, participant_id: str) -> None:
        """Back from hold: the bridge with the partner is restored, or the caller waits again."""
        session = self._sessions.get(participant_id)
        if session is None or not session.held:
            return
        session.held = False
        log.info("pairing.resumed", call=participant_id, paired=session.partner is not None)
        partner = session.partner
        if partner is None:
            self._wait(session)
            return
        if partner.held:
            session.participant.hear_hold()  # the partner is on hold itself: wait with hold audio
        else:
            session.participant.hear(partner.participant)
            partner.participant.hear(session.participant)

    def digit(self, participant_id: str, digit: str) -> None:
        """A key the caller pressed (RFC 4733, in-band or SIP INFO). Digits are never logged."""
        session = self._sessions.get(participant_id)
        if session is None or digit != NEXT_PARTNER_KEY or session.partner is None:
            return
        partner = session.partner
        for one, other in ((session, partner), (partner, session)):
            one.partner = None
            one.skipped.append(other.participant.id)
            del one.skipped[:-MAX_SKIPPED]
        log.info("pairing.next_partner_requested", call=participant_id)
        # The one who asked meets the longest waiter first.
        self._wait(session)
        self._wait(partner)

    def _wait(self, session: Session) -> None:
        now = self._clock()
        session.enter(Phase.WAITING, now)
        if session.held:
            return  # back in the pool on resume
        partner = self._pool.add(session, now, session.may_pair)
        if partner is None:
            session.participant.hear_hold()
            log.info("pairing.waiting", waiting=len(self._pool))
            log.debug("pairing.call_waiting", call=session.participant.id)
            if self._on_change is not None:
                self._on_change(Phase.WAITING)
            return
        for one, other in ((session, partner), (partner, session)):
            one.enter(Phase.TALKING, now)
            one.partner = other
            one.partners += 1
            # Neither is held: held callers are never in the pool.
            one.participant.hear(other.participant)
        log.info("pairing.talking", waiting=len(self._pool))
        if self._on_change is not None:
            self._on_change(Phase.TALKING)
        log.debug(
            "pairing.partners",
            call=session.participant.id,
            partner=partner.participant.id,
            waited=round(session.waited, 1),
            partner_waited=round(partner.waited, 1),
        )
