"""One heap of deadlines for many owners (transactions, calls), driven by a clock the caller passes in.

Each owner keeps its armed deadlines by name in `deadlines`; re-arming or
cancelling a timer only changes that dict, and the heap skips an entry that no
longer matches it (lazy deletion: no search through the heap). Stale entries
far in the future (a call's maximum duration, hours ahead, after it ended) would
keep their owners alive until then, so the heap drops every stale entry once it
has doubled since it last did: memory follows the timers armed, at O(1) amortised.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Protocol


class Timed(Protocol):
    deadlines: dict[str, float]


# Below this many entries the heap is never compacted.
MIN_COMPACT_SIZE = 64


class TimerHeap:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, Timed]] = []
        self._order = itertools.count()
        self._compact_above = MIN_COMPACT_SIZE

    def __len__(self) -> int:
        """Entries held, stale ones included."""
        return len(self._heap)

    def arm(self, owner: Timed, name: str, deadline: float) -> None:
        owner.deadlines[name] = deadline
        heapq.heappush(self._heap, (deadline, next(self._order), name, owner))
        if len(self._heap) > self._compact_above:
            self._compact()

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if entry[3].deadlines.get(entry[2]) == entry[0]]
        heapq.heapify(self._heap)
        self._compact_above = max(MIN_COMPACT_SIZE, 2 * len(self._heap))

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
