"""Why `voiceline serve` could not start: one line for the admin and one exit code per cause.

The codes are part of the interface (README, Operations; the systemd unit does not restart
on the ones a restart cannot cure).
"""

from __future__ import annotations

import errno
import sqlite3
from enum import IntEnum
from pathlib import Path

from voiceline.audio.media import MediaError
from voiceline.config import Config
from voiceline.datadir_lock import DataDirBusy
from voiceline.storage import DB_NAME, Fault, StorageError, fault_of


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
    database = Path(config.storage.data_dir) / DB_NAME
    if isinstance(exc, DataDirBusy):
        return StartFailed(ExitCode.ALREADY_RUNNING, f"{exc}; stop it first, or give this one another --data-dir")
    cause = exc.__cause__ if isinstance(exc, StorageError) and exc.__cause__ is not None else exc
    if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
        addresses = " and ".join(filter(None, (config.sip.listen, config.sip.listen_tls)))
        return StartFailed(
            ExitCode.ADDRESS_IN_USE, f"the SIP address {addresses} is already in use (another SIP service?)"
        )
    if isinstance(cause, (sqlite3.Error, OSError)):
        known = _fault_failure(fault_of(cause, database), cause, database)
        if known is not None:
            return known
    if isinstance(exc, (StorageError, MediaError)):
        return StartFailed(ExitCode.FAILED, str(exc))
    if isinstance(exc, sqlite3.Error):
        return StartFailed(ExitCode.FAILED, f"{database}: {exc}")
    if isinstance(exc, OSError):
        return StartFailed(ExitCode.FAILED, str(exc.strerror or exc))
    return None


def _fault_failure(fault: Fault | None, cause: Exception, database: Path) -> StartFailed | None:
    """The exit code and line for a fault of the database or its directory; None for one with no code of its own."""
    data_dir = database.parent
    match fault:
        case Fault.LOCKED:
            return StartFailed(
                ExitCode.DATABASE_LOCKED,
                f"the database {database} is locked by another process (waited the busy timeout); "
                "find it with `fuser` and let it finish",
            )
        case Fault.FULL:
            return StartFailed(
                ExitCode.DISK_FULL, f"no space left on the file system of {data_dir}: free some and start again"
            )
        case Fault.READ_ONLY:
            return StartFailed(ExitCode.READ_ONLY, f"{data_dir} is on a read-only file system: it must be writable")
        case Fault.CORRUPT:
            return StartFailed(
                ExitCode.DATABASE_CORRUPT,
                f"{database} is damaged or not a voiceline database ({cause}); it was left untouched: "
                "restore it from a backup or move it away",
            )
        case Fault.PERMISSION_DENIED:
            filename = getattr(cause, "filename", None)
            where = f" ({filename})" if filename else ""
            return StartFailed(
                ExitCode.PERMISSION_DENIED, f"permission denied{where}: the service's user must own {data_dir}"
            )
    return None  # an I/O error, a file that cannot be opened: the error's own words say more
