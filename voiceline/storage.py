"""Storage in SQLite (aiosqlite, WAL, migrations): provisioning and anonymous aggregates.

Provisioning: trunks and lines (as validated JSON settings, written by the
`voiceline trunk|line` commands and read by the running server) and the
registration status the server reports for each trunk. No password is stored:
inbound credentials are digest HA1 values, and registration passwords are
sealed with the key file (voiceline.keyfile), which is not in the database.

The data directory is made 0700 and every database file 0600 at each open,
also when they already exist.

Statistics: hourly aggregates only, never a per-caller row, number, URI, caller
IP address or exact call time. The API takes none of these, so it cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from voiceline.keyfile import KEY_FILE_NAME, KeyFile, KeyFileError
from voiceline.routing import Trunk, TrunkError

DB_NAME = "voiceline.db"
# The database and the files SQLite keeps beside it.
DB_FILES = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal")

# A migration SQL cannot express: run inside the migration's transaction.
PythonMigration = Callable[[aiosqlite.Connection, KeyFile], Awaitable[None]]


async def _keep_no_trunk_passwords(db: aiosqlite.Connection, keys: KeyFile) -> None:
    """Stored inbound passwords become HA1 values, registration passwords ciphertext (schema 4)."""
    async with db.execute("SELECT name, enabled, settings FROM trunks") as cursor:
        rows = await cursor.fetchall()
    for name, enabled, text in rows:
        try:
            settings = json.loads(text)
        except ValueError:
            continue
        if not isinstance(settings, dict):
            continue
        try:
            settings = Trunk.from_settings(name, settings, bool(enabled)).settings()
        except TrunkError:
            settings.pop("password", None)  # never loaded as it is; keeps no password either way
        if isinstance(settings.get("registration"), dict) and settings["registration"].get("password"):
            await asyncio.to_thread(keys.load, True)
        stored = json.dumps(_sealed(keys, name, settings))
        await db.execute("UPDATE trunks SET settings = ? WHERE name = ?", (stored, name))


# Applied in order, each in its own transaction; entry N brings the schema to
# version N + 1. Add a migration by appending one; never edit an old one.
MIGRATIONS: tuple[str | PythonMigration, ...] = (
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
    """
    -- `settings` is a JSON object validated by voiceline.provisioning; it held trunk
    -- passwords in the clear until migration 4.
    CREATE TABLE trunks (
        name TEXT PRIMARY KEY,
        enabled INTEGER NOT NULL DEFAULT 1,
        settings TEXT NOT NULL
    );
    CREATE TABLE lines (
        name TEXT PRIMARY KEY,
        settings TEXT NOT NULL
    );
    -- Written by the running server, read by `voiceline trunk show|list`.
    CREATE TABLE registration_status (
        trunk TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        updated_at REAL NOT NULL,
        expires_at REAL,
        next_attempt REAL
    );
    -- Requests refused before a call existed, by reason (unknown_source, unknown_number, ...).
    CREATE TABLE hourly_refusals (
        hour TEXT NOT NULL,
        reason TEXT NOT NULL,
        count INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (hour, reason)
    );
    """,
    """
    -- Audio quality per hour and line, from each call's RTP reception statistics (RFC 3550):
    -- loss is packets_lost / packets_expected; jitter_ms_max is the worst call's jitter.
    ALTER TABLE hourly_stats ADD COLUMN packets_expected INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE hourly_stats ADD COLUMN packets_lost INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE hourly_stats ADD COLUMN jitter_ms_max REAL NOT NULL DEFAULT 0;
    """,
    _keep_no_trunk_passwords,
)

# The two provisioning tables share their shape: name -> JSON settings.
PROVISIONING_TABLES = ("trunks", "lines")

# One statement, so concurrent callers need no lock and no read-modify-write.
_RECORD_CALL = """
INSERT INTO hourly_stats
    (hour, line, calls, paired, wait_seconds, talk_seconds, packets_expected, packets_lost, jitter_ms_max)
VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?)
ON CONFLICT (hour, line) DO UPDATE SET
    calls = calls + 1,
    paired = paired + excluded.paired,
    wait_seconds = wait_seconds + excluded.wait_seconds,
    talk_seconds = talk_seconds + excluded.talk_seconds,
    packets_expected = packets_expected + excluded.packets_expected,
    packets_lost = packets_lost + excluded.packets_lost,
    jitter_ms_max = max(jitter_ms_max, excluded.jitter_ms_max)
"""
_HOURLY_COLUMNS = (
    "hour, line, calls, paired, wait_seconds, talk_seconds, packets_expected, packets_lost, jitter_ms_max"
)


@dataclass(frozen=True)
class CallAudio:
    """What a call's media leg received: RTP packets expected and lost, interarrival jitter."""

    packets_expected: int = 0
    packets_lost: int = 0
    jitter_ms: float = 0.0


class StorageError(Exception):
    """The data directory or database cannot be used; nothing was deleted."""


class DuplicateName(StorageError):
    """A trunk or line of that name already exists."""


class UnknownName(StorageError):
    """No trunk or line of that name exists."""


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


async def _migrate(db: aiosqlite.Connection, keys: KeyFile) -> int:
    """Apply the migrations this database lacks; how many."""
    current = await _schema_version(db)
    if current > len(MIGRATIONS):
        raise StorageError(f"database schema version {current} is newer than this voiceline ({len(MIGRATIONS)})")
    for version, step in enumerate(MIGRATIONS[current:], start=current + 1):
        try:
            if isinstance(step, str):
                await db.executescript(f"BEGIN;\n{step}\nUPDATE schema_version SET version = {version};\nCOMMIT;")
                continue
            await db.execute("BEGIN")
            await step(db, keys)
            await db.execute(f"UPDATE schema_version SET version = {version}")
            await db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                await db.rollback()
            raise
    return len(MIGRATIONS) - current


def _registration_context(trunk: str) -> str:
    return f"trunk {trunk} registration password"


def _sealed(keys: KeyFile, trunk: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Trunk settings as stored: the registration password replaced by its ciphertext."""
    registration = settings.get("registration")
    if not isinstance(registration, dict) or not registration.get("password"):
        return settings
    registration = dict(registration)
    registration["password_sealed"] = keys.seal(str(registration.pop("password")), _registration_context(trunk))
    return {**settings, "registration": registration}


def _make_private(data_dir: Path) -> None:
    """The data directory 0700 and the database files 0600, whether new or left by an older version."""
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data_dir.chmod(0o700)
    except OSError as exc:
        raise StorageError(f"cannot create data directory {data_dir}: {exc.strerror}") from None
    try:
        os.close(os.open(data_dir / DB_NAME, os.O_WRONLY | os.O_CREAT, 0o600))
        for name in DB_FILES:
            with contextlib.suppress(FileNotFoundError):
                (data_dir / name).chmod(0o600)
    except OSError as exc:
        raise StorageError(f"cannot make the database in {data_dir} private: {exc.strerror}") from None


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    """Files created meanwhile (SQLite's -wal and -shm) get no group or other permissions."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def write_private(path: Path, text: str) -> None:
    """Write a small file in the data directory, 0600 like the database."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


class Storage:
    """One aiosqlite connection; every write is a single autocommitted statement."""

    def __init__(self, db: aiosqlite.Connection, keys: KeyFile) -> None:
        self._db = db
        self._keys = keys

    @classmethod
    async def open(cls, data_dir: Path, key_file: Path | None = None) -> Storage:
        """`key_file`: where the key sealing registration passwords lives (default: secret.key in `data_dir`)."""
        keys = KeyFile(key_file or data_dir / KEY_FILE_NAME)
        await asyncio.to_thread(_make_private, data_dir)
        path = data_dir / DB_NAME
        with _private_umask():
            try:
                # isolation_level=None: no implicit transactions; migrations BEGIN their own.
                db = await aiosqlite.connect(path, isolation_level=None)
            except sqlite3.Error:
                raise StorageError(f"cannot open database {path}; it was left untouched") from None
            try:
                await db.execute("PRAGMA journal_mode=WAL")
                await db.execute("PRAGMA synchronous=NORMAL")
                await db.execute("PRAGMA foreign_keys=ON")
                # Overwritten and deleted rows (a replaced password, say) are zeroed, not left in free space.
                await db.execute("PRAGMA secure_delete=ON")
                if await _migrate(db, keys):
                    # Old page images (plain passwords before migration 4) leave the -wal file too.
                    await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                await db.close()
                raise StorageError(f"{path} is not a usable voiceline database; it was left untouched") from None
            except KeyFileError as exc:
                await db.close()
                raise StorageError(f"cannot upgrade {path}: {exc}; it was left untouched") from None
            except BaseException:
                await db.close()
                raise
        return cls(db, keys)

    async def record_call(
        self, line: str, ended_at: float, waited: float, talked: float, paired: bool, audio: CallAudio = CallAudio()
    ) -> None:
        """Add one finished call to its hour's aggregate for `line`.

        `ended_at` is unix time; only its UTC hour is kept.
        """
        if not all(math.isfinite(s) and s >= 0 for s in (waited, talked, audio.jitter_ms)):
            raise ValueError("waited, talked and jitter must be finite and non-negative")
        if not 0 <= audio.packets_lost <= audio.packets_expected:
            raise ValueError("packets lost must be between 0 and the packets expected")
        await self._db.execute(
            _RECORD_CALL,
            (
                hour_of(ended_at), line, int(paired), waited, talked,
                audio.packets_expected, audio.packets_lost, audio.jitter_ms,
            ),  # fmt: skip
        )

    async def hourly(self, line: str | None = None) -> list[dict[str, Any]]:
        query = f"SELECT {_HOURLY_COLUMNS} FROM hourly_stats"
        params: tuple[str, ...] = ()
        if line is not None:
            query += " WHERE line = ?"
            params = (line,)
        return await self._rows(query + " ORDER BY hour, line", params)

    async def record_refusal(self, reason: str, at: float, count: int = 1) -> None:
        """Count `count` requests refused for `reason` (a fixed word, never request content) in `at`'s hour."""
        await self._db.execute(
            "INSERT INTO hourly_refusals (hour, reason, count) VALUES (?, ?, ?) "
            "ON CONFLICT (hour, reason) DO UPDATE SET count = count + excluded.count",
            (hour_of(at), reason, count),
        )

    async def record_journey(self, line: str, at: float, counts: Mapping[str, int], seconds: Mapping[str, float]) -> None:
        """Placeholder for the journey statistics (counts and seconds by statistic, in `at`'s hour)."""

    async def busiest_hours(self, line: str, now: float) -> tuple[int, int] | None:
        """Placeholder: the hours of the day when `line` is usually busiest; None while unknown."""
        return None

    async def refusals(self) -> list[dict[str, Any]]:
        return await self._rows("SELECT hour, reason, count FROM hourly_refusals ORDER BY hour, reason")

    # -- provisioning ----------------------------------------------------------

    async def add(self, table: str, name: str, settings: dict[str, Any], enabled: bool = True) -> None:
        """Trunk settings may carry a registration password: it is stored sealed."""
        self._check_table(table)
        settings = await self._stored(table, name, settings)
        columns = "name, enabled, settings" if table == "trunks" else "name, settings"
        values: tuple[Any, ...] = (name, int(enabled), json.dumps(settings)) if table == "trunks" else (name, json.dumps(settings))
        try:
            await self._db.execute(f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(values))})", values)
        except sqlite3.IntegrityError:
            raise DuplicateName(f"{table[:-1]} {name!r} already exists") from None

    async def update(self, table: str, name: str, settings: dict[str, Any]) -> None:
        self._check_table(table)
        settings = await self._stored(table, name, settings)
        cursor = await self._db.execute(f"UPDATE {table} SET settings = ? WHERE name = ?", (json.dumps(settings), name))
        if cursor.rowcount == 0:
            raise UnknownName(f"no {table[:-1]} named {name!r}")

    async def set_enabled(self, name: str, enabled: bool) -> None:
        cursor = await self._db.execute("UPDATE trunks SET enabled = ? WHERE name = ?", (int(enabled), name))
        if cursor.rowcount == 0:
            raise UnknownName(f"no trunk named {name!r}")

    async def remove(self, table: str, name: str) -> None:
        self._check_table(table)
        cursor = await self._db.execute(f"DELETE FROM {table} WHERE name = ?", (name,))
        if cursor.rowcount == 0:
            raise UnknownName(f"no {table[:-1]} named {name!r}")
        if table == "trunks":
            await self._db.execute("DELETE FROM registration_status WHERE trunk = ?", (name,))

    async def records(self, table: str) -> list[dict[str, Any]]:
        """Every row as {name, settings (decoded, registration password opened), and for trunks enabled}.

        StorageError when a sealed password cannot be opened (key file missing or another key).
        """
        self._check_table(table)
        extra = ", enabled" if table == "trunks" else ""
        rows = await self._rows(f"SELECT name, settings{extra} FROM {table} ORDER BY name")
        for row in rows:
            row["settings"] = json.loads(row["settings"])
            if "enabled" in row:
                row["enabled"] = bool(row["enabled"])
                row["settings"] = await self._opened(row["name"], row["settings"])
        return rows

    async def _opened(self, trunk: str, settings: Any) -> Any:
        """Trunk settings with the registration password decrypted."""
        registration = settings.get("registration") if isinstance(settings, dict) else None
        if not isinstance(registration, dict) or "password_sealed" not in registration:
            return settings
        registration = dict(registration)
        try:
            await asyncio.to_thread(self._keys.load, False)
            registration["password"] = self._keys.unseal(
                str(registration.pop("password_sealed")), _registration_context(trunk)
            )
        except KeyFileError as exc:
            raise StorageError(f"cannot decrypt the registration password of trunk {trunk!r}: {exc}") from None
        return {**settings, "registration": registration}

    async def _stored(self, table: str, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        if table != "trunks" or not (settings.get("registration") or {}).get("password"):
            return settings
        try:
            await asyncio.to_thread(self._keys.load, True)
        except KeyFileError as exc:
            raise StorageError(str(exc)) from None
        return _sealed(self._keys, name, settings)

    async def set_registration_status(
        self, trunk: str, state: str, detail: str, at: float, expires_at: float | None, next_attempt: float | None
    ) -> None:
        await self._db.execute(
            "INSERT INTO registration_status (trunk, state, detail, updated_at, expires_at, next_attempt) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (trunk) DO UPDATE SET state = excluded.state, "
            "detail = excluded.detail, updated_at = excluded.updated_at, expires_at = excluded.expires_at, "
            "next_attempt = excluded.next_attempt",
            (trunk, state, detail, at, expires_at, next_attempt),
        )

    async def clear_registration_status(self) -> None:
        """Forget every reported status (at server start: the drivers report afresh)."""
        await self._db.execute("DELETE FROM registration_status")

    async def registration_status(self) -> list[dict[str, Any]]:
        return await self._rows(
            "SELECT trunk, state, detail, updated_at, expires_at, next_attempt FROM registration_status ORDER BY trunk"
        )

    async def data_version(self) -> int:
        """Changes when another connection (e.g. `voiceline trunk add`) commits; our own writes leave it."""
        async with self._db.execute("PRAGMA data_version") as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def _rows(self, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        async with self._db.execute(query, params) as cursor:
            columns = [c[0] for c in cursor.description]
            return [dict(zip(columns, row)) for row in await cursor.fetchall()]

    @staticmethod
    def _check_table(table: str) -> None:
        if table not in PROVISIONING_TABLES:
            raise ValueError(f"not a provisioning table: {table}")

    async def close(self) -> None:
        await self._db.close()
