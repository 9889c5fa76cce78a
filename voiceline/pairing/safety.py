"""Safety without identity: who may be paired with whom, and who is held apart, from pseudonyms alone.

Sans-I/O and memory only. A caller is known here by the pseudonym its call
came with (an HMAC under a key the SIP side rotates; see `voiceline.sip.identity`)
and that key's epoch. The `SafetyLedger` remembers, per pseudonym and per pair:
  - reports: a reported pair is never paired again while the key lasts; a caller
    reported by `report_threshold` different callers is held apart for `cooldown`
    (reports by withheld callers keep that pair apart but count towards no threshold:
    their pseudonym is new each call);
  - skips: two callers one of whom skipped the other are not paired again from
    new calls within `repeat_window` (inside the same two calls the pool's own
    skip rules apply);
  - conversations: two who talked are not paired again within `repeat_window`
    while anyone else can be paired with either (`is_repeat`, a preference);
  - call starts: over `max_calls_per_hour` in the last hour, a call is refused.
Records made under a key are forgotten once a newer key is in use and no call
made under the old one remains; a withheld caller's records go with its call.
The records are bounded (`max_records`, least recently used first). Nothing
is written anywhere; a restart forgets everything.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

HOUR = 3600.0


@dataclass(frozen=True)
class SafetySettings:
    """A line's safety rules (seconds); README describes the defaults."""

    report_threshold: int = 3  # distinct reporters within the key period: held apart
    cooldown: float = 86400.0  # how long a caller reported that often is held apart
    max_calls_per_hour: int = 30  # per caller; 0: no limit
    repeat_window: float = 3600.0  # the same two are not paired again within it while others can be
    accept_withheld: bool = True  # callers without a usable identity may call
    max_records: int = 100_000  # callers and pairs remembered at most

    def __post_init__(self) -> None:
        if self.report_threshold < 1 or self.max_calls_per_hour < 0 or self.max_records < 2:
            raise ValueError("report_threshold must be at least 1, max_calls_per_hour at least 0")
        if self.cooldown < 0 or self.repeat_window < 0:
            raise ValueError("safety durations must not be negative")


@dataclass(frozen=True)
class Caller:
    """Who a call is, as the SIP side says it: a pseudonym, its key's epoch, and whether it was withheld."""

    pseudonym: str = field(repr=False)
    key_epoch: int
    withheld: bool = False


class Arrival(enum.Enum):
    WELCOME = "welcome"
    HELD_APART = "held_apart"  # in cooldown
    OVER_RATE = "over_rate"  # too many calls in the last hour
    WITHHELD_REFUSED = "withheld_refused"  # the line takes no withheld callers


@dataclass
class _Record:
    epoch: int
    withheld: bool
    starts: deque[float] = field(default_factory=deque)  # call starts within the last hour
    reporters: set[str] = field(default_factory=set)
    held_apart_until: float = -math.inf


@dataclass
class _Pair:
    epoch: int
    reported: bool = False
    skipped_at: float = -math.inf
    skipped_in: frozenset[str] = frozenset()  # the two calls the skip happened in
    talked_at: float = -math.inf
    talked_in: frozenset[str] = frozenset()


class SafetyLedger:
    def __init__(self, settings: SafetySettings) -> None:
        self.settings = settings
        self._records: OrderedDict[str, _Record] = OrderedDict()  # pseudonym -> record, least recently used first
        self._pairs: OrderedDict[frozenset[str], _Pair] = OrderedDict()
        self._calls: dict[str, Caller] = {}  # live calls
        self._skip_ends: deque[float] = deque()  # when skips' repeat windows run out, earliest first
        self._newest_epoch = -1

    def __len__(self) -> int:
        """Records held (callers and pairs): bounded by `max_records` each."""
        return len(self._records) + len(self._pairs)

    def caller(self, call: str) -> Caller | None:
        return self._calls.get(call)

    def arrived(self, call: str, caller: Caller, now: float) -> Arrival:
        """A call was answered: welcome it, or say why it may not be paired (it is still told kindly)."""
        self._calls[call] = caller
        if caller.key_epoch > self._newest_epoch:
            self._newest_epoch = caller.key_epoch
            self._forget_retired_keys()
        if caller.withheld and not self.settings.accept_withheld:
            return Arrival.WITHHELD_REFUSED
        record = self._record(caller)
        while record.starts and record.starts[0] <= now - HOUR:
            record.starts.popleft()
        if now < record.held_apart_until:
            return Arrival.HELD_APART
        limit = self.settings.max_calls_per_hour
        if limit and not caller.withheld and len(record.starts) >= limit:
            return Arrival.OVER_RATE
        record.starts.append(now)
        return Arrival.WELCOME

    def left(self, call: str) -> None:
        caller = self._calls.pop(call, None)
        if caller is None:
            return
        if caller.withheld:  # its pseudonym is never seen again
            self._records.pop(caller.pseudonym, None)
            for pair in [pair for pair in self._pairs if caller.pseudonym in pair]:
                del self._pairs[pair]
        if caller.key_epoch < self._newest_epoch:
            self._forget_retired_keys()

    def held_apart_until(self, call: str) -> float | None:
        caller = self._calls.get(call)
        record = self._records.get(caller.pseudonym) if caller is not None else None
        return None if record is None or record.held_apart_until == -math.inf else record.held_apart_until

    def reported(self, reporter: str, reported: str, now: float) -> float | None:
        """`reporter`'s call reported `reported`'s: never paired again; returns when the reported one's
        cooldown ends, when this report started one (None otherwise)."""
        pair = self._pair(reporter, reported)
        by, of = self._calls.get(reporter), self._calls.get(reported)
        if pair is None or by is None or of is None:
            return None
        pair.reported = True
        record = self._record(of)
        if by.withheld or of.withheld:
            return None
        record.reporters.add(by.pseudonym)
        if len(record.reporters) >= self.settings.report_threshold and now >= record.held_apart_until:
            record.held_apart_until = now + self.settings.cooldown
            record.reporters.clear()  # a new cooldown needs new reports
            return record.held_apart_until
        return None

    def skipped(self, a: str, b: str, now: float) -> None:
        """One skipped the other: not paired again from new calls within the repeat window."""
        pair = self._pair(a, b)
        if pair is not None:
            pair.skipped_at, pair.skipped_in = now, frozenset((a, b))
            self._skip_ends.append(now + self.settings.repeat_window)  # in order: time only moves on
            if len(self._skip_ends) > self.settings.max_records:
                self._skip_ends.popleft()

    def talked(self, a: str, b: str, now: float) -> None:
        """Their conversation ended (hung up, time up): avoid pairing them again within the repeat window."""
        pair = self._pair(a, b)
        if pair is not None:
            pair.talked_at, pair.talked_in = now, frozenset((a, b))

    def may_pair(self, a: str, b: str, now: float) -> bool:
        """Whether the two calls may ever be paired now: not the same caller, not reported, no skip from
        another call within the repeat window, neither held apart."""
        by, of = self._calls.get(a), self._calls.get(b)
        for caller in (by, of):
            record = self._records.get(caller.pseudonym) if caller is not None else None
            if record is not None and now < record.held_apart_until:
                return False
        if by is None or of is None:
            return True  # a call not known here: nothing against the pair
        if by.pseudonym == of.pseudonym:
            return False
        pair = self._pairs.get(frozenset((by.pseudonym, of.pseudonym)))
        if pair is None:
            return True
        if pair.reported:
            return False
        return not (now < pair.skipped_at + self.settings.repeat_window and pair.skipped_in != frozenset((a, b)))

    def is_repeat(self, a: str, b: str, now: float) -> bool:
        """Whether the two talked from other calls within the repeat window (pair them only if nobody else can be)."""
        by, of = self._calls.get(a), self._calls.get(b)
        if by is None or of is None:
            return False
        pair = self._pairs.get(frozenset((by.pseudonym, of.pseudonym)))
        if pair is None:
            return False
        return now < pair.talked_at + self.settings.repeat_window and pair.talked_in != frozenset((a, b))

    def changed_between(self, since: float, now: float) -> bool:
        """Whether a skip's repeat window ran out after `since`, up to `now` (`since` never decreases).

        The end of a cooldown needs no wake-up here: the held-apart caller's journey has its own."""
        while self._skip_ends and self._skip_ends[0] <= since:
            self._skip_ends.popleft()
        return bool(self._skip_ends) and self._skip_ends[0] <= now

    def next_change(self, now: float) -> float | None:
        """When the next skip's repeat window runs out after `now`."""
        return next((end for end in self._skip_ends if end > now), None)

    def _record(self, caller: Caller) -> _Record:
        record = self._records.get(caller.pseudonym)
        if record is None:
            record = self._records[caller.pseudonym] = _Record(caller.key_epoch, caller.withheld)
            _bound(self._records, self.settings.max_records)
        else:
            self._records.move_to_end(caller.pseudonym)
        return record

    def _pair(self, a: str, b: str) -> _Pair | None:
        by, of = self._calls.get(a), self._calls.get(b)
        if by is None or of is None or by.pseudonym == of.pseudonym:
            return None
        key = frozenset((by.pseudonym, of.pseudonym))
        pair = self._pairs.get(key)
        if pair is None:
            pair = self._pairs[key] = _Pair(min(by.key_epoch, of.key_epoch))
            _bound(self._pairs, self.settings.max_records)
        else:
            self._pairs.move_to_end(key)
        return pair

    def _forget_retired_keys(self) -> None:
        """Records of a key older than the newest, once no call made under it remains."""
        live = {caller.key_epoch for caller in self._calls.values()}
        kept = live | {self._newest_epoch}
        for pseudonym in [p for p, record in self._records.items() if record.epoch not in kept]:
            del self._records[pseudonym]
        for key in [k for k, pair in self._pairs.items() if pair.epoch not in kept]:
            del self._pairs[key]


def _bound(records: OrderedDict[str, _Record] | OrderedDict[frozenset[str], _Pair], limit: int) -> None:
    while len(records) > limit:
        records.popitem(last=False)
