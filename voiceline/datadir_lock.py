"""One owner per data directory: the running service holds an exclusive lock on `DATA_DIR/voiceline.lock`.

The lock is flock(2) on that file. The kernel drops it when the process ends, however it
ends (kill -9 included), so a lock file left behind blocks nobody and needs no cleaning.
While the lock is held the file holds the owner's pid, written by the owner itself, for
people and messages; nothing in voiceline signals a pid read from a file. An owner that
stops empties the file, so a pid found in it by the next owner names one that ended
without stopping (a crash, kill -9, power loss): `DataDirLock.predecessor`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path

LOCK_FILE = "voiceline.lock"
# Older versions told `voiceline drain` where to send SIGUSR1 with this file; one left by a crash
# named a pid that may since belong to anything, so the new owner removes it.
RETIRED_PID_FILE = "voiceline.pid"
# `status` and `drain` test the lock by taking it shared for an instant: a service starting
# at that instant tries again for this long before it says the directory is taken.
ACQUIRE_PATIENCE = 0.5
_RETRY_INTERVAL = 0.02


class DataDirBusy(Exception):
    """Another process holds the data directory's lock."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        owner = f"another voiceline (pid {pid})" if pid else "another voiceline"
        super().__init__(f"{owner} already serves {data_dir}")
        self.data_dir = data_dir
        self.pid = pid


class DataDirLock:
    """The exclusive lock, held from `acquire` until `release` (or the process's end)."""

    def __init__(self, path: Path, fd: int, predecessor: int | None = None) -> None:
        self.path = path
        self._fd: int | None = fd
        # The pid of an owner that ended without stopping (its pid still in the file or in the
        # retired pid file), or None when the last one stopped or there was none.
        self.predecessor = predecessor

    @classmethod
    def acquire(cls, data_dir: Path, patience: float = ACQUIRE_PATIENCE) -> DataDirLock:
        """Create the data dir (0700) if needed and lock it; DataDirBusy when another process holds it.

        OSError as the file system gives it (read-only, permission denied, no space).
        """
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = data_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # like every file in the data dir, whoever made it
            give_up = time.monotonic() + patience
            while not _try_lock(fd, fcntl.LOCK_EX):
                if time.monotonic() >= give_up:
                    raise DataDirBusy(data_dir, _pid_in(fd))
                time.sleep(_RETRY_INTERVAL)
            predecessor = _pid_in(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except BaseException:
            os.close(fd)
            raise
        retired = data_dir / RETIRED_PID_FILE
        with contextlib.suppress(FileNotFoundError, ValueError, UnicodeDecodeError):
            predecessor = predecessor or int(retired.read_text(encoding="ascii").strip())
        with contextlib.suppress(FileNotFoundError):
            retired.unlink()
        return cls(path, fd, predecessor)

    def release(self) -> None:
        """Empty the file (no pid outlives its owner) and drop the lock; the file itself stays."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)


def owner_of(data_dir: Path) -> int | None:
    """Whether a process holds `data_dir`'s lock: its pid (0 when it has not written it yet), or None.

    Only reads: never creates the lock file or the directory. OSError when the file cannot be read.
    """
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if _try_lock(fd, fcntl.LOCK_SH):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return _pid_in(fd) or 0
    finally:
        os.close(fd)


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def _pid_in(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None
