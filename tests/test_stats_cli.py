"""`voiceline stats`: what it reads from a real database, and what it prints."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from voiceline.stats_cli import format_report, report, since_hour
from voiceline.storage import DB_NAME, CallAudio, Storage

NOW = datetime(2024, 3, 1, 12, 30, tzinfo=UTC).timestamp()
HOUR = 3600.0


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    """Busiest hours are the server's local time: UTC here, so the figures below are fixed."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


async def seed(data_dir: Path) -> None:
    """Ten days of evening calls on `main`, and one busy hour yesterday at 09:00 UTC with every kind of count."""
    store = await Storage.open(data_dir)
    for day in range(1, 11):
        for hour in (19, 20, 21):
            at = datetime(2024, 3, 1, hour, 10, tzinfo=UTC).timestamp() - day * 86400
            for _ in range(2):
                await store.record_answer("main", at)
    at = datetime(2024, 2, 29, 9, 5, tzinfo=UTC).timestamp()
    for waited in (10.0, 20.0):
        await store.record_answer("main", at)
        await store.record_journey("main", at + waited, {"wait_paired": 1, "preference_match": 1}, {"wait_paired": waited})
        await store.record_call("main", at + 60, waited, 45.0, True, CallAudio(1000, 10, 3.0), answered_at=at)
    await store.record_journey("main", at, {"wait_abandoned": 1}, {"wait_abandoned": 90.0})
    await store.record_journey("main", at, {"max_wait_goodbye": 1, "skip": 2, "talk_limit_ending": 1}, {})
    safety = {"help_request": 3, "help_connected": 1, "help_failed": 2, "report": 4, "cooldown_started": 1, "rate_limited": 5}
    await store.record_journey("main", at, safety, {})
    await store.record_call("night", at, 5.0, 0.0, False)  # counted at its end: no answered_at
    await store.record_refusal("unknown_source", at, 3)
    await store.close()


async def test_hourly_rows_with_averages_loss_and_busiest_hours(tmp_path: Path) -> None:
    await seed(tmp_path)
    stats = report(tmp_path / DB_NAME, since_hour("1d", NOW), None, False, NOW)
    assert stats["per"] == "hour" and stats["since"] == "2024-02-29T12"
    rows = {(row["hour"], row["line"]): row for row in stats["rows"]}
    assert sorted(rows) == [("2024-02-29T19", "main"), ("2024-02-29T20", "main"), ("2024-02-29T21", "main")]
    stats = report(tmp_path / DB_NAME, since_hour("2024-02-29", NOW), None, False, NOW)
    busy = {(row["hour"], row["line"]): row for row in stats["rows"]}[("2024-02-29T09", "main")]
    assert busy == {
        "hour": "2024-02-29T09", "line": "main", "calls": 2, "paired": 2, "wait_paired": 2,
        "wait_paired_avg_seconds": 15.0, "wait_abandoned": 1, "wait_abandoned_avg_seconds": 90.0,
        "max_wait_goodbye": 1, "skip": 2, "talk_limit_ending": 1, "preference_match": 2, "talk_seconds": 90.0,
        "audio_loss_percent": 1.0, "jitter_ms_max": 3.0, "help_request": 3, "help_connected": 1, "help_failed": 2,
        "report": 4, "cooldown_started": 1, "rate_limited": 5,
    }  # fmt: skip
    assert {(row["hour"], row["line"]): row["calls"] for row in stats["rows"]}[("2024-02-29T09", "night")] == 1
    assert stats["busiest_hours"] == {"main": [19, 22], "night": None}  # night: one call, no history
    assert stats["refusals"] == {"unknown_source": 3}


async def test_per_day_and_per_line(tmp_path: Path) -> None:
    await seed(tmp_path)
    stats = report(tmp_path / DB_NAME, since_hour("3d", NOW), "main", True, NOW)
    assert [(row["day"], row["line"], row["calls"]) for row in stats["rows"]] == [
        ("2024-02-27", "main", 6), ("2024-02-28", "main", 6), ("2024-02-29", "main", 8),
    ]  # fmt: skip
    assert list(stats["busiest_hours"]) == ["main"]


async def test_the_table_for_people(tmp_path: Path) -> None:
    await seed(tmp_path)
    text = format_report(report(tmp_path / DB_NAME, since_hour("2024-02-29", NOW), None, False, NOW))
    header, *lines = text.splitlines()
    assert header.split()[:5] == ["HOUR", "(UTC)", "LINE", "CALLS", "PAIRED"]
    busy = next(line for line in lines if line.startswith("2024-02-29T09:00  main"))
    assert busy.split()[2:] == ["2", "2", "2", "15.0", "1", "90.0", "1", "2", "1", "2", "3", "1", "2", "4", "1", "5", "1.0"]
    assert "busiest hours, line main: 19:00-22:00 local time" in lines
    assert "busiest hours, line night: not enough history yet" in lines
    assert lines[-1] == "refused before a call existed: unknown_source 3"


@pytest.mark.parametrize(
    ("text", "hour"), [("24h", "2024-02-29T12"), ("7d", "2024-02-23T12"), ("2w", "2024-02-16T12"), ("2024-02-01", "2024-02-01T00")]
)
def test_since_takes_a_date_or_a_span(text: str, hour: str) -> None:
    assert since_hour(text, NOW) == hour


@pytest.mark.parametrize("text", ["yesterday", "7", "2024-13-01", "-3d"])
def test_since_refuses_anything_else(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        since_hour(text, NOW)


def voiceline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "voiceline", "stats", *args], capture_output=True, text=True, timeout=30, env={**os.environ, "TZ": "UTC"}
    )


@pytest.mark.integration
async def test_the_command_reads_a_database_nobody_has_open(tmp_path: Path) -> None:
    await seed(tmp_path)
    result = voiceline("--data-dir", str(tmp_path), "--since", "2024-02-20", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert sum(row["calls"] for row in stats["rows"] if row["line"] == "main") == 62
    table = voiceline("--data-dir", str(tmp_path), "--since", "2024-02-20", "--daily", "--line", "night")
    assert table.returncode == 0, table.stderr
    assert [line.split()[:3] for line in table.stdout.splitlines()[1:2]] == [["2024-02-29", "night", "1"]]


@pytest.mark.integration
def test_no_database_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = voiceline("--data-dir", str(tmp_path / "none"))
    assert result.returncode == 1
    assert result.stderr == f"voiceline stats: no database at {tmp_path / 'none' / DB_NAME}\n"
    assert not (tmp_path / "none").exists()  # reading creates nothing
