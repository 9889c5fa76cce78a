"""The running service's statistics when its database is locked, and when it is killed: real pjsua2 callers."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from filesystems import fill, small_tmpfs
from voiceline.sim.plugin import VoicelineServer, default_server_rtp_ports, start_server
from voiceline.sim.runner import CallReport, CallSpec
from voiceline.storage import DB_NAME

pytestmark = pytest.mark.interop

FAST_WRITES = {"sip": {"answer_delay": 0.1}, "storage": {"flush_interval": 0.2}}


@contextlib.contextmanager
def locked(db_path: Path) -> Iterator[None]:
    """Another process holding BEGIN EXCLUSIVE on the service's database until the block ends."""
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def calls_on_disk(server: VoicelineServer) -> int:
    with contextlib.closing(sqlite3.connect(server.data_dir / DB_NAME)) as db:
        (calls,) = db.execute("SELECT coalesce(sum(calls), 0) FROM hourly_stats").fetchone()
    return int(calls)


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s"
        time.sleep(0.05)


def storage_events(server: VoicelineServer) -> list[str]:
    text = server.log_text()
    assert "Traceback" not in text and "loop.error" not in text, server.log_tail()
    return [event["event"] for event in server.log_events() if event.get("event", "").startswith("storage.")]


def test_calls_placed_while_the_database_is_locked_are_all_counted_after(
    voiceline_server: Callable[..., VoicelineServer], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server(FAST_WRITES)
    target = server.uri("line")
    with locked(server.data_dir / DB_NAME):  # for the calls' few seconds: longer than the busy timeout (1 s)
        reports = sim_calls([CallSpec(target, seconds=1.0, start_after=0.3 * i) for i in range(6)])
        assert calls_on_disk(server) == 0  # nothing could be written meanwhile
    assert all(report.connected for report in reports), reports
    wait_until(lambda: calls_on_disk(server) == 6, 10)
    assert storage_events(server) == ["storage.degraded", "storage.recovered"]
    assert server.stop() == 0


def test_calls_placed_while_the_disk_is_full_are_all_counted_when_space_returns(
    tmp_path: Path, sim_calls: Callable[..., list[CallReport]]
) -> None:
    # The data directory alone on a small tmpfs; the server's log stays outside it.
    with small_tmpfs(tmp_path / "server" / "data", "2m") as data:
        server = start_server(tmp_path / "server", FAST_WRITES, 0, default_server_rtp_ports(), "127.0.0.1")
        try:
            filler = fill(data)
            reports = sim_calls([CallSpec(server.uri("line"), seconds=1.0, start_after=0.3 * i) for i in range(6)])
            assert all(report.connected for report in reports), reports
            assert calls_on_disk(server) == 0
            filler.unlink()
            wait_until(lambda: calls_on_disk(server) == 6, 10)
            assert storage_events(server) == ["storage.degraded", "storage.recovered"]
            (degraded,) = [event for event in server.log_events() if event.get("event") == "storage.degraded"]
            assert degraded["reason"] == "full"
        finally:
            assert server.stop() == 0


def test_sigterm_while_locked_exits_promptly_and_says_what_it_abandoned(
    voiceline_server: Callable[..., VoicelineServer], sim_calls: Callable[..., list[CallReport]]
) -> None:
    shutdown_timeout = 2.0
    server = voiceline_server({**FAST_WRITES, "sip": {**FAST_WRITES["sip"], "shutdown_timeout": shutdown_timeout}})
    with locked(server.data_dir / DB_NAME):
        (report,) = sim_calls([CallSpec(server.uri("line"), seconds=0.5)])
        assert report.connected, report
        started = time.monotonic()
        assert server.stop() == 0
        # The writes are retried until the shutdown deadline, then given up: within it, plus the
        # busy timeout of a write under way.
        assert time.monotonic() - started < shutdown_timeout + 1.5
    assert storage_events(server)[-1] == "storage.abandoned"
    (abandoned,) = [event for event in server.log_events() if event.get("event") == "storage.abandoned"]
    assert abandoned["records"] >= 2  # the call's answer and its end


def test_calls_up_when_the_service_is_killed_are_counted(tmp_path: Path, sim_calls: Callable[..., list[CallReport]]) -> None:
    server = start_server(tmp_path / "server", FAST_WRITES, 0, default_server_rtp_ports(), "127.0.0.1")
    try:
        with ThreadPoolExecutor(1) as pool:
            placing = pool.submit(
                sim_calls, [CallSpec(server.uri("line"), seconds=6.0), CallSpec(server.uri("line"), seconds=6.0)], 15.0
            )
            server.wait_for_event("call.confirmed", count=2)
            wait_until(lambda: calls_on_disk(server) == 2, 5)  # within a flush interval of the answer
            server.process.kill()
            server.process.wait()
            placing.result(timeout=60)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
    assert calls_on_disk(server) == 2
