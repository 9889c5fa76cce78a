"""Storage: anonymous hourly aggregates in SQLite (aiosqlite, WAL, migrations).

The data directory holds aggregates only: never a per-caller row, number, URI,
IP address or exact call time. The API takes none of these, so it cannot.
"""

from __future__ import annotations

import math
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

DB_NAME = "voiceline.db"

# Applied in order, each in its own transaction; entry N brings the schema to
# version N + 1. Add a migration by appending a script; never edit an old one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE hourly_stats (
        hour TEXT NOT NULL,  -- 'YYYY-MM-DDTHH', UTC
        line TEXT NOT NULL,
        calls INTEGER NOT NULL DEFAULT 0,
        paired INTEGER NOT NULL DEFAULT 0,
        wait_seconds REAL NOT NULL DEFAULT 0,
        talk_seconds REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (hour, line)
    );
    """,
)

# One statement, so concurrent callers need no lock and no read-modify-write.
_RECORD_CALL = """
INSERT INTO hourly_stats (hour, line, calls, paired, wait_seconds, talk_seconds)
VALUES (?, ?, 1, ?, ?, ?)
ON CONFLICT (hour, line) DO UPDATE SET
    calls = calls + 1,
    paired = paired + excluded.paired,
    wait_seconds = wait_seconds + excluded.wait_seconds,
    talk_seconds = talk_seconds + excluded.talk_seconds
"""


class StorageError(Exception):
    """The data directory or database cannot be used; nothing was deleted."""


def hour_of(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, UTC).strftime("%Y-%m-%dT%H")


async def _schema_version(db: aiosqlite.Connection) -> int:
    await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    async with db.execute("SELECT version FROM schema_version") as cursor:
        row = await cursor.fetchone()
    if row is None:
        await db.execute("INSERT INTO schema_version (version) VALUES (0)")
        return 0
    return int(row[0])


async def _migrate(db: aiosqlite.Connection) -> None:
    current = await _schema_version(db)
    if current > len(MIGRATIONS):
        raise StorageError(f"database schema version {current} is newer than this voiceline ({len(MIGRATIONS)})")
    for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
        try:
            await db.executescript(f"BEGIN;\n{script}\nUPDATE schema_version SET version = {version};\nCOMMIT;")
        except sqlite3.Error:
            if db.in_transaction:
                await db.rollback()
            raise


class Storage:
    """One aiosqlite connection; every write is a single autocommitted statement."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, data_dir: Path) -> Storage:
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create data directory {data_dir}: {exc.strerror}") from None
        path = data_dir / DB_NAME
        try:
            # isolation_level=None: no implicit transactions; migrations BEGIN their own.
            db = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error:
            raise StorageError(f"cannot open database {path}; it was left untouched") from None
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA foreign_keys=ON")
            await _migrate(db)
        except sqlite3.Error:
            await db.close()
            raise StorageError(f"{path} is not a usable voiceline database; it was left untouched") from None
        except BaseException:
            await db.close()
            raise
        return cls(db)

    async def record_call(self, line: str, ended_at: float, waited: float, talked: float, paired: bool) -> None:
        """Add one finished call to its hour's aggregate for `line`.

        `ended_at` is unix time; only its UTC hour is kept.
        """
        if not all(math.isfinite(s) and s >= 0 for s in (waited, talked)):
            raise ValueError("waited and talked must be finite and non-negative")
        await self._db.execute(_RECORD_CALL, (hour_of(ended_at), line, int(paired), waited, talked))

    async def hourly(self, line: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT hour, line, calls, paired, wait_seconds, talk_seconds FROM hourly_stats"
        params: tuple[str, ...] = ()
        if line is not None:
            query += " WHERE line = ?"
            params = (line,)
        async with self._db.execute(query + " ORDER BY hour, line", params) as cursor:
            columns = [c[0] for c in cursor.description]
            return [dict(zip(columns, row)) for row in await cursor.fetchall()]

    async def close(self) -> None:
        await self._db.close()
