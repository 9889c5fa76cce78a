"""One heap of deadlines for many owners (transactions, calls), driven by a clock the caller passes in.

Each owner keeps its armed deadlines by name in `deadlines`; re-arming or
cancelling a timer only changes that dict, and the heap skips an entry that no
longer matches it (lazy deletion: no search through the heap).
"""

from __future__ import annotations

import heapq
import itertools
from typing import Protocol


class Timed(Protocol):
    deadlines: dict[str, float]


class TimerHeap:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, Timed]] = []
        self._order = itertools.count()

    def arm(self, owner: Timed, name: str, deadline: float) -> None:
        owner.deadlines[name] = deadline
        heapq.heappush(self._heap, (deadline, next(self._order), name, owner))

    @staticmethod
    def cancel(owner: Timed, name: str) -> None:
        owner.deadlines.pop(name, None)

    def next_deadline(self) -> float | None:
        while self._heap:
            deadline, _, name, owner = self._heap[0]
            if owner.deadlines.get(name) == deadline:
                return deadline
            heapq.heappop(self._heap)  # stale entry: that timer was re-armed or cancelled
        return None

    def pop_due(self, now: float) -> tuple[Timed, str] | None:
        """The earliest timer due at `now` (disarmed as it is returned), or None."""
        deadline = self.next_deadline()
        if deadline is None or deadline > now:
            return None
        _, _, name, owner = heapq.heappop(self._heap)
        del owner.deadlines[name]
        return owner, name
