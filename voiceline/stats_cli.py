"""`voiceline stats`: the anonymous statistics per line and hour (or day), read straight from the database.

It opens the database read-only, so it works whether or not the service runs;
what a running service still holds in memory (at most `storage.flush_interval`
seconds of counts) shows at its next write.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sqlite3
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from voiceline import config as config_module
from voiceline.config import ConfigError
from voiceline.statistics import HISTORY_DAYS, busiest_hours, hour_of
from voiceline.storage import DB_NAME, MIGRATIONS

_SPAN = re.compile(r"^(\d+)([hdw])$")
_SPAN_SECONDS = {"h": 3600, "d": 86400, "w": 7 * 86400}
_READ_TIMEOUT = 5.0  # seconds to wait for a writer's lock (reads rarely wait in WAL mode)

# (heading, key): the table's columns, in order.
_COLUMNS = (
    ("CALLS", "calls"),
    ("PAIRED", "paired"),
    ("WAITS-PAIRED", "wait_paired"),
    ("AVG-WAIT-S", "wait_paired_avg_seconds"),
    ("ABANDONED", "wait_abandoned"),
    ("AVG-ABANDON-S", "wait_abandoned_avg_seconds"),
    ("MAX-WAIT-BYES", "max_wait_goodbye"),
    ("SKIPS", "skip"),
    ("TALK-LIMIT", "talk_limit_ending"),
    ("PREF-MATCH", "preference_match"),
    ("HELP", "help_request"),
    ("HELP-CONN", "help_connected"),
    ("HELP-FAIL", "help_failed"),
    ("REPORTS", "report"),
    ("COOLDOWNS", "cooldown_started"),
    ("RATE-LIMITED", "rate_limited"),
    ("LOSS-%", "audio_loss_percent"),
)


def since_hour(text: str, now: float | None = None) -> str:
    """`--since`: a UTC date (YYYY-MM-DD) or a span back from now (12h, 7d, 4w), as the first stored hour."""
    now = time.time() if now is None else now
    span = _SPAN.match(text)
    if span:
        return hour_of(now - int(span.group(1)) * _SPAN_SECONDS[span.group(2)])
    try:
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither YYYY-MM-DD nor a span such as 24h, 7d or 4w") from None
    return hour_of(day.timestamp())


def add_stats_parser(commands: Any) -> None:
    stats = commands.add_parser("stats", help="anonymous statistics per line and hour, and the busiest hours")
    stats.add_argument("--line", metavar="NAME", help="only this line")
    stats.add_argument(
        "--since", metavar="WHEN", type=since_hour, default="7d", help="YYYY-MM-DD (UTC) or 24h, 7d, 4w back (default 7d)"
    )
    stats.add_argument("--daily", action="store_true", help="per day instead of per hour")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.add_argument("--config", metavar="FILE", help="the service's TOML configuration file")
    stats.add_argument("--data-dir", metavar="DIR", help="the service's data directory (storage.data_dir)")


class StatsError(Exception):
    pass


def _connect(db_path: Path) -> sqlite3.Connection:
    if not db_path.is_file():
        raise StatsError(f"no database at {db_path}")
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=_READ_TIMEOUT)
        (version,) = db.execute("SELECT version FROM schema_version").fetchone()
    except sqlite3.Error as exc:
        raise StatsError(f"cannot read {db_path}: {exc}") from None
    if version != len(MIGRATIONS):
        db.close()
        newer = "newer than this voiceline" if version > len(MIGRATIONS) else "older: start the service once to upgrade it"
        raise StatsError(f"{db_path} has schema version {version}, {newer}")
    return db


def _rows(db: sqlite3.Connection, since: str, line: str | None, daily: bool) -> list[dict[str, Any]]:
    period = "substr(hour, 1, 10)" if daily else "hour"
    where, params = "hour >= ?", [since]
    if line is not None:
        where, params = where + " AND line = ?", [*params, line]
    query = f"""
        SELECT {period} AS period, line, sum(calls), sum(paired), sum(wait_paired), sum(wait_paired_seconds),
               sum(wait_abandoned), sum(wait_abandoned_seconds), sum(max_wait_goodbye), sum(skip),
               sum(talk_limit_ending), sum(preference_match), sum(talk_seconds), sum(packets_expected),
               sum(packets_lost), max(jitter_ms_max), sum(help_request), sum(help_connected), sum(help_failed),
               sum(report), sum(cooldown_started), sum(rate_limited)
        FROM hourly_stats WHERE {where} GROUP BY period, line ORDER BY period, line
    """
    rows = []
    for (
        when, name, calls, paired, wait_paired, wait_paired_seconds, wait_abandoned, wait_abandoned_seconds,
        goodbyes, skips, talk_limit, preference, talk_seconds, expected, lost, jitter,
        help_request, help_connected, help_failed, report, cooldown_started, rate_limited,
    ) in db.execute(query, params):  # fmt: skip
        rows.append(
            {
                "day" if daily else "hour": when,
                "line": name,
                "calls": calls,
                "paired": paired,
                "wait_paired": wait_paired,
                "wait_paired_avg_seconds": _average(wait_paired_seconds, wait_paired),
                "wait_abandoned": wait_abandoned,
                "wait_abandoned_avg_seconds": _average(wait_abandoned_seconds, wait_abandoned),
                "max_wait_goodbye": goodbyes,
                "skip": skips,
                "talk_limit_ending": talk_limit,
                "preference_match": preference,
                "help_request": help_request,
                "help_connected": help_connected,
                "help_failed": help_failed,
                "report": report,
                "cooldown_started": cooldown_started,
                "rate_limited": rate_limited,
                "talk_seconds": round(talk_seconds, 1),
                "audio_loss_percent": round(100 * lost / expected, 2) if expected else None,
                "jitter_ms_max": round(jitter, 1),
            }
        )
    return rows


def _average(seconds: float, count: int) -> float | None:
    return round(seconds / count, 1) if count else None


def _busiest(db: sqlite3.Connection, lines: list[str], now: float) -> dict[str, list[int] | None]:
    history = hour_of(now - HISTORY_DAYS * 86400)
    busiest: dict[str, list[int] | None] = {}
    for line in lines:
        rows = db.execute("SELECT hour, calls FROM hourly_stats WHERE line = ? AND hour >= ?", (line, history))
        hours = busiest_hours(rows, now)
        busiest[line] = list(hours) if hours is not None else None
    return busiest


def _refusals(db: sqlite3.Connection, since: str) -> dict[str, int]:
    rows = db.execute(
        "SELECT reason, sum(count) FROM hourly_refusals WHERE hour >= ? GROUP BY reason ORDER BY reason", (since,)
    )
    return dict(rows)


def report(db_path: Path, since: str, line: str | None, daily: bool, now: float) -> dict[str, Any]:
    with contextlib.closing(_connect(db_path)) as db:
        try:
            rows = _rows(db, since, line, daily)
            lines = [line] if line is not None else [name for (name,) in db.execute("SELECT DISTINCT line FROM hourly_stats")]
            return {
                "since": since,
                "per": "day" if daily else "hour",
                "rows": rows,
                "busiest_hours": _busiest(db, sorted(lines), now),
                "refusals": _refusals(db, since),
            }
        except sqlite3.Error as exc:
            raise StatsError(f"cannot read {db_path}: {exc}") from None


def format_report(stats: dict[str, Any]) -> str:
    """A table per line and period for people; hours and days are UTC, busiest hours local time."""
    when = "DAY (UTC)" if stats["per"] == "day" else "HOUR (UTC)"
    header = [when, "LINE", *(heading for heading, _ in _COLUMNS)]
    table = [header]
    for row in stats["rows"]:
        period = row["day"] if stats["per"] == "day" else row["hour"] + ":00"
        table.append([period, row["line"], *("-" if row[key] is None else str(row[key]) for _, key in _COLUMNS)])
    widths = [max(len(cells[i]) for cells in table) for i in range(len(header))]
    out = [
        "  ".join(cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width) in enumerate(zip(cells, widths)))
        for cells in table
    ]
    if not stats["rows"]:
        out.append(f"(no calls since {stats['since']}:00 UTC)")
    out.append("")
    for line, hours in stats["busiest_hours"].items():
        said = f"{hours[0]:02d}:00-{hours[1]:02d}:00 local time" if hours else "not enough history yet"
        out.append(f"busiest hours, line {line}: {said}")
    refused = ", ".join(f"{reason} {count}" for reason, count in stats["refusals"].items())
    out.append(f"refused before a call existed: {refused or 'none'}")
    return "\n".join(out) + "\n"


def run_stats(args: argparse.Namespace) -> int:
    try:
        cfg = config_module.load(args.config)
    except ConfigError as exc:
        print(f"voiceline stats: config error: {exc}", file=sys.stderr)
        return 2
    if args.data_dir:
        cfg = replace(cfg, storage=replace(cfg.storage, data_dir=args.data_dir))
    try:
        stats = report(Path(cfg.storage.data_dir) / DB_NAME, args.since, args.line, args.daily, time.time())
    except StatsError as exc:
        print(f"voiceline stats: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(stats, indent=2) + "\n" if args.json else format_report(stats))
    return 0
