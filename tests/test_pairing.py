"""Pool policy and the per-caller session state machine, on a fake clock."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from voiceline.pairing.pool import Pool
from voiceline.pairing.service import PairingService, Participant


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(eq=False)
class Ear:
    """A participant that records what it was told to hear."""

    id: str
    heard: list[str] = field(default_factory=list)

    def hear_hold(self) -> None:
        self.heard.append("hold")

    def hear(self, other: Participant) -> None:
        self.heard.append(other.id)


def test_pool_pairs_newcomer_with_longest_waiter() -> None:
    pool: Pool[str] = Pool()
    assert pool.add("a", 0.0) is None
    assert pool.add("b", 1.0) == "a"
    assert pool.add("c", 2.0) is None
    assert pool.add("d", 3.0) == "c"
    assert len(pool) == 0


def test_pool_remove_and_order() -> None:
    pool: Pool[str] = Pool()
    pool.add("a", 0.0)
    assert pool.remove("a")
    assert not pool.remove("a")
    pool.add("b", 1.0)
    assert pool.waiting_since("b") == 1.0
    assert pool.add("c", 2.0) == "b"


@given(st.lists(st.integers(min_value=0, max_value=30), max_size=60))
def test_pool_never_pairs_anyone_twice_at_once(ops: list[int]) -> None:
    """Any sequence of arrivals and departures: at most one waiter, pairs are disjoint."""
    pool: Pool[int] = Pool()
    paired: dict[int, int] = {}
    for t, member in enumerate(ops):
        if member in pool or member in paired:
            pool.remove(member)
            partner = paired.pop(member, None)
            if partner is not None:
                del paired[partner]
            continue
        partner = pool.add(member, float(t))
        if partner is not None:
            assert partner != member and partner not in paired
            paired[member], paired[partner] = partner, member
        assert len(pool) <= 1


def test_service_waits_then_pairs_then_returns_partner_to_pool() -> None:
    clock = FakeClock()
    service = PairingService(clock)
    a, b, c = Ear("a"), Ear("b"), Ear("c")
    service.join(a)
    assert a.heard == ["hold"] and service.waiting == 1
    clock.now = 2.0
    service.join(b)
    assert a.heard[-1] == "b" and b.heard == ["a"] and service.talking == 2
    clock.now = 5.0
    service.join(c)
    assert c.heard == ["hold"]
    clock.now = 9.0
    summary = service.leave("a")
    assert summary is not None
    assert (summary.waited, summary.talked, summary.partners) == (2.0, 7.0, 1)
    # b goes back to the pool and meets c, who has been waiting.
    assert b.heard[-1] == "c" and c.heard[-1] == "b"
    clock.now = 10.0
    service.leave("c")
    assert b.heard[-1] == "hold" and service.waiting == 1
    clock.now = 12.0
    b_summary = service.leave("b")
    assert b_summary is not None
    assert (b_summary.waited, b_summary.talked, b_summary.partners) == (2.0, 8.0, 2)
    assert service.waiting == 0 and service.leave("b") is None


def test_waiting_caller_leaving_empties_pool() -> None:
    service = PairingService(FakeClock())
    service.join(Ear("a"))
    service.leave("a")
    b = Ear("b")
    service.join(b)
    assert b.heard == ["hold"]


def test_hash_while_talking_finds_someone_else_for_both() -> None:
    clock = FakeClock()
    service = PairingService(clock)
    a, b, c = Ear("a"), Ear("b"), Ear("c")
    service.join(a)
    service.join(b)
    clock.now = 3.0
    service.join(c)  # waits
    clock.now = 5.0
    service.digit("a", "#")
    # a asked: a meets c, who was waiting; b waits, and is not put back with a.
    assert a.heard[-1] == "c" and c.heard[-1] == "a" and b.heard[-1] == "hold"
    assert service.waiting == 1 and service.talking == 2
    d = Ear("d")
    service.join(d)
    assert d.heard == ["b"] and b.heard[-1] == "d"
    summary = service.leave("b")
    assert summary is not None and summary.partners == 2 and summary.talked == 5.0


def test_after_hash_the_two_wait_apart_until_someone_new_arrives() -> None:
    service = PairingService(FakeClock())
    a, b = Ear("a"), Ear("b")
    service.join(a)
    service.join(b)
    service.digit("b", "#")
    assert a.heard[-1] == "hold" and b.heard[-1] == "hold" and service.waiting == 2
    c = Ear("c")
    service.join(c)
    assert c.heard == ["b"]  # the longest waiter it may meet: b re-entered the pool first
    service.leave("c")  # b waits again, still not with a
    assert b.heard[-1] == "hold" and a.heard[-1] == "hold" and service.waiting == 2


def test_other_keys_and_hash_while_waiting_change_nothing() -> None:
    service = PairingService(FakeClock())
    a, b = Ear("a"), Ear("b")
    service.join(a)
    service.digit("a", "#")
    assert a.heard == ["hold"]
    service.join(b)
    for digit in "0123456789*ABCD":
        service.digit("a", digit)
    service.digit("nobody", "#")
    assert a.heard == ["hold", "b"] and b.heard == ["a"]


def test_pool_skips_waiters_it_may_not_pair_with() -> None:
    pool: Pool[str] = Pool()
    pool.add("a", 0.0)
    pool.add("b", 1.0, lambda waiter: waiter != "a")
    assert len(pool) == 2
    assert pool.add("c", 2.0, lambda waiter: waiter != "a") == "b"
    assert pool.add("d", 3.0) == "a"


def paired_pair() -> tuple[PairingService, Ear, Ear]:
    service = PairingService(FakeClock())
    a, b = Ear("a"), Ear("b")
    service.join(a)
    service.join(b)
    assert a.heard == ["hold", "b"] and b.heard == ["a"]
    return service, a, b


def test_hold_keeps_the_pair_and_plays_hold_audio_to_the_partner_until_resume() -> None:
    service, a, b = paired_pair()
    service.hold("a")
    assert b.heard[-1] == "hold" and a.heard == ["hold", "b"]  # the held caller is told nothing
    assert service.talking == 2 and service.waiting == 0  # not paired away
    service.join(Ear("c"))  # a newcomer waits: b stays a's partner
    assert service.waiting == 1
    service.resume("a")
    assert a.heard[-1] == "b" and b.heard[-1] == "a"


def test_held_waiting_caller_leaves_the_pool_until_resume() -> None:
    service = PairingService(FakeClock())
    a = Ear("a")
    service.join(a)
    service.hold("a")
    assert service.waiting == 0
    c = Ear("c")
    service.join(c)  # not paired with the held caller
    assert c.heard == ["hold"]
    service.resume("a")
    assert a.heard[-1] == "c" and c.heard[-1] == "a"


def test_partner_leaving_a_held_caller_leaves_it_out_of_the_pool_until_resume() -> None:
    service, a, b = paired_pair()
    service.hold("a")
    service.leave("b")
    assert service.waiting == 0 and a.heard == ["hold", "b"]
    service.resume("a")
    assert service.waiting == 1 and a.heard[-1] == "hold"


def test_both_held_then_one_resumes_hears_hold_audio() -> None:
    service, a, b = paired_pair()
    service.hold("a")
    service.hold("b")
    service.resume("a")
    assert a.heard[-1] == "hold"
    service.resume("b")
    assert a.heard[-1] == "b" and b.heard[-1] == "a"


def test_caller_joining_on_hold_is_paired_only_after_resume() -> None:
    service = PairingService(FakeClock())
    a, b = Ear("a"), Ear("b")
    service.join(a)
    service.join(b, held=True)
    assert b.heard == [] and a.heard == ["hold"] and service.waiting == 1
    service.resume("b")
    assert a.heard[-1] == "b" and b.heard == ["a"]


def test_hash_while_the_partner_is_on_hold_frees_both_and_they_stay_apart() -> None:
    service, a, b = paired_pair()
    service.hold("b")
    service.digit("a", "#")
    assert a.heard[-1] == "hold" and service.waiting == 1  # a waits; held b stays out of the pool
    service.resume("b")
    assert service.waiting == 2 and b.heard[-1] == "hold"  # b waits too, not put back with a
