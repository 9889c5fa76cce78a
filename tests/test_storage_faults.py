"""Statistics survive a database that refuses writes (locked, disk full, read-only): real SQLite, real file systems."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from filesystems import ext4_image, fill, read_only_view, small_tmpfs, turn_read_only
from voiceline.statistics import MAX_HOURS_HELD
from voiceline.storage import DB_NAME, CallAudio, Storage, StorageError, StorageUnavailable
from waiting import until

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
NEVER = 3600.0  # a flush interval no test waits for: those tests flush themselves


@contextlib.contextmanager
def locked(db_path: Path) -> Iterator[sqlite3.Connection]:
    """Another process's view: a connection holding BEGIN EXCLUSIVE until the block ends."""
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield holder
    finally:
        holder.execute("ROLLBACK")
        holder.close()


async def place_calls(store: Storage, count: int, at: float = T0) -> None:
    """`count` answered calls, each paired for a minute after a 10 s wait, and their journeys."""
    for _ in range(count):
        await store.record_answer("main", at)
        await store.record_journey("main", at + 10, {"wait_paired": 1}, {"wait_paired": 10.0})
        await store.record_call("main", at + 70, 10.0, 60.0, True, CallAudio(3000, 3, 2.0), answered_at=at)
        await store.record_refusal("unknown_source", at)


async def totals(store: Storage) -> tuple[int, int, float, int, float, int]:
    rows = await store.hourly("main")
    refused = sum(row["count"] for row in await store.refusals())
    return (
        sum(r["calls"] for r in rows), sum(r["paired"] for r in rows), sum(r["talk_seconds"] for r in rows),
        sum(r["wait_paired"] for r in rows), sum(r["wait_paired_seconds"] for r in rows), refused,
    )  # fmt: skip


def storage_lines(logs: list[dict[str, Any]]) -> list[str]:
    assert not any("exc_info" in line for line in logs), "a traceback was logged"
    return [line["event"] for line in logs if line["event"].startswith("storage.")]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Storage]:
    s = await Storage.open(tmp_path, busy_timeout=0.05, flush_interval=NEVER)
    yield s
    await s.close()


async def test_counts_held_while_locked_are_all_written_after(store: Storage, tmp_path: Path) -> None:
    with capture_logs() as logs:
        with locked(tmp_path / DB_NAME):
            await place_calls(store, 9)
            assert not await store.flush()
            assert store.degraded
            await place_calls(store, 5)
            assert not await store.flush()  # still locked: held, and not warned about again
        assert await store.flush()
    assert not store.degraded
    assert await totals(store) == (14, 14, 14 * 60.0, 14, 140.0, 14)
    assert storage_lines(logs) == ["storage.degraded", "storage.recovered"]
    degraded, recovered = (line for line in logs if line["event"].startswith("storage."))
    assert degraded["reason"] == "locked" and degraded["held"] == 9 * 4 and degraded["log_level"] == "warning"
    assert recovered["failures"] == 2 and recovered["written"] == 14 * 4


async def test_the_flush_task_retries_by_itself(tmp_path: Path) -> None:
    store = await Storage.open(tmp_path, busy_timeout=0.05, flush_interval=0.05)
    try:
        with capture_logs() as logs:
            with locked(tmp_path / DB_NAME):
                await place_calls(store, 3)
                await until(lambda: store.degraded)
            await until(lambda: not store.degraded)  # the first retry comes 1 s after the failure
            rows = await asyncio.to_thread(query, tmp_path / DB_NAME, "SELECT sum(calls) FROM hourly_stats")
        assert rows == [(3,)]
        assert storage_lines(logs) == ["storage.degraded", "storage.recovered"]
    finally:
        await store.close()


def query(db_path: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        return db.execute(sql).fetchall()


async def test_a_crash_loses_at_most_one_flush_interval(tmp_path: Path) -> None:
    """Calls are counted when answered and written every interval: a process killed then has them on disk."""
    store = await Storage.open(tmp_path, flush_interval=0.05)
    try:
        for _ in range(4):
            await store.record_answer("main", store.clock())  # calls still up

        async def on_disk() -> bool:  # what another process (the service restarted after a kill -9) finds
            return await asyncio.to_thread(query, tmp_path / DB_NAME, "SELECT sum(calls) FROM hourly_stats") == [(4,)]

        await until(on_disk)
    finally:
        await store.close()


async def test_close_gives_up_at_its_deadline_and_says_how_much(store: Storage, tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    with capture_logs() as logs:
        with locked(tmp_path / DB_NAME):
            await place_calls(store, 2)
            started = loop.time()
            abandoned = await store.close(deadline=started + 1.5)
            took = loop.time() - started
    assert abandoned == 8
    assert 1.0 <= took < 1.5 + 0.5  # retried (after 1 s) until the next retry would pass the deadline
    assert storage_lines(logs) == ["storage.degraded", "storage.abandoned"]
    reopened = await Storage.open(tmp_path)
    try:
        assert await reopened.hourly() == []
    finally:
        await reopened.close()


@pytest.mark.parametrize("lock", [False, True])
async def test_a_flush_whose_caller_is_cancelled_counts_everything_once(tmp_path: Path, lock: bool) -> None:
    store = await Storage.open(tmp_path, busy_timeout=0.2, flush_interval=NEVER)
    try:
        with locked(tmp_path / DB_NAME) if lock else contextlib.nullcontext():
            await place_calls(store, 3)
            flushing = asyncio.get_running_loop().create_task(store.flush())
            for _ in range(3):  # the write goes to the database's thread (and waits there while locked)
                await asyncio.sleep(0)
            assert not flushing.done()
            flushing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await flushing
        assert await totals(store) == (3, 3, 180.0, 3, 30.0, 3)
    finally:
        await store.close()


async def test_close_writes_what_is_held(tmp_path: Path) -> None:
    store = await Storage.open(tmp_path, flush_interval=NEVER)
    await place_calls(store, 3)
    assert await store.close(deadline=None) == 0
    assert query(tmp_path / DB_NAME, "SELECT sum(calls), sum(paired) FROM hourly_stats") == [(3, 3)]


async def test_a_long_outage_merges_later_hours_and_loses_no_count(store: Storage, tmp_path: Path) -> None:
    with locked(tmp_path / DB_NAME):
        for hour in range(MAX_HOURS_HELD + 10):
            await store.record_answer("main", T0 + hour * 3600)
        assert not await store.flush()
    assert await store.flush()
    rows = await store.hourly("main")
    assert len(rows) == MAX_HOURS_HELD and sum(row["calls"] for row in rows) == MAX_HOURS_HELD + 10
    assert rows[-1]["calls"] == 11


async def test_registration_status_is_held_and_written_after_a_lock(store: Storage, tmp_path: Path) -> None:
    with locked(tmp_path / DB_NAME):
        await store.set_registration_status("carrier", "failed", "403", T0, None, T0 + 30)
        await store.set_registration_status("carrier", "registered", "200 OK", T0 + 30, T0 + 3630, T0 + 3570)
    assert [(row["trunk"], row["state"]) for row in await store.registration_status()] == [("carrier", "registered")]


async def test_provisioning_writes_to_a_locked_database_say_so(tmp_path: Path) -> None:
    store = await Storage.open(tmp_path, busy_timeout=0.05)
    try:
        with locked(tmp_path / DB_NAME):
            with pytest.raises(StorageUnavailable, match="^cannot write to .*: the database is locked by another process"):
                await store.add("lines", "general", {"numbers": ["100"]})
        await store.add("lines", "general", {"numbers": ["100"]})
        assert [row["name"] for row in await store.records("lines")] == ["general"]
    finally:
        await store.close()


# -- real file systems: a full disk and a read-only one (need root to mount) ---------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "disk") as disk:
        yield disk


@pytest.mark.integration
async def test_counts_held_while_the_disk_is_full_are_written_when_space_returns(small_disk: Path) -> None:
    store = await Storage.open(small_disk / "data", flush_interval=NEVER)
    try:
        await place_calls(store, 2)
        assert await store.flush()
        filler = fill(small_disk)
        with capture_logs() as logs:
            for round_ in range(3):
                await place_calls(store, 50, at=T0 + round_ * 3600)
                assert not await store.flush()
            filler.unlink()
            assert await store.flush()
        assert await totals(store) == (152, 152, 152 * 60.0, 152, 1520.0, 152)
        assert storage_lines(logs) == ["storage.degraded", "storage.recovered"]
        assert [line["reason"] for line in logs if line["event"] == "storage.degraded"] == ["full"]
    finally:
        await store.close()


@pytest.mark.integration
async def test_a_full_disk_at_start_is_named_and_leaves_no_file(small_disk: Path) -> None:
    existing = small_disk / "existing"
    store = await Storage.open(existing)
    await store.close()
    before = sorted(p.name for p in existing.iterdir())
    fill(small_disk)
    for data_dir in (small_disk / "new", existing):
        with pytest.raises(StorageUnavailable, match="disk is full"):
            await Storage.open(data_dir)
    assert list((small_disk / "new").iterdir()) == []
    assert sorted(p.name for p in existing.iterdir()) == before == [DB_NAME]


@pytest.fixture
def writable_and_read_only(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A data directory and a read-only view of it."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    with read_only_view(data, tmp_path / "view") as view:
        yield data, view


@pytest.mark.integration
async def test_a_read_only_data_dir_at_start_is_named(writable_and_read_only: tuple[Path, Path]) -> None:
    data, view = writable_and_read_only
    store = await Storage.open(data)
    await place_calls(store, 1)
    await store.close()
    with pytest.raises(StorageError, match="Read-only file system|read-only"):
        await Storage.open(view)


@pytest.mark.integration
async def test_a_file_system_turned_read_only_while_open_is_named_once_and_what_it_costs_is_said(tmp_path: Path) -> None:
    """It cannot come back without a restart (the kernel aborted it): counts are held meanwhile, the
    statistics that were written stay readable, and closing says how many were abandoned."""
    with ext4_image(tmp_path / "disk", tmp_path / "disk.img") as disk:
        store = await Storage.open(disk / "data", busy_timeout=0.05, flush_interval=NEVER)
        try:
            await place_calls(store, 2)
            assert await store.flush()
            turn_read_only(disk)
            with capture_logs() as logs:
                for _ in range(3):
                    await place_calls(store, 5)
                    assert not await store.flush()
                assert (await totals(store))[0] == 2  # what was written is still read
                abandoned = await store.close()
            assert abandoned == 3 * 5 * 4
            assert storage_lines(logs) == ["storage.degraded", "storage.abandoned"]
            # The kernel's own log says it remounted the file system read-only; SQLite sees I/O errors.
            assert [line["reason"] for line in logs if line["event"] == "storage.degraded"] == ["io_error"]
        finally:
            await store.close()


def voiceline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "voiceline", *args], capture_output=True, text=True, timeout=30)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.integration
def test_line_add_on_a_locked_database_gives_up_with_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert voiceline("line", "add", "first", "--number", "100", "--data-dir", str(data)).returncode == 0
    with locked(data / DB_NAME):
        line = one_error_line(voiceline("line", "add", "second", "--number", "200", "--data-dir", str(data)))
    assert line.startswith("voiceline line add: ") and "locked by another process" in line
    assert [name for (name,) in query(data / DB_NAME, "SELECT name FROM lines")] == ["first"]


@pytest.mark.integration
def test_line_add_on_a_read_only_or_full_data_dir_gives_up_with_one_line(
    writable_and_read_only: tuple[Path, Path], small_disk: Path
) -> None:
    data, view = writable_and_read_only
    assert voiceline("line", "add", "first", "--number", "100", "--data-dir", str(data)).returncode == 0
    line = one_error_line(voiceline("line", "add", "second", "--number", "200", "--data-dir", str(view)))
    assert line.startswith("voiceline line add: ") and "Read-only file system" in line
    assert voiceline("line", "add", "first", "--number", "100", "--data-dir", str(small_disk / "data")).returncode == 0
    fill(small_disk)
    line = one_error_line(voiceline("line", "add", "second", "--number", "200", "--data-dir", str(small_disk / "data")))
    assert line.startswith("voiceline line add: ") and "disk is full" in line, line
