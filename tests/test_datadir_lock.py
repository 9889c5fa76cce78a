"""The data directory's lock, in this process: flock conflicts between open files, so a second
owner here is refused just as another process would be."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from voiceline.datadir_lock import LOCK_FILE, RETIRED_PID_FILE, DataDirBusy, DataDirLock, owner_of


def test_the_owner_is_known_and_a_second_owner_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert owner_of(data_dir) is None  # no directory, no lock file: nobody
    lock = DataDirLock.acquire(data_dir)
    try:
        assert data_dir.stat().st_mode & 0o777 == 0o700
        assert owner_of(data_dir) == os.getpid()
        with pytest.raises(DataDirBusy) as refused:
            DataDirLock.acquire(data_dir, patience=0.05)
        assert refused.value.pid == os.getpid() and str(data_dir) in str(refused.value)
    finally:
        lock.release()
    assert owner_of(data_dir) is None
    assert (data_dir / LOCK_FILE).read_text() == ""  # no pid outlives its owner
    again = DataDirLock.acquire(data_dir)
    again.release()
    assert lock.predecessor is None and again.predecessor is None  # none before, then one that stopped


def test_a_stale_lock_file_and_pid_file_block_nobody(tmp_path: Path) -> None:
    tmp_path.joinpath(LOCK_FILE).write_text("1\n")  # left by a process killed with -9
    tmp_path.joinpath(RETIRED_PID_FILE).write_text("1\n")
    assert owner_of(tmp_path) is None
    lock = DataDirLock.acquire(tmp_path, patience=0)
    try:
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert (tmp_path / LOCK_FILE).stat().st_mode & 0o777 == 0o600
        assert not (tmp_path / RETIRED_PID_FILE).exists()
        assert lock.predecessor == 1  # recognised: an owner that ended without stopping
    finally:
        lock.release()


def test_a_retired_pid_file_alone_names_a_predecessor_that_did_not_stop(tmp_path: Path) -> None:
    tmp_path.joinpath(RETIRED_PID_FILE).write_text("4242\n")  # an older version, killed with -9
    lock = DataDirLock.acquire(tmp_path, patience=0)
    lock.release()
    assert lock.predecessor == 4242 and not (tmp_path / RETIRED_PID_FILE).exists()
