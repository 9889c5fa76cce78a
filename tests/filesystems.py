"""Real file systems that refuse writes, for storage tests (need root to mount): a small full one, a
read-only view, and an ext4 image that turns read-only under open files."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "1m") -> Iterator[Path]:
    """A tmpfs of `size` mounted on `where` (made if missing), unmounted after."""
    where.mkdir(parents=True, exist_ok=True)
    mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@contextlib.contextmanager
def read_only_view(directory: Path, view: Path) -> Iterator[Path]:
    """`directory` seen read-only at `view` (a read-only bind mount), unmounted after."""
    view.mkdir(parents=True, exist_ok=True)
    mount("--bind", str(directory), str(view))
    try:
        mount("-o", "remount,bind,ro", str(view))
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=True)


def fill(disk: Path) -> Path:
    """Write zeros until the file system is full; the file, to remove when space is wanted back."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out, contextlib.suppress(OSError):
        while out.write(b"\0" * 4096):
            pass
    return filler


@contextlib.contextmanager
def ext4_image(where: Path, image: Path, size: str = "16M") -> Iterator[Path]:
    """A fresh ext4 file system in `image`, loop-mounted on `where` with errors=remount-ro, unmounted after."""
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run([_sbin("mkfs.ext4"), "-q", str(image)], check=True, capture_output=True)
    where.mkdir(parents=True, exist_ok=True)
    mount("-o", "loop,errors=remount-ro", str(image), str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def turn_read_only(mount_point: Path) -> None:
    """Make the ext4 file system on `mount_point` hit an error: the kernel remounts it read-only at
    once, files open for writing and all (as after a failing disk)."""
    source = subprocess.run(["findmnt", "-no", "SOURCE", str(mount_point)], check=True, capture_output=True, text=True)
    device = Path(source.stdout.strip()).name
    Path("/sys/fs/ext4", device, "trigger_fs_error").write_text("test\n")


def _sbin(command: str) -> str:
    return shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin") or command
