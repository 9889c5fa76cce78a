"""One line's callers: their journeys and the pool that pairs them.

Sans-I/O, the coordinator the service drives per line: it is told what
happened to a call (answered, a key, its prompt finished, hold and resume, it
hung up) or that time has come (`due`), always with `now`, and returns a
`Step`: what each call must do (the journey's actions, by call id), anonymous
statistics, and the figures of calls that left the line (for the hourly
aggregates). It
tells a partner what the other did, keeps who is waiting in the pool and pairs
them after every change; `deadline` is when `due` is next needed.

With a `SafetyLedger` it also keeps callers safe by pseudonym: a call answered
with its `Caller` is checked (cooldown, rate, withheld), the pool asks the
ledger which pairs may be paired (reports, skips and repeats across calls),
and partings and reports are written to it. With `help_line`, the help key
connects the caller to the line's help destination; the outcome of the help
call comes back by `help_answered`, `help_failed` and `help_ended`.

A caller whose audio stopped (`silent`) leaves its partner and is not paired
until it is `heard_again`. Each caller's end-of-talk choice lasts a random
extra of up to the settings' `end_choice_spread` seconds, so two partners who
both let it pass are not hung up together.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from dataclasses import dataclass, field

from voiceline.pairing.journey import (
    Action,
    Answered,
    CallSummary,
    Count,
    Digit,
    Event,
    HelpAnswered,
    HelpEnded,
    HelpFailed,
    Held,
    HoldNews,
    HungUp,
    Journey,
    JourneySettings,
    LineFacts,
    Parted,
    Parting,
    PartnerFound,
    PartnerHeld,
    PartnerReady,
    PartWays,
    PromptFinished,
    ReadyToTalk,
    Report,
    Silent,
    State,
    Statistic,
    TimerDue,
)
from voiceline.pairing.pool import PreferencePool
from voiceline.pairing.safety import Arrival, Caller, SafetyLedger


@dataclass
class Step:
    actions: list[tuple[str, Action]] = field(default_factory=list)  # (call id, what it must do), in order
    statistics: list[Count] = field(default_factory=list)
    ended: list[tuple[str, CallSummary]] = field(default_factory=list)  # calls that left the line, with their figures


class Line:
    def __init__(
        self,
        settings: JourneySettings,
        safety: SafetyLedger | None = None,
        help_line: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        """`rng`: draws each caller's end-of-talk spread (seeded in tests)."""
        self.settings = settings
        self._rng = rng or random.Random()
        self.safety = safety
        self.help_line = help_line  # the line has a help destination: the help key connects to it
        self._busiest_hours: tuple[int, int] | None = None
        self._journeys: dict[str, Journey] = {}
        # Kept as journeys change, so an event costs O(log n), not a walk over every caller:
        self._states: Counter[State] = Counter()  # callers in each state
        self._deadlines: dict[str, float] = {}  # each timed journey's deadline
        self._timers: list[tuple[float, str]] = []  # heap of (deadline, call); stale ones skipped on the way out
        self._pool = PreferencePool(settings.preference_wait, settings.skip_window, safety)
        self._now = 0.0  # of the last event: the pool's next deadline is after it

    @property
    def busiest_hours(self) -> tuple[int, int] | None:
        """(from, to), hours of the day when the line is usually busiest: from the hourly statistics."""
        return self._busiest_hours

    @busiest_hours.setter
    def busiest_hours(self, hours: tuple[int, int] | None) -> None:
        if hours is not None and not all(0 <= hour < 24 for hour in hours):
            raise ValueError("busiest hours are hours of the day, 0 to 23")
        self._busiest_hours = hours

    def journey(self, call: str) -> Journey | None:
        return self._journeys.get(call)

    @property
    def empty(self) -> bool:
        """Nobody on the line (nor remembered by its pool)."""
        return not self._journeys

    def counts(self) -> Counter[State]:
        """How many callers are in each journey state."""
        return +self._states  # a copy, without states nobody is in

    def longest_wait(self, now: float) -> float:
        """Seconds the longest-waiting caller has waited in its current wait (0 when nobody waits)."""
        return max((now - since for journey in self._journeys.values() if (since := journey.waiting_since) is not None), default=0.0)

    def answered(self, call: str, now: float, caller: Caller | None = None) -> Step:
        """A call was answered; `caller`: who it is by pseudonym, for the safety ledger (if the line has one)."""
        if call in self._journeys:
            raise ValueError("call already answered")
        self._journeys[call] = journey = Journey(self.settings, self._rng.uniform(0.0, self.settings.end_choice_spread))
        self._states[journey.state] += 1
        answered = Answered()
        if self.safety is not None and caller is not None:
            arrival = self.safety.arrived(call, caller, now)
            answered = Answered(arrival, self.safety.held_apart_until(call) if arrival is Arrival.HELD_APART else None)
        return self._run(call, answered, now)

    def digit(self, call: str, key: str, now: float) -> Step:
        return self._run(call, Digit(key), now)

    def prompt_finished(self, call: str, now: float) -> Step:
        return self._run(call, PromptFinished(), now)

    def held(self, call: str, now: float) -> Step:
        """The caller put the line on hold."""
        return self._run(call, Held(True), now)

    def resumed(self, call: str, now: float) -> Step:
        return self._run(call, Held(False), now)

    def silent(self, call: str, now: float) -> Step:
        """The caller's audio stopped (no hold, no BYE): it leaves any partner and is not paired meanwhile."""
        return self._run(call, Silent(True), now)

    def heard_again(self, call: str, now: float) -> Step:
        """A silent caller's audio came back: it may be paired again."""
        return self._run(call, Silent(False), now)

    def hung_up(self, call: str, now: float) -> Step:
        """The caller hung up (a call we hung up has already left the line: nothing happens)."""
        return self._run(call, HungUp(), now)

    def help_answered(self, call: str, now: float) -> Step:
        """The help call `call` asked for (`CallHelp`) was answered."""
        return self._run(call, HelpAnswered(), now)

    def help_failed(self, call: str, now: float) -> Step:
        """The help call was busy, unanswered or failed."""
        return self._run(call, HelpFailed(), now)

    def help_ended(self, call: str, now: float) -> Step:
        """The answered help call is over."""
        return self._run(call, HelpEnded(), now)

    def due(self, now: float) -> Step:
        """Whoever may now be paired, then every timer that is due, earliest first."""
        step = Step()
        self._now = now
        self._pair(now, step)  # first: a reassurance just before being paired would be cut off
        # One may change another's timer (a partner): each is checked again as it comes out.
        while (timer := self._next_timer()) is not None and timer[0] <= now:
            heapq.heappop(self._timers)
            call = timer[1]
            del self._deadlines[call]  # set again by the journey's next deadline
            try:
                self._feed(call, TimerDue(), now, step)
            finally:  # also when the step failed: the service asks again, the timer must still be there
                if (journey := self._journeys.get(call)) is not None:
                    self._retime(call, journey)
        self._pair(now, step)  # and last: a timer may have brought someone back (a cooldown over)
        return step

    def _next_timer(self) -> tuple[float, str] | None:
        """The earliest (deadline, call) still current; stale heap entries are dropped on the way."""
        timers = self._timers
        while timers and self._deadlines.get(timers[0][1]) != timers[0][0]:
            heapq.heappop(timers)
        return timers[0] if timers else None

    @property
    def deadline(self) -> float | None:
        timer, pool = self._next_timer(), self._pool.deadline(self._now)
        return min([time for time in (timer and timer[0], pool) if time is not None], default=None)

    def _run(self, call: str, event: Event, now: float) -> Step:
        step = Step()
        self._now = now
        if call in self._journeys:
            self._feed(call, event, now, step)
            self._pair(now, step)
        return step

    def _feed(self, call: str, event: Event, now: float, step: Step) -> None:
        journey = self._journeys[call]
        facts = LineFacts(len(self._journeys) - 1, self.busiest_hours, self.help_line)
        state = journey.state
        actions = journey.handle(event, now, facts)
        self._changed(call, journey, state)
        for action in actions:
            if isinstance(action, Count):
                step.statistics.append(action)
            elif isinstance(action, PartWays):
                if action.reason is Parting.SKIPPED:
                    self._pool.skipped(call, action.partner, now)
                elif action.reason is Parting.TIME_UP:  # both may ask for someone new: someone else
                    self._pool.kept_apart(call, action.partner, now)
                if self.safety is not None:
                    if action.reason is Parting.SKIPPED:
                        self.safety.skipped(call, action.partner, now)
                    else:
                        self.safety.talked(call, action.partner, now)
                if action.partner in self._journeys:
                    self._feed(action.partner, Parted(action.reason), now, step)
            elif isinstance(action, Report):
                self._report(call, action.partner, now, step)
            elif isinstance(action, HoldNews):
                if action.partner in self._journeys:
                    self._feed(action.partner, PartnerHeld(action.held), now, step)
            elif isinstance(action, ReadyToTalk):
                if action.partner in self._journeys:
                    self._feed(action.partner, PartnerReady(), now, step)
            else:
                step.actions.append((call, action))
        if journey.state is State.ENDED:
            step.ended.append((call, journey.summary))
            del self._journeys[call]
            self._states[State.ENDED] -= 1
            self._pool.forget(call)
            if self.safety is not None:
                self.safety.left(call)
        elif journey.seeking and call not in self._pool:
            self._pool.add(call, journey.preference, now)
        elif not journey.seeking:
            self._pool.remove(call)
        elif self._pool.preference(call) is not journey.preference:
            self._pool.prefer(call, journey.preference)

    def _changed(self, call: str, journey: Journey, state: State) -> None:
        """`journey` has just handled an event in `state`: its count and its timer follow."""
        if journey.state is not state:
            self._states[state] -= 1
            self._states[journey.state] += 1
        self._retime(call, journey)

    def _retime(self, call: str, journey: Journey) -> None:
        """The journey's timer as it stands now: pushed when it moved, dropped when it has none."""
        deadline = journey.deadline
        if deadline is None:
            self._deadlines.pop(call, None)
        elif self._deadlines.get(call) != deadline:
            self._deadlines[call] = deadline
            heapq.heappush(self._timers, (deadline, call))

    def _report(self, reporter: str, reported: str, now: float, step: Step) -> None:
        """Never paired again; the reported one hears only that the other left (and, when its reports
        reach the threshold, waits held apart)."""
        held_apart_until = self.safety.reported(reporter, reported, now) if self.safety is not None else None
        if held_apart_until is not None:
            step.statistics.append(Count(Statistic.COOLDOWN_STARTED))
        self._pool.kept_apart(reporter, reported, now)  # without a ledger: apart for the skip window
        if reported in self._journeys:
            self._feed(reported, Parted(Parting.REPORTED, held_apart_until), now, step)

    def _pair(self, now: float, step: Step) -> None:
        for pairing in self._pool.match(now):
            if pairing.preference_match:
                step.statistics.append(Count(Statistic.PREFERENCE_MATCH))
            self._feed(pairing.first, PartnerFound(pairing.second), now, step)
            self._feed(pairing.second, PartnerFound(pairing.first), now, step)
