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
Recording one only adds it to an in-memory aggregate; `voiceline.statistics`
writes those in batches, holds them while the database refuses writes, and
retries (the registration status the server reports goes the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import json
import math
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from voiceline.keyfile import KEY_FILE_NAME, KeyFile, KeyFileError
from voiceline.routing import Trunk, TrunkError
from voiceline.statistics import (
    HISTORY_DAYS,
    HOURLY_COLUMNS,
    AnchoredClock,
    Batch,
    HourTotals,
    RegistrationStatus,
    StatisticsWriter,
    WriteFailed,
    busiest_hours,
    hour_of,
    journey_totals,
)

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
    """
    -- The caller's journey per hour and line: waits that ended in a pair or were abandoned
    -- (with the seconds waited), goodbyes at the maximum wait, skips, talk-time-limit endings and
    -- talker-listener matches. Hours are UTC; `calls` now counts a call when it is answered.
    ALTER TABLE hourly_stats ADD COLUMN wait_paired INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE hourly_stats ADD COLUMN wait_paired_seconds REAL NOT NULL DEFAULT 0;
    ALTER TABLE hourly_stats ADD COLUMN wait_abandoned INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE hourly_stats ADD COLUMN wait_abandoned_seconds REAL NOT NULL DEFAULT 0;
    ALTER TABLE hourly_stats ADD COLUMN max_wait_goodbye INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE hourly_stats ADD COLUMN skip INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE hourly_stats ADD COLUMN talk_limit_ending INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE hourly_stats ADD COLUMN preference_match INTEGER NOT NULL DEFAULT 0;
    """,
    """
    -- Safety per hour and line, counts only (nothing of who): the help key, help calls connected
    -- and failed, reports, cooldowns started, calls refused over the per-caller rate.
    ALTER TABLE hourly_stats ADD COLUMN help_request INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE hourly_stats ADD COLUMN help_connected INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE hourly_stats ADD COLUMN help_failed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE hourly_stats ADD COLUMN report INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE hourly_stats ADD COLUMN cooldown_started INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE hourly_stats ADD COLUMN rate_limited INTEGER NOT NULL DEFAULT 0;
    """,
)

# The two provisioning tables share their shape: name -> JSON settings.
PROVISIONING_TABLES = ("trunks", "lines")


def _upsert_hours(rows: int) -> str:
    """One statement adding `rows` hours of one line's totals (atomic on its own)."""
    columns = ("hour", "line", *HOURLY_COLUMNS)
    values = ", ".join([f"({', '.join('?' * len(columns))})"] * rows)
    updates = ", ".join(
        f"{c} = max({c}, excluded.{c})" if c == "jitter_ms_max" else f"{c} = {c} + excluded.{c}" for c in HOURLY_COLUMNS
    )
    return f"INSERT INTO hourly_stats ({', '.join(columns)}) VALUES {values} ON CONFLICT (hour, line) DO UPDATE SET {updates}"


def _upsert_refusals(rows: int) -> str:
    values = ", ".join(["(?, ?, ?)"] * rows)
    return (
        f"INSERT INTO hourly_refusals (hour, reason, count) VALUES {values} "
        "ON CONFLICT (hour, reason) DO UPDATE SET count = count + excluded.count"
    )


_SET_REGISTRATION_STATUS = (
    "INSERT INTO registration_status (trunk, state, detail, updated_at, expires_at, next_attempt) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (trunk) DO UPDATE SET state = excluded.state, "
    "detail = excluded.detail, updated_at = excluded.updated_at, expires_at = excluded.expires_at, "
    "next_attempt = excluded.next_attempt"
)

# How long a write waits for another process's lock before it fails (the service retries
# statistics; a command reports the lock). Short, so that closing keeps to its deadline.
BUSY_TIMEOUT_SECONDS = 1.0
FLUSH_INTERVAL_SECONDS = 5.0


class Fault(enum.Enum):
    """Why the database or its directory cannot be used: a word (`WriteFailed.reason`, logs) and a sentence.

    Every fault but CORRUPT is a refusal: it may pass, so writes are held and retried."""

    LOCKED = ("locked", "the database is locked by another process")
    FULL = ("full", "the disk is full")
    READ_ONLY = ("read_only", "the database or its directory is read-only")
    PERMISSION_DENIED = ("permission_denied", "permission denied")
    CANNOT_OPEN = ("io_error", "the database file cannot be opened")
    IO_ERROR = ("io_error", "a disk I/O error")
    CORRUPT = ("corrupt", "the database is damaged or not a database")

    def __init__(self, word: str, sentence: str) -> None:
        self.word = word
        self.sentence = sentence


# `sqlite3.Error.sqlite_errorname` prefixes, and OS error numbers, by fault.
_SQLITE_FAULTS = (
    (("SQLITE_BUSY", "SQLITE_LOCKED"), Fault.LOCKED),
    (("SQLITE_FULL",), Fault.FULL),
    (("SQLITE_READONLY",), Fault.READ_ONLY),
    (("SQLITE_CORRUPT", "SQLITE_NOTADB"), Fault.CORRUPT),
    (("SQLITE_PERM", "SQLITE_AUTH"), Fault.PERMISSION_DENIED),
    (("SQLITE_CANTOPEN",), Fault.CANNOT_OPEN),
    (("SQLITE_IOERR",), Fault.IO_ERROR),
)
_OS_FAULTS = {
    errno.EROFS: Fault.READ_ONLY,
    errno.ENOSPC: Fault.FULL,
    errno.EDQUOT: Fault.FULL,
    errno.EACCES: Fault.PERMISSION_DENIED,
    errno.EPERM: Fault.PERMISSION_DENIED,
}
# Less room than this beside an I/O error reads as a full disk (SQLite reports some writes to one so).
_NEARLY_FULL_BYTES = 1 << 20


def fault_of(exc: sqlite3.Error | OSError, database: Path) -> Fault | None:
    """Why `database` (or its directory) failed with `exc`; None for anything else (a bug, say).

    A file that cannot be opened in a directory we may not write is a permission problem; an I/O
    error, or a file that cannot be opened, on a nearly full file system is a full disk."""
    if isinstance(exc, OSError):
        return _OS_FAULTS.get(exc.errno or 0)
    name = getattr(exc, "sqlite_errorname", "") or ""
    fault = next((fault for prefixes, fault in _SQLITE_FAULTS if name.startswith(prefixes)), None)
    if fault is Fault.CANNOT_OPEN and not os.access(database.parent, os.W_OK):
        return Fault.PERMISSION_DENIED
    if fault in (Fault.CANNOT_OPEN, Fault.IO_ERROR) and _nearly_full(database.parent):
        return Fault.FULL
    return fault


def _nearly_full(directory: Path) -> bool:
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES


def _refusal(exc: sqlite3.Error, path: Path) -> Fault | None:
    """The fault when the database at `path` refuses writes for now; None for corruption or a bug."""
    fault = fault_of(exc, path)
    return None if fault is Fault.CORRUPT else fault


def _why(exc: sqlite3.Error, path: Path) -> str:
    fault = fault_of(exc, path)
    return fault.sentence if fault else f"SQLite error {getattr(exc, 'sqlite_errorname', None) or type(exc).__name__}"


@dataclass(frozen=True)
class CallAudio:
    """What a call's media leg received: RTP packets expected and lost, interarrival jitter."""

    packets_expected: int = 0
    packets_lost: int = 0
    jitter_ms: float = 0.0


class StorageError(Exception):
    """The data directory or database cannot be used; nothing was deleted."""


class StorageUnavailable(StorageError):
    """The database refuses writes now (locked by another process, disk full, read-only); try again later."""


class DuplicateName(StorageError):
    """A trunk or line of that name already exists."""


class UnknownName(StorageError):
    """No trunk or line of that name exists."""


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
        raise StorageError(f"cannot create or protect data directory {data_dir}: {exc.strerror}") from exc
    try:
        os.close(os.open(data_dir / DB_NAME, os.O_WRONLY | os.O_CREAT, 0o600))
        for name in DB_FILES:
            with contextlib.suppress(FileNotFoundError):
                (data_dir / name).chmod(0o600)
    except OSError as exc:
        raise StorageError(f"cannot make the database in {data_dir} private: {exc.strerror}") from exc


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


def _database_files(data_dir: Path) -> set[str]:
    return {name for name in DB_FILES if (data_dir / name).exists()}


def _remove_database_files(data_dir: Path, exclude: set[str]) -> None:
    """The database files not in `exclude`; of a database that was there before, only a new -shm
    and a new empty -wal (one with frames could hold another process's commits)."""
    for name in set(DB_FILES) - exclude:
        path = data_dir / name
        with contextlib.suppress(FileNotFoundError):
            if DB_NAME not in exclude or name.endswith("-shm") or (name.endswith("-wal") and not path.stat().st_size):
                path.unlink()


async def _connected(path: Path, keys: KeyFile, busy_timeout: float) -> aiosqlite.Connection:
    """The database at `path` open, in WAL mode and migrated; StorageError saying why not."""
    with _private_umask():
        try:
            # isolation_level=None: no implicit transactions; migrations BEGIN their own.
            db = await aiosqlite.connect(path, isolation_level=None, timeout=busy_timeout)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open database {path}: {_why(exc, path)}; it was left untouched") from exc
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA foreign_keys=ON")
            # Overwritten and deleted rows (a replaced password, say) are zeroed, not left in free space.
            await db.execute("PRAGMA secure_delete=ON")
            if await _migrate(db, keys):
                # Old page images (plain passwords before migration 4) leave the -wal file too.
                await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            await db.close()
            if _refusal(exc, path) is None:
                raise StorageError(f"{path} is not a usable voiceline database; it was left untouched") from exc
            raise StorageUnavailable(f"cannot open database {path}: {_why(exc, path)}; it was left untouched") from exc
        except KeyFileError as exc:
            await db.close()
            raise StorageError(f"cannot upgrade {path}: {exc}; it was left untouched") from None
        except BaseException:
            await db.close()
            raise
    return db


class Storage:
    """One aiosqlite connection; every write is a single autocommitted statement.

    Statistics and the reported registration status are held in memory and written by
    a `StatisticsWriter` every `flush_interval` seconds; reading them writes what is held first.
    """

    def __init__(self, db: aiosqlite.Connection, keys: KeyFile, path: Path, flush_interval: float) -> None:
        self._db = db
        self._keys = keys
        self._path = path
        self._writer = StatisticsWriter(self._write_batch, flush_interval)
        self._busiest: dict[tuple[str, str], tuple[int, int] | None] = {}  # (line, hour) -> the answer then
        self._closed = False
        # The clock statistics hours come from: pass its time as `at`, `ended_at` and `answered_at`.
        self.clock = AnchoredClock()

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        key_file: Path | None = None,
        *,
        busy_timeout: float = BUSY_TIMEOUT_SECONDS,
        flush_interval: float = FLUSH_INTERVAL_SECONDS,
    ) -> Storage:
        """`key_file`: where the key sealing registration passwords lives (default: secret.key in `data_dir`).

        `busy_timeout`: how long a statement waits for another process's lock before it fails.
        """
        keys = KeyFile(key_file or data_dir / KEY_FILE_NAME)
        present = await asyncio.to_thread(_database_files, data_dir)
        await asyncio.to_thread(_make_private, data_dir)
        path = data_dir / DB_NAME
        try:
            db = await _connected(path, keys, busy_timeout)
        except BaseException:
            # What this attempt created goes (an empty database, a -shm on a full disk); nothing else.
            await asyncio.to_thread(_remove_database_files, data_dir, exclude=present)
            raise
        return cls(db, keys, path, flush_interval)

    # -- statistics: held in memory, written in batches --------------------------

    async def record_answer(self, line: str, at: float) -> None:
        """Count a call on `line` when it is answered, in `at`'s hour (so a crash cannot lose it)."""
        self._writer.add_hour(line, hour_of(at), HourTotals(calls=1, records=1))

    async def record_call(
        self,
        line: str,
        ended_at: float,
        waited: float,
        talked: float,
        paired: bool,
        audio: CallAudio = CallAudio(),
        answered_at: float | None = None,
    ) -> None:
        """Add a finished call's figures to its hour's aggregate for `line`.

        A call counted by `record_answer` passes that `answered_at`: its figures join that
        hour and it is not counted again. Otherwise it is counted now, in `ended_at`'s hour.
        Times are unix times (from `clock`); only their UTC hour is kept.
        """
        if not all(math.isfinite(s) and s >= 0 for s in (waited, talked, audio.jitter_ms)):
            raise ValueError("waited, talked and jitter must be finite and non-negative")
        if not 0 <= audio.packets_lost <= audio.packets_expected:
            raise ValueError("packets lost must be between 0 and the packets expected")
        totals = HourTotals(
            calls=int(answered_at is None),
            paired=int(paired),
            wait_seconds=waited,
            talk_seconds=talked,
            packets_expected=audio.packets_expected,
            packets_lost=audio.packets_lost,
            jitter_ms_max=audio.jitter_ms,
            records=1,
        )
        self._writer.add_hour(line, hour_of(ended_at if answered_at is None else answered_at), totals)

    async def record_journey(self, line: str, at: float, counts: Mapping[str, int], seconds: Mapping[str, float]) -> None:
        """Add the caller's journey counts to `at`'s hour for `line`.

        `counts` by name: wait_paired, wait_abandoned, max_wait_goodbye, skip, talk_limit_ending,
        preference_match, help_request, help_connected, help_failed, report, cooldown_started,
        rate_limited; `seconds` (waited) by wait_paired and wait_abandoned.
        """
        self._writer.add_hour(line, hour_of(at), journey_totals(counts, seconds))

    async def record_refusal(self, reason: str, at: float, count: int = 1) -> None:
        """Count `count` requests refused for `reason` (a fixed word, never request content) in `at`'s hour."""
        if count < 0:
            raise ValueError("a refusal count cannot be negative")
        self._writer.add_refusals(reason, hour_of(at), count)

    async def flush(self) -> bool:
        """Write what is held now; False when the database refused (it stays held and is retried)."""
        return await self._writer.flush()

    @property
    def degraded(self) -> bool:
        """The last write of statistics failed: they are held in memory until the database takes them."""
        return self._writer.degraded

    @property
    def held_records(self) -> int:
        """Statistics records not yet written (what stopping now would abandon)."""
        return self._writer.held

    async def _write_batch(self, batch: Batch) -> None:
        """Write `batch`, removing from it what was written; WriteFailed for the rest."""
        try:
            for line, hours in list(batch.hourly.items()):
                params: list[Any] = []
                for hour, totals in hours.items():
                    params += [hour, line, *(getattr(totals, column) for column in HOURLY_COLUMNS)]
                await self._db.execute(_upsert_hours(len(hours)), params)
                del batch.hourly[line]
            for reason, counts in list(batch.refusals.items()):
                params = [value for hour, count in counts.items() for value in (hour, reason, count)]
                await self._db.execute(_upsert_refusals(len(counts)), params)
                del batch.refusals[reason]
            for trunk, status in list(batch.registrations.items()):
                await self._db.execute(
                    _SET_REGISTRATION_STATUS,
                    (trunk, status.state, status.detail, status.at, status.expires_at, status.next_attempt),
                )
                del batch.registrations[trunk]
        except sqlite3.Error as exc:
            refusal = _refusal(exc, self._path)
            raise WriteFailed(refusal.word if refusal else "error") from None

    async def hourly(self, line: str | None = None) -> list[dict[str, Any]]:
        """Every hour's aggregate (written first), by hour and line."""
        await self.flush()
        query = f"SELECT hour, line, {', '.join(HOURLY_COLUMNS)} FROM hourly_stats"
        params: tuple[str, ...] = ()
        if line is not None:
            query += " WHERE line = ?"
            params = (line,)
        return await self._rows(query + " ORDER BY hour, line", params)

    async def refusals(self) -> list[dict[str, Any]]:
        await self.flush()
        return await self._rows("SELECT hour, reason, count FROM hourly_refusals ORDER BY hour, reason")

    async def busiest_hours(self, line: str, now: float) -> tuple[int, int] | None:
        """(from, to): the hours of the day, local time, when `line` usually has most calls.

        `to` is exclusive and may be past midnight ((22, 1)); None while there is too little
        history (the rule: `voiceline.statistics.busiest_hours`). Worked out once per hour.
        """
        key = (line, hour_of(now))
        if key not in self._busiest:
            try:
                rows = await self._rows(
                    "SELECT hour, calls FROM hourly_stats WHERE line = ? AND hour >= ? AND hour < ?",
                    (line, hour_of(now - HISTORY_DAYS * 86400), key[1]),
                )
            except sqlite3.Error:
                return None  # not known now; asked again next time
            self._busiest = {k: v for k, v in self._busiest.items() if k[1] == key[1]}
            self._busiest[key] = busiest_hours(((row["hour"], row["calls"]) for row in rows), now)
        return self._busiest[key]

    # -- provisioning ----------------------------------------------------------

    async def add(self, table: str, name: str, settings: dict[str, Any], enabled: bool = True) -> None:
        """Trunk settings may carry a registration password: it is stored sealed."""
        self._check_table(table)
        settings = await self._stored(table, name, settings)
        columns = "name, enabled, settings" if table == "trunks" else "name, settings"
        values: tuple[Any, ...] = (name, int(enabled), json.dumps(settings)) if table == "trunks" else (name, json.dumps(settings))
        try:
            await self._change(f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(values))})", values)
        except sqlite3.IntegrityError:
            raise DuplicateName(f"{table[:-1]} {name!r} already exists") from None

    async def update(self, table: str, name: str, settings: dict[str, Any]) -> None:
        self._check_table(table)
        settings = await self._stored(table, name, settings)
        cursor = await self._change(f"UPDATE {table} SET settings = ? WHERE name = ?", (json.dumps(settings), name))
        if cursor.rowcount == 0:
            raise UnknownName(f"no {table[:-1]} named {name!r}")

    async def set_enabled(self, name: str, enabled: bool) -> None:
        cursor = await self._change("UPDATE trunks SET enabled = ? WHERE name = ?", (int(enabled), name))
        if cursor.rowcount == 0:
            raise UnknownName(f"no trunk named {name!r}")

    async def remove(self, table: str, name: str) -> None:
        self._check_table(table)
        cursor = await self._change(f"DELETE FROM {table} WHERE name = ?", (name,))
        if cursor.rowcount == 0:
            raise UnknownName(f"no {table[:-1]} named {name!r}")
        if table == "trunks":
            await self._change("DELETE FROM registration_status WHERE trunk = ?", (name,))

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
        """Written at once; while the database refuses, held (the latest per trunk) and retried."""
        self._writer.set_registration(trunk, RegistrationStatus(state, detail, at, expires_at, next_attempt))
        await self.flush()

    async def clear_registration_status(self) -> None:
        """Forget every reported status (at server start: the drivers report afresh)."""
        await self._change("DELETE FROM registration_status", ())

    async def registration_status(self) -> list[dict[str, Any]]:
        await self.flush()
        return await self._rows(
            "SELECT trunk, state, detail, updated_at, expires_at, next_attempt FROM registration_status ORDER BY trunk"
        )

    async def data_version(self) -> int:
        """Changes when another connection (e.g. `voiceline trunk add`) commits; our own writes leave it."""
        async with self._db.execute("PRAGMA data_version") as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def _change(self, sql: str, params: tuple[Any, ...]) -> aiosqlite.Cursor:
        """A provisioning write: StorageError saying why when the database refuses it."""
        try:
            return await self._db.execute(sql, params)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            error = StorageUnavailable if _refusal(exc, self._path) else StorageError
            raise error(f"cannot write to {self._path}: {_why(exc, self._path)}; nothing was changed") from exc

    async def _rows(self, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        async with self._db.execute(query, params) as cursor:
            columns = [c[0] for c in cursor.description]
            return [dict(zip(columns, row)) for row in await cursor.fetchall()]

    @staticmethod
    def _check_table(table: str) -> None:
        if table not in PROVISIONING_TABLES:
            raise ValueError(f"not a provisioning table: {table}")

    async def close(self, deadline: float | None = None) -> int:
        """Write what is held, retrying until `deadline` (the event loop's time; None: one attempt), and close.

        Returns how many records (counts, reported statuses) were abandoned. A write under
        way when the deadline passes may overrun it by up to the busy timeout.
        """
        if self._closed:
            return 0
        self._closed = True
        try:
            return await self._writer.close(deadline)
        finally:
            await self._db.close()
