"""The one timer heap of the SIP core: lazy cancellation that never keeps dead owners for long."""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field

from voiceline.sip.timer_heap import MIN_COMPACT_SIZE, TimerHeap


@dataclass(eq=False)
class Owner:
    deadlines: dict[str, float] = field(default_factory=dict)


def test_cancelled_far_deadlines_do_not_pile_up_or_keep_their_owners() -> None:
    heap = TimerHeap()
    keep = [Owner() for _ in range(5)]
    for index, owner in enumerate(keep):
        heap.arm(owner, "answer", 10.0 + index)
    gone = []
    for index in range(5000):  # a call's maximum duration, hours ahead, armed and cancelled as the call ends
        owner = Owner()
        heap.arm(owner, "max_duration", 14400.0 + index)
        heap.cancel(owner, "max_duration")
        gone.append(weakref.ref(owner))
        del owner
    assert len(heap) <= 2 * MIN_COMPACT_SIZE
    gc.collect()
    assert sum(ref() is not None for ref in gone) <= 2 * MIN_COMPACT_SIZE
    # The live timers still come out in order, each once.
    fired = []
    while (due := heap.pop_due(100.0)) is not None:
        fired.append(due)
    assert fired == [(owner, "answer") for owner in keep] and heap.next_deadline() is None


def test_a_re_armed_timer_fires_once_at_its_last_deadline_across_a_compaction() -> None:
    heap = TimerHeap()
    owner = Owner()
    for step in range(3 * MIN_COMPACT_SIZE):
        heap.arm(owner, "refresh", 100.0 + step)
    assert len(heap) <= 2 * MIN_COMPACT_SIZE
    assert heap.pop_due(100.0 + 3 * MIN_COMPACT_SIZE - 2) is None
    assert heap.pop_due(1000.0) == (owner, "refresh") and heap.pop_due(1000.0) is None
