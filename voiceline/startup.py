"""Why `voiceline serve` could not start: one line for the admin and one exit code per cause.

The codes are part of the interface (README, Operations; the systemd unit does not restart
on the ones a restart cannot cure).
"""

from __future__ import annotations

import errno
import os
import sqlite3
from enum import IntEnum
from pathlib import Path

from voiceline.audio.media import MediaError
from voiceline.config import Config
from voiceline.datadir_lock import DataDirBusy
from voiceline.storage import DB_NAME, StorageError

# Less room than this beside an I/O error reads as a full disk.
_NEARLY_FULL_BYTES = 1 << 20


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # a start-up failure with no code of its own (its line says what)
    USAGE = 2  # bad flags or configuration
    ALREADY_RUNNING = 3  # another voiceline holds the data dir
    DATABASE_LOCKED = 4  # another process kept the database locked past the busy timeout
    DISK_FULL = 5
    READ_ONLY = 6  # the data dir's file system is mounted read-only
    DATABASE_CORRUPT = 7  # damaged, or not a voiceline database
    PERMISSION_DENIED = 8
    ADDRESS_IN_USE = 9  # a SIP listen address is taken
    STOP_OVERRUN = 10  # stopping outlived sip.shutdown_timeout and its grace: the process ended itself


class StartFailed(Exception):
    """The service could not start; `str()` is the admin's one line (no caller data: paths and causes)."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def start_failure(exc: Exception, config: Config) -> StartFailed | None:
    """What a start-up exception means for the admin, or None for one that is not a known cause (a bug)."""
    if isinstance(exc, StartFailed):
        return exc
    data_dir = Path(config.storage.data_dir)
    database = data_dir / DB_NAME
    if isinstance(exc, DataDirBusy):
        return StartFailed(ExitCode.ALREADY_RUNNING, f"{exc}; stop it first, or give this one another --data-dir")
    cause = exc.__cause__ if isinstance(exc, StorageError) and exc.__cause__ is not None else exc
    known = None
    if isinstance(cause, sqlite3.Error):
        known = _database_failure(cause, database)
    elif isinstance(cause, OSError):
        known = _os_failure(cause, data_dir, config)
    if known is not None:
        return known
    if isinstance(exc, (StorageError, MediaError)):
        return StartFailed(ExitCode.FAILED, str(exc))
    if isinstance(exc, sqlite3.Error):
        return StartFailed(ExitCode.FAILED, f"{database}: {exc}")
    if isinstance(exc, OSError):
        return StartFailed(ExitCode.FAILED, str(exc.strerror or exc))
    return None


def _database_failure(exc: sqlite3.Error, database: Path) -> StartFailed | None:
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return StartFailed(
            ExitCode.DATABASE_LOCKED,
            f"the database {database} is locked by another process (waited the busy timeout); "
            "find it with `fuser` and let it finish",
        )
    if name == "SQLITE_FULL" or (name.startswith("SQLITE_IOERR") and _nearly_full(database.parent)):
        return _disk_full(database.parent)
    if name.startswith("SQLITE_READONLY"):
        return _read_only(database.parent)
    if name.startswith("SQLITE_CORRUPT") or name == "SQLITE_NOTADB":
        return StartFailed(
            ExitCode.DATABASE_CORRUPT,
            f"{database} is damaged or not a voiceline database ({exc}); it was left untouched: "
            "restore it from a backup or move it away",
        )
    if name.startswith(("SQLITE_PERM", "SQLITE_AUTH", "SQLITE_CANTOPEN")) and not os.access(database.parent, os.W_OK):
        return _permission_denied(database.parent)
    return None


def _os_failure(exc: OSError, data_dir: Path, config: Config) -> StartFailed | None:
    if exc.errno == errno.EROFS:
        return _read_only(data_dir)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return _disk_full(data_dir)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return _permission_denied(data_dir, exc.filename)
    if exc.errno == errno.EADDRINUSE:
        addresses = " and ".join(filter(None, (config.sip.listen, config.sip.listen_tls)))
        return StartFailed(
            ExitCode.ADDRESS_IN_USE, f"the SIP address {addresses} is already in use (another SIP service?)"
        )
    return None


def _nearly_full(directory: Path) -> bool:
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES


def _disk_full(data_dir: Path) -> StartFailed:
    return StartFailed(ExitCode.DISK_FULL, f"no space left on the file system of {data_dir}: free some and start again")


def _read_only(data_dir: Path) -> StartFailed:
    return StartFailed(ExitCode.READ_ONLY, f"{data_dir} is on a read-only file system: it must be writable")


def _permission_denied(data_dir: Path, filename: object = None) -> StartFailed:
    where = f" ({filename})" if filename else ""
    return StartFailed(ExitCode.PERMISSION_DENIED, f"permission denied{where}: the service's user must own {data_dir}")
