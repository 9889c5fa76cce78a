"""The anonymous pairing pool: who is waiting, and who is paired next.

Sans-I/O: members are opaque keys, time comes from the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

Member = TypeVar("Member", bound=Hashable)


class Pool(Generic[Member]):
    """Waiting members in arrival order; a newcomer is paired with the longest-waiting one
    it may be paired with."""

    def __init__(self) -> None:
        self._waiting: dict[Member, float] = {}  # insertion order is waiting order

    def add(self, member: Member, now: float, may_pair: Callable[[Member], bool] | None = None) -> Member | None:
        """Pair `member` with the longest waiter for which `may_pair` holds (returned), or let it wait (None)."""
        if member in self._waiting:
            raise ValueError("already waiting")
        for partner in self._waiting:
            if may_pair is None or may_pair(partner):
                del self._waiting[partner]
                return partner
        self._waiting[member] = now
        return None

    def remove(self, member: Member) -> bool:
        return self._waiting.pop(member, None) is not None

    def waiting_since(self, member: Member) -> float | None:
        return self._waiting.get(member)

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, member: object) -> bool:
        return member in self._waiting
