"""Fixed ports for test runs that may run side by side: one lane of the space below the kernel's
ephemeral range per run, handed out in named blocks.

Ports a test chooses itself (RTP ranges, a phone's RTP socket) must lie below 32768, where the
kernel never hands out ephemeral ports (`ip_local_port_range`), and must differ between two runs
on the same machine (two clones, two terminals). A run holds an fcntl lock on one lane's lock file
for as long as its process lives; a concurrent run finds that lane locked and takes the next. The
kernel drops the lock when the process ends, however it ends, so a crashed run frees its lane.
"""

from __future__ import annotations

import fcntl
import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

LOWEST_PORT = 10000
EPHEMERAL_START = 32768  # Linux's default ip_local_port_range starts here
LANE_PORTS = 7000  # three lanes, 10000-30999; 31000-32767 is in no lane
LANE_COUNT = (EPHEMERAL_START - LOWEST_PORT) // LANE_PORTS
LOCK_NAME = "voiceline-test-ports-lane-{}.lock"


class PortsExhausted(RuntimeError):
    pass


@dataclass
class Lane:
    """Ports [low, low + LANE_PORTS) for this run; `claim` hands out disjoint blocks of it."""

    low: int
    lock_file: IO[bytes] = field(repr=False)
    blocks: dict[str, tuple[int, int]] = field(default_factory=dict)
    next_free: int = 0

    @property
    def high(self) -> int:
        return self.low + LANE_PORTS - 1

    def claim(self, name: str, count: int) -> tuple[int, int]:
        """The block (first, last) named `name`, `count` ports starting on an even port (RTP
        takes even ports, RTCP the odd one above); the same block again for the same name."""
        if name in self.blocks:
            first, last = self.blocks[name]
            if last - first + 1 != count:
                raise ValueError(f"port block {name!r} was claimed with {last - first + 1} ports, not {count}")
            return first, last
        first = self.low + self.next_free + self.next_free % 2
        last = first + count - 1
        if count < 1 or last > self.high:
            raise PortsExhausted(f"port block {name!r} of {count} ports does not fit in the lane {self.low}-{self.high}")
        self.next_free = last + 1 - self.low
        self.blocks[name] = (first, last)
        return first, last


@functools.cache
def run_lane(lock_dir: Path = Path(tempfile.gettempdir())) -> Lane:
    """This process's lane: the first one no other running process holds."""
    for index in range(LANE_COUNT):
        lock_file = (lock_dir / LOCK_NAME.format(index)).open("ab")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            continue
        return Lane(LOWEST_PORT + index * LANE_PORTS, lock_file)
    raise PortsExhausted(f"all {LANE_COUNT} port lanes are held by other runs (lock files in {lock_dir})")
