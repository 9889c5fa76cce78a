"""Anonymous statistics held in memory per line and hour, written to the database in batches.

Recording a count only adds it to `Pending` (no I/O); `StatisticsWriter` writes
everything pending every flush interval through the callable it is given, one
statement per table. While the database refuses writes (locked, disk full,
read-only, I/O errors) nothing is dropped: a failed batch goes back into
`Pending` and is retried with a growing backoff (`FlushSchedule`). The service
then logs one `storage.degraded` warning (repeated at most every
`WARN_EVERY_SECONDS` while it lasts, with what is held) and one
`storage.recovered` when a batch is written again; never a traceback per failure.

Memory is bounded: at most `MAX_HOURS_HELD` different hours are held per line
(and per refusal reason). Counts for a further hour are added to the latest
hour held for it instead: they are merged into a coarser hour, never dropped.

Hours follow `AnchoredClock`: the wall clock read once when storage opens,
advanced by the monotonic clock. A step of the system clock while the service
runs moves no count between hours; the next start takes up the new time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime

import structlog

log = structlog.get_logger("voiceline.storage")

# Per line (and per refusal reason): a week of hours before later hours are merged into the last one.
MAX_HOURS_HELD = 168
RETRY_MIN_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
WARN_EVERY_SECONDS = 900.0

# What `record_journey` counts, and which of them carry the seconds waited.
JOURNEY_COUNTS = (
    "wait_paired", "wait_abandoned", "max_wait_goodbye", "skip", "talk_limit_ending", "preference_match",
    "help_request", "help_connected", "help_failed", "report", "cooldown_started", "rate_limited",
)  # fmt: skip
JOURNEY_SECONDS = ("wait_paired", "wait_abandoned")

# The busiest hours: the BUSIEST_WINDOW consecutive hours of the day (server's local time) with most
# calls over the HISTORY_DAYS days before now, once calls were recorded on at least MIN_DAYS of those
# days and MIN_CALLS in all; else None.
BUSIEST_WINDOW = 3
HISTORY_DAYS = 28
MIN_DAYS = 7
MIN_CALLS = 30


def hour_of(unix_time: float) -> str:
    """The UTC hour a count belongs to, as stored: 'YYYY-MM-DDTHH'."""
    return datetime.fromtimestamp(unix_time, UTC).strftime("%Y-%m-%dT%H")


class AnchoredClock:
    """Unix time read once, then advanced by the monotonic clock: a wall-clock step moves nothing."""

    def __init__(self, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._offset = wall() - monotonic()

    def __call__(self) -> float:
        return self._offset + self._monotonic()


@dataclass
class HourTotals:
    """What one line added in one hour: the `hourly_stats` columns, all summed but the worst jitter."""

    calls: int = 0
    paired: int = 0
    wait_seconds: float = 0.0
    talk_seconds: float = 0.0
    packets_expected: int = 0
    packets_lost: int = 0
    jitter_ms_max: float = 0.0
    wait_paired: int = 0
    wait_paired_seconds: float = 0.0
    wait_abandoned: int = 0
    wait_abandoned_seconds: float = 0.0
    max_wait_goodbye: int = 0
    skip: int = 0
    talk_limit_ending: int = 0
    preference_match: int = 0
    help_request: int = 0
    help_connected: int = 0
    help_failed: int = 0
    report: int = 0
    cooldown_started: int = 0
    rate_limited: int = 0
    records: int = field(default=0, metadata={"stored": False})  # how many record_* calls it holds

    def add(self, other: HourTotals) -> None:
        for column in fields(self):
            mine, theirs = getattr(self, column.name), getattr(other, column.name)
            setattr(self, column.name, max(mine, theirs) if column.name == "jitter_ms_max" else mine + theirs)


HOURLY_COLUMNS = tuple(column.name for column in fields(HourTotals) if column.metadata.get("stored", True))


def _check(values: Iterable[float]) -> None:
    if not all(math.isfinite(value) and value >= 0 for value in values):
        raise ValueError("statistics must be finite and non-negative")


def journey_totals(counts: Mapping[str, int], seconds: Mapping[str, float]) -> HourTotals:
    """`record_journey`'s counts (JOURNEY_COUNTS) and seconds waited (JOURNEY_SECONDS) as one hour's totals."""
    unknown = (set(counts) - set(JOURNEY_COUNTS)) | (set(seconds) - set(JOURNEY_SECONDS))
    if unknown:
        raise ValueError(f"not a journey statistic: {', '.join(sorted(unknown))}")
    _check([*counts.values(), *seconds.values()])
    totals = HourTotals(records=1)
    for name, count in counts.items():
        setattr(totals, name, int(count))
    for name, waited in seconds.items():
        setattr(totals, f"{name}_seconds", float(waited))
    return totals


def _hour_held(held: Mapping[str, object], hour: str) -> str:
    """`hour`, or the latest hour held when MAX_HOURS_HELD others already are."""
    if hour in held or len(held) < MAX_HOURS_HELD:
        return hour
    return max(held)


@dataclass(frozen=True)
class RegistrationStatus:
    """A trunk's registration as the server last reported it (the latest replaces any held)."""

    state: str
    detail: str
    at: float
    expires_at: float | None
    next_attempt: float | None


@dataclass
class Batch:
    """What is not written yet: line -> hour -> totals, refusal reason -> hour -> count, trunk -> status."""

    hourly: dict[str, dict[str, HourTotals]] = field(default_factory=dict)
    refusals: dict[str, dict[str, int]] = field(default_factory=dict)
    registrations: dict[str, RegistrationStatus] = field(default_factory=dict)

    @property
    def records(self) -> int:
        refused = sum(sum(hours.values()) for hours in self.refusals.values())
        hourly = sum(totals.records for hours in self.hourly.values() for totals in hours.values())
        return refused + hourly + len(self.registrations)

    def __bool__(self) -> bool:
        return bool(self.hourly or self.refusals or self.registrations)


class Pending:
    """The in-memory aggregate: bounded per line and reason, merged and never dropped."""

    def __init__(self) -> None:
        self._batch = Batch()
        self.merged = 0  # records added to an earlier hour than their own, because of the bound

    @property
    def records(self) -> int:
        return self._batch.records

    def add_hour(self, line: str, hour: str, totals: HourTotals) -> None:
        held = self._batch.hourly.setdefault(line, {})
        slot = _hour_held(held, hour)
        self.merged += totals.records if slot != hour else 0
        held.setdefault(slot, HourTotals()).add(totals)

    def add_refusals(self, reason: str, hour: str, count: int) -> None:
        held = self._batch.refusals.setdefault(reason, {})
        slot = _hour_held(held, hour)
        self.merged += count if slot != hour else 0
        held[slot] = held.get(slot, 0) + count

    def set_registration(self, trunk: str, status: RegistrationStatus) -> None:
        self._batch.registrations[trunk] = status

    def take(self) -> Batch:
        batch, self._batch = self._batch, Batch()
        return batch

    def restore(self, batch: Batch) -> None:
        """A batch that could not be written comes back, merged with what arrived meanwhile."""
        for line, hours in batch.hourly.items():
            for hour, totals in hours.items():
                self.add_hour(line, hour, totals)
        for reason, counts in batch.refusals.items():
            for hour, count in counts.items():
                self.add_refusals(reason, hour, count)
        for trunk, status in batch.registrations.items():
            self._batch.registrations.setdefault(trunk, status)  # unless a later one came meanwhile


@dataclass(frozen=True)
class Degraded:
    """Log a `storage.degraded` warning now."""

    reason: str


@dataclass(frozen=True)
class Recovered:
    """Log `storage.recovered`: writes work again after `seconds` and `failures` failed attempts."""

    seconds: float
    failures: int


class FlushSchedule:
    """Sans-I/O: when to write next, the backoff while writes fail, and when to say so."""

    def __init__(self, interval: float, now: float) -> None:
        self.interval = interval
        self.deadline = now + interval
        self.failures = 0
        self._failing_since = 0.0
        self._warned_at: float | None = None

    @property
    def degraded(self) -> bool:
        return self.failures > 0

    def flushed(self, now: float) -> Recovered | None:
        self.deadline = now + self.interval
        if not self.failures:
            return None
        recovered = Recovered(now - self._failing_since, self.failures)
        self.failures = 0
        self._warned_at = None
        return recovered

    def failed(self, now: float, reason: str) -> Degraded | None:
        if not self.failures:
            self._failing_since = now
        self.failures += 1
        self.deadline = now + min(RETRY_MAX_SECONDS, RETRY_MIN_SECONDS * 2 ** (self.failures - 1))
        if self._warned_at is not None and now - self._warned_at < WARN_EVERY_SECONDS:
            return None
        self._warned_at = now
        return Degraded(reason)


class WriteFailed(Exception):
    """The database refused a write; `reason` says why in a word (locked, full, read_only, permission_denied, io_error, error)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StatisticsWriter:
    """The asyncio edge: holds counts in `Pending` and writes them with `write` on the schedule.

    `write(batch)` writes what it can and removes that from the batch; it raises
    `WriteFailed` for the rest, which is kept and retried. The writing task starts
    with the first count, so a storage that records nothing (the command line) runs none.
    """

    def __init__(self, write: Callable[[Batch], Awaitable[None]], interval: float) -> None:
        self.pending = Pending()
        self._write = write
        self._interval = interval
        self._schedule: FlushSchedule | None = None
        self._flushing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._writing = 0  # records of the batch being written

    @property
    def held(self) -> int:
        """Records not yet written: pending, and in a write under way."""
        return self.pending.records + self._writing

    @property
    def degraded(self) -> bool:
        return self._schedule is not None and self._schedule.degraded

    def add_hour(self, line: str, hour: str, totals: HourTotals) -> None:
        self.pending.add_hour(line, hour, totals)
        self._start()

    def add_refusals(self, reason: str, hour: str, count: int) -> None:
        self.pending.add_refusals(reason, hour, count)
        self._start()

    def set_registration(self, trunk: str, status: RegistrationStatus) -> None:
        self.pending.set_registration(trunk, status)
        self._start()

    def _start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _scheduled(self) -> FlushSchedule:
        if self._schedule is None:
            self._schedule = FlushSchedule(self._interval, asyncio.get_running_loop().time())
        return self._schedule

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, self._scheduled().deadline - loop.time()))
            await self.flush()

    async def flush(self) -> bool:
        """Write everything pending now; False when the database refused (it stays pending).

        Shielded: a caller cancelled meanwhile (closing stops the writing task) leaves the
        write to finish, so a batch is neither lost nor, once written, put back.
        """
        return await asyncio.shield(self._flush())

    async def _flush(self) -> bool:
        async with self._flushing:
            batch = self.pending.take()
            now = asyncio.get_running_loop().time
            schedule = self._scheduled()
            if not batch:
                schedule.flushed(now())  # nothing held, so it was not degraded
                return True
            records = self._writing = batch.records
            try:
                await self._write(batch)
            except Exception as exc:  # kept and retried whatever went wrong, so the writing goes on
                self.pending.restore(batch)
                self._writing = 0
                degraded = schedule.failed(now(), exc.reason if isinstance(exc, WriteFailed) else type(exc).__name__)
                if degraded is not None:
                    log.warning(
                        "storage.degraded",
                        reason=degraded.reason,
                        held=self.pending.records,
                        merged=self.pending.merged,
                        retry_in=round(schedule.deadline - now(), 1),
                    )
                return False
            self._writing = 0
            recovered = schedule.flushed(now())
            if recovered is not None:
                log.info(
                    "storage.recovered", seconds=round(recovered.seconds, 1), failures=recovered.failures, written=records
                )
            return True

    async def close(self, deadline: float | None) -> int:
        """Write what is pending, retrying until `deadline` (the loop's time; None: one attempt).

        Returns how many records were abandoned (0 when everything was written).
        """
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        loop = asyncio.get_running_loop()
        while not await self.flush():
            retry_at = self._scheduled().deadline
            if deadline is None or retry_at >= deadline:
                break
            await asyncio.sleep(retry_at - loop.time())
        abandoned = self.pending.take().records
        if abandoned:
            log.error("storage.abandoned", records=abandoned)
        return abandoned


def busiest_hours(calls_by_hour: Iterable[tuple[str, int]], now: float) -> tuple[int, int] | None:
    """(from, to) local hours of the day, `to` exclusive and possibly past midnight, or None (see the rule above).

    `calls_by_hour`: (UTC hour as stored, calls) rows; only those in the HISTORY_DAYS before `now` count.
    """
    since = hour_of(now - HISTORY_DAYS * 86400)
    until = hour_of(now)
    per_hour_of_day = [0] * 24
    days: set[str] = set()
    for hour, calls in calls_by_hour:
        if not since <= hour < until or calls <= 0:
            continue
        local = datetime.strptime(hour, "%Y-%m-%dT%H").replace(tzinfo=UTC).astimezone()
        per_hour_of_day[local.hour] += calls
        days.add(local.date().isoformat())
    if len(days) < MIN_DAYS or sum(per_hour_of_day) < MIN_CALLS:
        return None
    window = [sum(per_hour_of_day[(start + i) % 24] for i in range(BUSIEST_WINDOW)) for start in range(24)]
    # Ties go to the window whose middle hour is busiest: a single busy hour is centred.
    start = max(range(24), key=lambda first: (window[first], per_hour_of_day[(first + 1) % 24]))
    return start, (start + BUSIEST_WINDOW) % 24
