"""The anonymous pairing pool: who is waiting, and who is paired next.

Sans-I/O: members are opaque keys, time comes from the caller.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Protocol


class Preference(enum.Enum):
    """What a waiting caller chose: a talker is paired with a listener first, either with anyone."""

    EITHER = "either"
    TALK = "talk"
    LISTEN = "listen"


@dataclass(frozen=True)
class Pairing:
    first: str  # the longer waiter
    second: str
    preference_match: bool  # a talker with a listener


class PairingRules(Protocol):
    """Rules about two calls from outside the pool (the safety ledger: reports, cooldowns, repeats across calls)."""

    def may_pair(self, a: str, b: str, now: float) -> bool:
        """Whether the two may be paired at all now."""
        ...

    def is_repeat(self, a: str, b: str, now: float) -> bool:
        """Whether the two should be paired only when neither can be paired with anyone else."""
        ...

    def changed_between(self, since: float, now: float) -> bool:
        """Whether `may_pair` may have turned true for some pair after `since`, up to `now` (`since` never decreases)."""
        ...

    def next_change(self, now: float) -> float | None:
        """The next time after `now` at which `may_pair` may turn true for some pair."""
        ...


@dataclass
class _Skips:
    """Between two calls: how often each skipped the other, and when they last parted."""

    last: float
    count: dict[str, int] = field(default_factory=dict)  # skipper -> times


class PreferencePool:
    """One line's waiting callers (call ids), paired by preference and by who skipped whom.

    Two waiters may be paired when neither skipped the other (nor their talk time
    ran out together) within `skip_window`,
    neither skipped the other twice, and their preferences fit (a talker with a
    listener, either with anyone) or one of them has waited `preference_wait`:
    then anyone will do. The longest waiter is paired first, with a fitting
    preference before either before an unfitting one, a partner it skipped
    before last, and the longer waiter among equals. Skips are kept in memory
    only while both calls last.

    Whatever it leaves waiting after `match` may not be paired, and that only
    changes for a newcomer, a new preference, or a wait or window running out,
    so the next `match` looks only at pairs with one of those in them: O(n)
    per change, however many talkers wait together.
    """

    def __init__(self, preference_wait: float, skip_window: float, rules: PairingRules | None = None) -> None:
        self.preference_wait = preference_wait
        self.skip_window = skip_window
        self.rules = rules
        self._waiting: dict[str, tuple[float, Preference]] = {}  # insertion order is waiting order
        self._skips: dict[frozenset[str], _Skips] = {}
        self._changed: set[str] = set()  # waiters who may pair with someone they could not at the last match
        self._matched_at = -math.inf

    def add(self, call: str, preference: Preference, now: float) -> None:
        if call in self._waiting:
            raise ValueError("already waiting")
        self._waiting[call] = (now, preference)
        self._changed.add(call)

    def prefer(self, call: str, preference: Preference) -> None:
        """A waiter changed its preference; how long it has waited still counts."""
        since, _ = self._waiting[call]
        self._waiting[call] = (since, preference)
        self._changed.add(call)

    def remove(self, call: str) -> None:
        self._waiting.pop(call, None)
        self._changed.discard(call)

    def skipped(self, skipper: str, skipped: str, now: float) -> None:
        """`skipper` asked for someone else while talking with `skipped`."""
        self.kept_apart(skipper, skipped, now)
        skips = self._skips[frozenset((skipper, skipped))]
        skips.count[skipper] = skips.count.get(skipper, 0) + 1

    def kept_apart(self, a: str, b: str, now: float) -> None:
        """The two just parted (their time was up): not paired again within the skip window."""
        skips = self._skips.setdefault(frozenset((a, b)), _Skips(now))
        skips.last = now

    def forget(self, call: str) -> None:
        """The call ended: nothing about it is kept."""
        self.remove(call)
        for pair in [pair for pair in self._skips if call in pair]:
            del self._skips[pair]

    def may_pair(self, a: str, b: str, now: float) -> bool:
        if a == b or (self.rules is not None and not self.rules.may_pair(a, b, now)):
            return False
        skips = self._skips.get(frozenset((a, b)))
        if skips is not None and (now < skips.last + self.skip_window or max(skips.count.values(), default=0) >= 2):
            return False
        (since_a, preference_a), (since_b, preference_b) = self._waiting[a], self._waiting[b]
        # `since + wait`, as deadline() computes it: a deadline reached is a deadline met
        return _fit(preference_a, preference_b) > 0 or now >= min(since_a, since_b) + self.preference_wait

    def match(self, now: float) -> list[Pairing]:
        """Pair whoever may be paired now, longest waiter first; they leave the pool."""
        self._changed.update(self._expired(self._matched_at, now))
        pairings: list[Pairing] = []
        while self._changed:
            pairing = self._next_pairing(now)
            if pairing is None:
                break
            pairings.append(pairing)
            for call in (pairing.first, pairing.second):
                self.remove(call)
        self._changed.clear()
        self._matched_at = now
        return pairings

    def _expired(self, since: float, now: float) -> list[str]:
        """Waiters whose preference wait or skip window ran out after `since`, up to `now`."""
        expired = [call for call, (joined, _) in self._waiting.items() if since < joined + self.preference_wait <= now]
        for pair, skips in self._skips.items():
            if since < skips.last + self.skip_window <= now and pair <= self._waiting.keys():
                expired += pair
        if self.rules is not None and self.rules.changed_between(since, now):
            expired += self._waiting  # a rule's time ran out: anyone may pair with someone new
        return expired

    def _next_pairing(self, now: float) -> Pairing | None:
        first = self._next_pairing_of(now, repeats=False)
        return first if first is not None or self.rules is None else self._next_pairing_of(now, repeats=True)

    def _next_pairing_of(self, now: float, repeats: bool) -> Pairing | None:
        """Without `repeats`, a pair the rules call a repeat is passed over: it waits for nobody else to fit."""
        # Only a pair with a changed waiter in it may be new: the rest were not pairable and still are not.
        changed = [call for call in self._waiting if call in self._changed]
        for call, (_, preference) in self._waiting.items():
            others = self._waiting if call in self._changed else changed
            candidates = [other for other in others if self.may_pair(call, other, now)]
            if not repeats and self.rules is not None:
                rules = self.rules
                candidates = [other for other in candidates if not rules.is_repeat(call, other, now)]
            if candidates:
                # max() keeps the first of equals: the longest waiter
                partner = max(candidates, key=lambda other: self._rank(call, preference, other))
                fit = _fit(preference, self._waiting[partner][1])
                return Pairing(call, partner, preference_match=fit == 2)
        return None

    def _rank(self, call: str, preference: Preference, other: str) -> tuple[bool, int]:
        return frozenset((call, other)) not in self._skips, _fit(preference, self._waiting[other][1])

    def deadline(self, now: float) -> float | None:
        """The next time after `now` at which two waiters blocked now may become pairable."""
        waiting = self._waiting.values()
        times = [since + self.preference_wait for since, preference in waiting if preference is not Preference.EITHER]
        times += [
            skips.last + self.skip_window
            for pair, skips in self._skips.items()
            if pair <= self._waiting.keys() and max(skips.count.values(), default=0) < 2
        ]
        changes = self.rules.next_change(now) if self.rules is not None and len(self._waiting) > 1 else None
        future = [t for t in times if t > now] + ([changes] if changes is not None else [])
        return min(future, default=None)

    def preference(self, call: str) -> Preference | None:
        entry = self._waiting.get(call)
        return None if entry is None else entry[1]

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, call: object) -> bool:
        return call in self._waiting


def _fit(a: Preference, b: Preference) -> int:
    """2: a talker with a listener; 1: either with anyone; 0: two talkers or two listeners."""
    if Preference.EITHER in (a, b):
        return 1
    return 2 if a is not b else 0
