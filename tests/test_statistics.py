"""The statistics core without a database: the bounded aggregate, the flush schedule, the clock, busiest hours."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from structlog.testing import capture_logs

from voiceline.statistics import (
    MAX_HOURS_HELD,
    RETRY_MAX_SECONDS,
    WARN_EVERY_SECONDS,
    AnchoredClock,
    Degraded,
    FlushSchedule,
    HourTotals,
    Pending,
    Batch,
    RegistrationStatus,
    Recovered,
    StatisticsWriter,
    WriteFailed,
    busiest_hours,
    hour_of,
    journey_totals,
)

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def one_call(**figures: float) -> HourTotals:
    return HourTotals(calls=1, records=1, **figures)  # type: ignore[arg-type]


def test_counts_add_per_line_and_hour_and_keep_the_worst_jitter() -> None:
    pending = Pending()
    pending.add_hour("main", "2023-11-14T22", one_call(wait_seconds=2.0, jitter_ms_max=3.0))
    pending.add_hour("main", "2023-11-14T22", one_call(wait_seconds=1.5, jitter_ms_max=9.0))
    pending.add_hour("main", "2023-11-14T23", one_call())
    pending.add_hour("night", "2023-11-14T22", one_call())
    batch = pending.take()
    assert batch.hourly["main"]["2023-11-14T22"] == HourTotals(calls=2, wait_seconds=3.5, jitter_ms_max=9.0, records=2)
    assert sorted(batch.hourly["main"]) == ["2023-11-14T22", "2023-11-14T23"]
    assert batch.records == 4 and not pending.take()


def test_beyond_the_bound_later_hours_merge_into_the_latest_held_and_nothing_is_dropped() -> None:
    pending = Pending()
    start = datetime(2024, 1, 1, tzinfo=UTC)
    hours = [(start + timedelta(hours=i)).strftime("%Y-%m-%dT%H") for i in range(MAX_HOURS_HELD + 24)]
    for hour in hours:
        pending.add_hour("main", hour, one_call())
    pending.add_hour("other", hours[-1], one_call())  # another line has a bound of its own
    batch = pending.take()
    held = batch.hourly["main"]
    assert len(held) == MAX_HOURS_HELD
    assert held[hours[MAX_HOURS_HELD - 1]].calls == 25  # its own call and the 24 later hours'
    assert sum(totals.calls for totals in held.values()) == len(hours)
    assert batch.hourly["other"] == {hours[-1]: one_call()}
    assert pending.merged == 24


def test_refusals_are_bounded_the_same_way() -> None:
    pending = Pending()
    for i in range(MAX_HOURS_HELD + 3):
        pending.add_refusals("unknown_source", hour_of(T0 + i * 3600), 2)
    batch = pending.take()
    assert len(batch.refusals["unknown_source"]) == MAX_HOURS_HELD
    assert sum(batch.refusals["unknown_source"].values()) == 2 * (MAX_HOURS_HELD + 3)


def test_a_batch_that_failed_comes_back_merged_with_what_arrived_meanwhile() -> None:
    pending = Pending()
    pending.add_hour("main", "2023-11-14T22", one_call(talk_seconds=60.0))
    pending.add_refusals("unknown_number", "2023-11-14T22", 3)
    old_status = RegistrationStatus("failed", "403", T0, None, T0 + 30)
    pending.set_registration("carrier", old_status)
    failed = pending.take()
    pending.add_hour("main", "2023-11-14T22", one_call(talk_seconds=30.0))
    new_status = RegistrationStatus("registered", "200", T0 + 30, T0 + 3630, T0 + 3570)
    pending.set_registration("carrier", new_status)
    pending.restore(failed)
    batch = pending.take()
    assert batch.hourly["main"]["2023-11-14T22"] == HourTotals(calls=2, talk_seconds=90.0, records=2)
    assert batch.refusals == {"unknown_number": {"2023-11-14T22": 3}}
    assert batch.registrations == {"carrier": new_status}  # the later report wins over the one retried


def test_journey_counts_and_seconds_become_their_columns() -> None:
    totals = journey_totals(
        {"wait_paired": 2, "wait_abandoned": 1, "skip": 1, "max_wait_goodbye": 1, "talk_limit_ending": 1, "preference_match": 1},
        {"wait_paired": 42.5, "wait_abandoned": 120.0},
    )
    assert totals == HourTotals(
        wait_paired=2, wait_paired_seconds=42.5, wait_abandoned=1, wait_abandoned_seconds=120.0, skip=1,
        max_wait_goodbye=1, talk_limit_ending=1, preference_match=1, records=1,
    )  # fmt: skip
    assert totals.calls == 0  # a journey step is no new call


@pytest.mark.parametrize(
    ("counts", "seconds"),
    [({"hangups": 1}, {}), ({}, {"skip": 1.0}), ({"skip": -1}, {}), ({}, {"wait_paired": float("nan")})],
)
def test_unknown_or_impossible_journey_statistics_are_refused(counts: dict[str, int], seconds: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        journey_totals(counts, seconds)


def test_failures_back_off_to_a_ceiling_and_warn_once_per_period() -> None:
    schedule = FlushSchedule(interval=5.0, now=100.0)
    assert schedule.deadline == 105.0
    now, delays, warnings = 105.0, [], []
    for _ in range(10):
        warnings.append(schedule.failed(now, "locked"))
        delays.append(schedule.deadline - now)
        now = schedule.deadline
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, RETRY_MAX_SECONDS, RETRY_MAX_SECONDS, RETRY_MAX_SECONDS, RETRY_MAX_SECONDS]
    assert warnings[0] == Degraded("locked") and warnings[1:] == [None] * 9  # 363 s of failures: one warning
    while now < 105.0 + WARN_EVERY_SECONDS:
        assert schedule.failed(now, "locked") is None
        now = schedule.deadline
    assert schedule.failed(now, "full") == Degraded("full")  # still failing a period later: said again
    assert schedule.degraded
    failures = schedule.failures
    assert schedule.flushed(now + 1.0) == Recovered(now + 1.0 - 105.0, failures)
    assert not schedule.degraded and schedule.deadline == now + 6.0
    assert schedule.flushed(now + 6.0) is None  # recovered once only
    assert schedule.failed(now + 6.0, "locked") == Degraded("locked")  # a new episode warns again


async def test_the_writer_keeps_a_batch_whatever_stopped_it_and_writes_it_once() -> None:
    written: list[int] = []
    failures: list[Exception] = [WriteFailed("locked"), RuntimeError("not a database error")]

    async def write(batch: Batch) -> None:
        if failures:
            raise failures.pop(0)
        written.append(batch.hourly["main"]["2023-11-14T22"].calls)
        batch.hourly.clear()

    writer = StatisticsWriter(write, interval=3600.0)
    writer.add_hour("main", "2023-11-14T22", one_call())
    with capture_logs() as logs:
        assert not await writer.flush()
        writer.add_hour("main", "2023-11-14T22", one_call())
        assert not await writer.flush()
        assert writer.degraded
        assert await writer.flush()
    assert written == [2] and not writer.degraded
    assert [(line["event"], line.get("reason")) for line in logs] == [("storage.degraded", "locked"), ("storage.recovered", None)]
    assert await writer.close(None) == 0


def test_a_wall_clock_step_does_not_move_the_anchored_clock() -> None:
    wall, monotonic = [T0], [1000.0]
    clock = AnchoredClock(wall=lambda: wall[0], monotonic=lambda: monotonic[0])
    monotonic[0] += 1800
    wall[0] = T0 - 7200  # the system clock is stepped back two hours meanwhile
    assert clock() == T0 + 1800
    assert hour_of(clock()) == "2023-11-14T22"  # not 20:43
    monotonic[0] += 3600
    assert hour_of(clock()) == "2023-11-14T23"


@pytest.fixture
def local_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """The server's time zone for `busiest_hours`, e.g. UTC or UTC+2."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = request.param
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


NOW = datetime(2024, 3, 1, 12, tzinfo=UTC).timestamp()


def history(days: int, calls_at: dict[int, int]) -> list[tuple[str, int]]:
    """`days` days before NOW with `calls_at[utc hour]` calls at those hours of each day."""
    start = datetime.fromtimestamp(NOW, UTC).replace(hour=0) - timedelta(days=days)
    return [
        ((start + timedelta(days=day, hours=hour)).strftime("%Y-%m-%dT%H"), calls)
        for day in range(days)
        for hour, calls in calls_at.items()
    ]


@pytest.mark.parametrize("local_time", ["UTC"], indirect=True)
def test_busiest_hours_are_the_three_with_most_calls(local_time: None) -> None:
    rows = history(14, {8: 1, 19: 3, 20: 5, 21: 4, 22: 1})
    assert busiest_hours(rows, NOW) == (19, 22)


@pytest.mark.parametrize("local_time", ["UTC"], indirect=True)
def test_busiest_hours_may_run_past_midnight(local_time: None) -> None:
    assert busiest_hours(history(10, {23: 4, 0: 5, 1: 4, 12: 2}), NOW) == (23, 2)


@pytest.mark.parametrize("local_time", ["Etc/GMT-2"], indirect=True)  # UTC+2
def test_busiest_hours_are_in_the_servers_local_time(local_time: None) -> None:
    assert busiest_hours(history(10, {18: 4, 19: 5, 20: 4}), NOW) == (20, 23)


@pytest.mark.parametrize("local_time", ["UTC"], indirect=True)
def test_too_little_history_says_nothing(local_time: None) -> None:
    assert busiest_hours(history(6, {19: 10, 20: 10}), NOW) is None  # calls on 6 days only
    assert busiest_hours(history(10, {20: 2}), NOW) is None  # 20 calls: below the minimum
    assert busiest_hours(history(10, {20: 3}), NOW) == (19, 22)  # 30 calls on 10 days: enough, the hour centred
    old = [(hour_of(datetime.strptime(h, "%Y-%m-%dT%H").replace(tzinfo=UTC).timestamp() - 40 * 86400), c) for h, c in history(10, {20: 9})]
    assert busiest_hours(old, NOW) is None  # more than four weeks ago
