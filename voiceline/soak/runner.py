"""The soak run: a real `voiceline serve` on loopback, churned by `Churn`, sampled at start, middle and end.

The end sample is taken once the service reports no call up (or SETTLE_SECONDS passed): what
it holds then should be what it held at the start, bar memory its allocator keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from voiceline.bench.runner import start_server, stop_server
from voiceline.soak.churn import Churn, ChurnCounts, ChurnOptions
from voiceline.soak.resources import HEADER, Sample, format_sample, sample
from voiceline.storage import DB_NAME

SETTLE_SECONDS = 10.0
SETTLE_POLL_SECONDS = 0.2


@dataclass
class SoakReport:
    options: ChurnOptions
    counts: ChurnCounts
    samples: list[Sample] = field(default_factory=list)
    exit_status: int | None = None  # the service's, after SIGTERM
    counted: int = 0  # calls in the hourly statistics
    errors_logged: int = 0  # error lines and tracebacks in the service's log
    seconds: float = 0.0

    def problems(self) -> list[str]:
        """What makes the run a failure (empty: it passed)."""
        counts, found = self.counts, []
        if counts.failed:
            found.append(f"{counts.failed} calls failed")
        if counts.hung:
            found.append(f"{counts.hung} calls hung")
        if counts.rtp_calls and not counts.packets_received:
            found.append("no RTP came back to any RTP call")
        if len(self.samples) == 3:
            start, _, end = self.samples
            if end.calls_up:
                found.append(f"{end.calls_up} calls still up on the service at the end")
            if end.rtp_ports != start.rtp_ports:
                found.append(f"RTP ports {start.rtp_ports} at the start, {end.rtp_ports} at the end")
        else:
            found.append("the service could not be sampled")
        if self.exit_status != 0:
            found.append(f"the service exited with status {self.exit_status}")
        if self.counted != counts.answered:
            found.append(f"{counts.answered} calls answered, {self.counted} in the hourly statistics")
        if self.errors_logged:
            found.append(f"{self.errors_logged} errors logged")
        return found

    def lines(self) -> list[str]:
        counts = self.counts
        rows = [HEADER, *(format_sample(row) for row in self.samples)]
        failures = ", ".join(f"{reason} {count}" for reason, count in counts.failures.most_common())
        rows.append(
            f"calls: {counts.placed} placed, {counts.answered} answered, {counts.completed} hung up with 200, "
            f"{counts.failed} failed{f' ({failures})' if failures else ''}, {counts.hung} hung, "
            f"{counts.ended_by_server} ended by the service"
        )
        rows.append(
            f"RTP: {counts.rtp_calls} calls sent {counts.packets_sent} packets and got {counts.packets_received} back; "
            f"{counts.rtp_silent} heard nothing (paired at once with a caller who sends none)"
        )
        rows.append(
            f"service: exit status {self.exit_status}, {self.counted} calls in the hourly statistics, "
            f"{self.errors_logged} errors logged; {self.seconds:.0f} s"
        )
        return rows


def run_soak(
    options: ChurnOptions, server_rtp: tuple[int, int], caller_ports: tuple[int, int], directory: Path
) -> SoakReport:
    """The whole run against a service started in `directory`; blocking."""
    began = time.monotonic()
    process, port, log_path = start_server(directory, f"{server_rtp[0]}-{server_rtp[1]}", options.host)
    data_dir = directory / "data"
    report = SoakReport(options, ChurnCounts())
    try:
        report.samples.append(sample("start", process.pid, data_dir, server_rtp, 0))
        report.counts, middle = asyncio.run(_churn(options, (options.host, port), caller_ports, process.pid, data_dir, server_rtp))
        report.samples.append(middle)
        _settle(process.pid, data_dir, server_rtp)
        report.samples.append(sample("end", process.pid, data_dir, server_rtp, report.counts.placed))
    finally:
        report.exit_status = stop_server(process)
    report.counted = _calls_counted(data_dir)
    report.errors_logged = _errors_logged(log_path)
    report.seconds = time.monotonic() - began
    return report


async def _churn(
    options: ChurnOptions,
    server: tuple[str, int],
    caller_ports: tuple[int, int],
    pid: int,
    data_dir: Path,
    server_rtp: tuple[int, int],
) -> tuple[ChurnCounts, Sample]:
    churn = Churn(options, server, caller_ports)
    running = asyncio.create_task(churn.run())
    halfway = asyncio.create_task(churn.half_placed.wait())
    await asyncio.wait((running, halfway), return_when=asyncio.FIRST_COMPLETED)
    if running.done():  # it failed before half the calls were placed
        halfway.cancel()
        await running
    middle = await asyncio.to_thread(sample, "middle", pid, data_dir, server_rtp, churn.counts.placed)
    return await running, middle


def _settle(pid: int, data_dir: Path, server_rtp: tuple[int, int]) -> None:
    """Until the service has no call up, at most SETTLE_SECONDS."""
    give_up = time.monotonic() + SETTLE_SECONDS
    while sample("settle", pid, data_dir, server_rtp, 0).calls_up and time.monotonic() < give_up:
        time.sleep(SETTLE_POLL_SECONDS)


def _calls_counted(data_dir: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / DB_NAME}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT coalesce(sum(calls), 0) FROM hourly_stats").fetchone()[0])


def _errors_logged(log_path: Path) -> int:
    with log_path.open("rb") as log:
        return sum(1 for line in log if b'"level": "error"' in line or line.startswith(b"Traceback"))


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())
