"""The preference pool: talker with listener first, nobody delayed beyond preference_wait, skips respected."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from voiceline.pairing.pool import Pairing, Preference, PreferencePool

PREFERENCE_WAIT, SKIP_WINDOW = 10.0, 25.0
TALK, LISTEN, EITHER = Preference.TALK, Preference.LISTEN, Preference.EITHER


def test_a_talker_is_paired_with_a_listener_ahead_of_a_longer_waiting_talker() -> None:
    pool = PreferencePool(PREFERENCE_WAIT, SKIP_WINDOW)
    pool.add("a", TALK, 0.0)
    pool.add("b", TALK, 1.0)
    assert pool.match(1.0) == []
    pool.add("c", LISTEN, 2.0)
    assert pool.match(2.0) == [Pairing("a", "c", preference_match=True)]
    assert "b" in pool and len(pool) == 1


def test_either_is_paired_with_anyone_and_the_longest_waiter_first() -> None:
    pool = PreferencePool(PREFERENCE_WAIT, SKIP_WINDOW)
    pool.add("a", LISTEN, 0.0)
    pool.add("b", EITHER, 1.0)
    assert pool.match(1.0) == [Pairing("a", "b", preference_match=False)]


def test_after_the_preference_wait_anyone_will_do() -> None:
    pool = PreferencePool(PREFERENCE_WAIT, SKIP_WINDOW)
    pool.add("a", TALK, 0.0)
    pool.add("b", TALK, 4.0)
    assert pool.match(9.9) == []
    assert pool.deadline(9.9) == 10.0
    assert pool.match(10.0) == [Pairing("a", "b", preference_match=False)]


def test_a_skipped_pair_waits_out_the_window_and_never_meets_after_a_second_skip() -> None:
    pool = PreferencePool(PREFERENCE_WAIT, SKIP_WINDOW)
    pool.skipped("a", "b", 0.0)
    pool.add("a", EITHER, 0.0)
    pool.add("b", EITHER, 0.0)
    assert pool.match(24.9) == []
    assert pool.deadline(1.0) == 25.0
    assert pool.match(25.0) == [Pairing("a", "b", preference_match=False)]
    pool.skipped("b", "a", 30.0)  # once each: still allowed after the window
    pool.add("a", EITHER, 30.0)
    pool.add("b", EITHER, 30.0)
    assert pool.match(55.0) == [Pairing("a", "b", preference_match=False)]
    pool.skipped("b", "a", 60.0)  # b skipped a twice
    pool.add("a", EITHER, 60.0)
    pool.add("b", EITHER, 60.0)
    assert pool.deadline(60.0) is None
    assert pool.match(1000.0) == []


def test_a_partner_skipped_before_comes_after_anyone_new() -> None:
    pool = PreferencePool(PREFERENCE_WAIT, SKIP_WINDOW)
    pool.skipped("a", "b", 0.0)
    pool.add("a", EITHER, 30.0)
    pool.add("b", EITHER, 30.0)
    pool.add("c", EITHER, 31.0)
    assert pool.match(31.0) == [Pairing("a", "c", preference_match=False)]


def test_forgetting_a_call_forgets_its_skips() -> None:
    pool = PreferencePool(PREFERENCE_WAIT, SKIP_WINDOW)
    pool.skipped("a", "b", 0.0)
    pool.skipped("a", "b", 1.0)
    pool.forget("a")
    pool.add("a", EITHER, 2.0)  # a new call that happens to reuse the id: no history
    pool.add("b", EITHER, 2.0)
    assert pool.match(2.0) == [Pairing("a", "b", preference_match=False)]


MEMBERS = st.sampled_from("abcdef")
operations = st.lists(
    st.tuples(
        st.sampled_from(["add", "remove", "prefer", "skip"]),
        MEMBERS,
        MEMBERS,
        st.sampled_from(list(Preference)),
        st.floats(min_value=0.0, max_value=15.0),
    ),
    max_size=60,
)


@settings(max_examples=400)
@given(operations)
def test_pool_properties(ops: list[tuple[str, str, str, Preference, float]]) -> None:
    """Driven as the line drives it (a match after every change and at every deadline):
    never a caller with itself or with someone already paired, never inside a skip window or
    after two skips, and no two waiters the rules allow to meet are kept waiting past the moment
    they may meet (a preference delays nobody beyond preference_wait)."""
    pool = PreferencePool(PREFERENCE_WAIT, SKIP_WINDOW)
    since: dict[str, float] = {}
    preferences: dict[str, Preference] = {}
    last_skip: dict[frozenset[str], float] = {}
    skips: dict[tuple[str, str], int] = {}
    now = 0.0

    def may_meet_from(a: str, b: str) -> float | None:
        """When the rules let a and b meet, given who is waiting now (None: not at all)."""
        if a == b or skips.get((a, b), 0) >= 2 or skips.get((b, a), 0) >= 2:
            return None
        fit = EITHER in (preferences[a], preferences[b]) or preferences[a] is not preferences[b]
        preference_ok = max(since[a], since[b]) if fit else min(since[a], since[b]) + PREFERENCE_WAIT
        return max(preference_ok, last_skip.get(frozenset((a, b)), -SKIP_WINDOW) + SKIP_WINDOW)

    def no_one_kept_waiting(at: float) -> None:
        """Nothing changed since the last match: any two who may meet could not meet before `at`."""
        for a in since:
            assert all((meet := may_meet_from(a, b)) is None or meet >= at for b in since)

    def match(at: float) -> None:
        for pairing in pool.match(at):
            first, second = pairing.first, pairing.second
            assert first != second
            meet = may_meet_from(first, second)  # both were waiting
            assert meet is not None and meet <= at
            assert pairing.preference_match == ({preferences[first], preferences[second]} == {TALK, LISTEN})
            del since[first], since[second]
        for a in since:  # whoever is left has nobody they may meet now
            assert all((meet := may_meet_from(a, b)) is None or meet > at for b in since)

    for kind, member, other, preference, advance in ops:
        target = now + advance
        while (deadline := pool.deadline(now)) is not None and deadline <= target:
            no_one_kept_waiting(deadline)
            now = deadline
            match(now)
        no_one_kept_waiting(target)
        now = target
        if kind == "add" and member not in since:
            pool.add(member, preference, now)
            since[member], preferences[member] = now, preference
        elif kind == "remove":
            pool.remove(member)
            since.pop(member, None)
        elif kind == "prefer" and member in since:
            pool.prefer(member, preference)
            preferences[member] = preference
        elif kind == "skip" and member != other and member not in since and other not in since:
            pool.skipped(member, other, now)  # two who were talking (outside the pool)
            last_skip[frozenset((member, other))] = now
            skips[member, other] = skips.get((member, other), 0) + 1
        match(now)
    assert len(pool) == len(since)
