"""What a start-up failure tells the admin: real OS and SQLite errors to one line and an exit code."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from voiceline.config import Config, SipConfig, StorageConfig
from voiceline.datadir_lock import DataDirBusy
from voiceline.startup import ExitCode, start_failure
from voiceline.storage import DB_NAME, StorageError


def config_for(data_dir: Path) -> Config:
    return Config(sip=SipConfig(listen="127.0.0.1:5099"), storage=StorageConfig(data_dir=str(data_dir)))


def sqlite_error(statement: str, database: Path) -> sqlite3.Error:
    connection = sqlite3.connect(database, timeout=0)
    try:
        with pytest.raises(sqlite3.Error) as raised:
            connection.execute(statement)
    finally:
        connection.close()
    return raised.value


@pytest.mark.parametrize(
    ("number", "code", "words"),
    [
        (errno.EROFS, ExitCode.READ_ONLY, "read-only file system"),
        (errno.ENOSPC, ExitCode.DISK_FULL, "no space left"),
        (errno.EACCES, ExitCode.PERMISSION_DENIED, "permission denied (/x/voiceline.lock)"),
        (errno.EADDRINUSE, ExitCode.ADDRESS_IN_USE, "127.0.0.1:5099 is already in use"),
        (errno.EIO, ExitCode.FAILED, "I/O error"),
    ],
)
def test_os_errors(tmp_path: Path, number: int, code: ExitCode, words: str) -> None:
    exc = OSError(number, "I/O error" if number == errno.EIO else "x", "/x/voiceline.lock")
    failure = start_failure(exc, config_for(tmp_path))
    assert failure is not None and failure.code == code and words in str(failure)


def test_another_owner_is_named(tmp_path: Path) -> None:
    failure = start_failure(DataDirBusy(tmp_path, 4242), config_for(tmp_path))
    assert failure is not None and failure.code == ExitCode.ALREADY_RUNNING
    assert f"another voiceline (pid 4242) already serves {tmp_path}" in str(failure)


def test_a_file_that_is_no_database_is_corrupt_also_behind_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"no database here\n" * 100)
    error = sqlite_error("SELECT * FROM sqlite_master", tmp_path / DB_NAME)
    wrapped = StorageError("not usable")
    wrapped.__cause__ = error
    for exc in (error, wrapped):
        failure = start_failure(exc, config_for(tmp_path))
        assert failure is not None and failure.code == ExitCode.DATABASE_CORRUPT, exc
        assert "is damaged or not a voiceline database" in str(failure)


def test_a_database_another_connection_holds_is_locked(tmp_path: Path) -> None:
    holder = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        error = sqlite_error("CREATE TABLE t (x)", tmp_path / DB_NAME)
    finally:
        holder.close()
    failure = start_failure(error, config_for(tmp_path))
    assert failure is not None and failure.code == ExitCode.DATABASE_LOCKED
    assert "locked by another process" in str(failure)


def test_a_bug_is_not_explained_away(tmp_path: Path) -> None:
    assert start_failure(ValueError("a bug"), config_for(tmp_path)) is None
