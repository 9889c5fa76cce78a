"""Safety without identity, on a fake clock: the ledger alone, then a line's journeys with it.

Callers are pseudonyms (`Caller`), as the SIP side hands them over; calls are
ids. Each scenario calls again "with the same number" by arriving with the same
pseudonym under a new call id.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from voiceline.config import ConfigError, from_mapping
from voiceline.pairing.journey import (
    BridgeExternal,
    CallHelp,
    EndHelpCall,
    HangUp,
    HangUpReason,
    JourneySettings,
    PlayMusic,
    PlayPrompts,
    PlayRingback,
    Silence,
    State,
    Statistic,
)
from voiceline.pairing.line import Line, Step
from voiceline.pairing.pool import PreferencePool, Preference
from voiceline.pairing.safety import Arrival, Caller, SafetyLedger, SafetySettings

PROMPT_IDS = set(tomllib.loads((Path(__file__).parent.parent / "prompts" / "en.toml").read_text())["prompts"])
SHORT = JourneySettings(welcome=False, offer_choice=False, reassure_every=100.0, max_wait=500.0, skip_window=30.0)
A, B, C, D = (Caller(name * 8, 0) for name in ("aa", "bb", "cc", "dd"))


def of(step: Step, call: str) -> list[object]:
    return [action for who, action in step.actions if who == call]


def counted(step: Step) -> list[Statistic]:
    return [count.statistic for count in step.statistics]


def partner_of(line: Line, call: str) -> str | None:
    journey = line.journey(call)
    return None if journey is None else journey.partner


def talking(line: Line, a: str, b: str, now: float) -> None:
    """Both are bridged: a answered first, b pairs with it, both heard the connect cue."""
    assert partner_of(line, a) == b
    line.prompt_finished(a, now)
    line.prompt_finished(b, now)
    assert line.journey(a).state is State.TALKING  # type: ignore[union-attr]


def line_with(**safety: object) -> Line:
    return Line(SHORT, SafetyLedger(SafetySettings(**safety)))  # type: ignore[arg-type]


# -- the ledger ------------------------------------------------------------------------


def test_a_reported_pair_is_never_paired_again_and_the_threshold_starts_a_cooldown() -> None:
    ledger = SafetyLedger(SafetySettings(report_threshold=2, cooldown=600.0))
    for call, caller in (("a1", A), ("b1", B), ("c1", C)):
        ledger.arrived(call, caller, 0.0)
    assert ledger.reported("a1", "b1", 1.0) is None  # one reporter: not yet
    assert ledger.reported("a1", "b1", 2.0) is None  # the same reporter twice counts once
    assert not ledger.may_pair("a1", "b1", 3.0) and ledger.may_pair("b1", "c1", 3.0)
    assert ledger.reported("c1", "b1", 4.0) == 604.0  # two different reporters
    assert not ledger.may_pair("b1", "d1", 5.0)
    ledger.left("b1")
    assert ledger.arrived("b2", B, 100.0) is Arrival.HELD_APART
    assert ledger.held_apart_until("b2") == 604.0
    ledger.left("b2")
    assert ledger.arrived("b3", B, 604.0) is Arrival.WELCOME


def test_reports_by_withheld_callers_part_the_pair_but_count_for_no_cooldown() -> None:
    ledger = SafetyLedger(SafetySettings(report_threshold=1))
    ledger.arrived("w", Caller("ee" * 8, 0, withheld=True), 0.0)
    ledger.arrived("b", B, 0.0)
    assert ledger.reported("w", "b", 1.0) is None and not ledger.may_pair("w", "b", 1.0)


def test_the_rate_limit_counts_calls_in_the_last_hour() -> None:
    ledger = SafetyLedger(SafetySettings(max_calls_per_hour=2))
    assert [ledger.arrived(f"a{i}", A, float(i)) for i in range(3)] == [Arrival.WELCOME, Arrival.WELCOME, Arrival.OVER_RATE]
    assert ledger.arrived("a3", A, 3600.0) is Arrival.WELCOME  # the first call is an hour old
    assert ledger.arrived("w", Caller("ff" * 8, 0, withheld=True), 0.0) is Arrival.WELCOME


def test_a_line_may_refuse_withheld_callers() -> None:
    ledger = SafetyLedger(SafetySettings(accept_withheld=False))
    assert ledger.arrived("w", Caller("ee" * 8, 0, withheld=True), 0.0) is Arrival.WITHHELD_REFUSED
    assert ledger.arrived("a", A, 0.0) is Arrival.WELCOME


def test_a_new_key_forgets_everything_once_the_old_key_s_calls_are_over() -> None:
    ledger = SafetyLedger(SafetySettings(report_threshold=1))
    ledger.arrived("a1", A, 0.0)
    ledger.arrived("b1", B, 0.0)
    ledger.reported("a1", "b1", 1.0)
    ledger.left("b1")
    ledger.arrived("c2", Caller("cc" * 8, 1), 10.0)  # a call under the next key
    assert len(ledger) > 0  # a1's call, made under the old key, goes on
    ledger.left("a1")
    assert len(ledger) == 1  # c's, made under the new key
    # (the same pseudonyms again only to show nothing of the old key is left: a new key makes new ones)
    assert ledger.arrived("b2", Caller(B.pseudonym, 1), 20.0) is Arrival.WELCOME
    ledger.arrived("a2", Caller(A.pseudonym, 1), 20.0)
    assert ledger.may_pair("a2", "b2", 20.0) and len(ledger) == 3


def test_a_withheld_caller_s_records_go_with_its_call() -> None:
    ledger = SafetyLedger(SafetySettings())
    ledger.arrived("w", Caller("ee" * 8, 0, withheld=True), 0.0)
    ledger.arrived("a", A, 0.0)
    ledger.talked("w", "a", 1.0)
    ledger.left("w")
    assert len(ledger) == 1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40), st.sampled_from(["report", "skip", "talk"])), max_size=100))
def test_memory_is_bounded_and_a_reported_pair_stays_apart(events: list[tuple[int, int, str]]) -> None:
    ledger = SafetyLedger(SafetySettings(max_records=16, report_threshold=100))
    now = 0.0
    for a, b, what in events:
        now += 1.0
        for n in (a, b):
            if ledger.caller(f"c{n}") is None:
                ledger.arrived(f"c{n}", Caller(f"{n:016x}", 0), now)
        getattr(ledger, {"report": "reported", "skip": "skipped", "talk": "talked"}[what])(f"c{a}", f"c{b}", now)
        assert not ledger.may_pair(f"c{a}", f"c{b}", now) if what == "report" or a == b else True
        assert len(ledger) <= 32


# -- the pool, with the ledger's rules ------------------------------------------------


def test_repeat_partners_are_paired_only_when_nobody_else_can_be() -> None:
    ledger = SafetyLedger(SafetySettings(repeat_window=300.0))
    for call, caller in (("a1", A), ("b1", B)):
        ledger.arrived(call, caller, 0.0)
    ledger.talked("a1", "b1", 10.0)
    for call, caller in (("a2", A), ("b2", B), ("c2", C), ("d2", D)):
        ledger.arrived(call, caller, 20.0)
    pool = PreferencePool(60.0, 30.0, ledger)
    pool.add("a2", Preference.EITHER, 20.0)
    pool.add("b2", Preference.EITHER, 21.0)
    pool.add("c2", Preference.EITHER, 22.0)
    [pairing] = pool.match(22.0)
    assert {pairing.first, pairing.second} == {"a2", "c2"}  # not the repeat, a2 and b2, though both waited longer
    pool.add("d2", Preference.EITHER, 23.0)
    [pairing] = pool.match(23.0)
    assert {pairing.first, pairing.second} == {"b2", "d2"}
    pool.add("a3", Preference.EITHER, 30.0)  # unknown to the ledger: no rule against it
    ledger.arrived("b3", B, 30.0)
    ledger.arrived("a4", A, 30.0)
    pool.remove("a3")
    pool.add("a4", Preference.EITHER, 30.0)
    pool.add("b3", Preference.EITHER, 30.0)
    [pairing] = pool.match(30.0)  # nobody else is waiting: the repeat is better than waiting
    assert {pairing.first, pairing.second} == {"a4", "b3"}


def test_after_a_skip_new_calls_stay_apart_for_the_repeat_window_even_alone() -> None:
    ledger = SafetyLedger(SafetySettings(repeat_window=300.0))
    ledger.arrived("a1", A, 0.0)
    ledger.arrived("b1", B, 0.0)
    ledger.skipped("a1", "b1", 10.0)
    ledger.left("a1")
    ledger.left("b1")
    ledger.arrived("a2", A, 20.0)
    ledger.arrived("b2", B, 20.0)
    pool = PreferencePool(60.0, 30.0, ledger)
    pool.add("a2", Preference.EITHER, 20.0)
    pool.add("b2", Preference.EITHER, 20.0)
    assert pool.match(20.0) == []
    assert pool.deadline(20.0) == 310.0
    assert len(pool.match(310.0)) == 1


# -- a line's journeys with the ledger -------------------------------------------------


def test_a_report_across_calls_pairs_the_reporter_with_someone_else_and_the_threshold_holds_apart() -> None:
    line = line_with(report_threshold=2, cooldown=300.0)
    line.answered("a1", 0.0, A)
    line.answered("b1", 1.0, B)
    talking(line, "a1", "b1", 2.0)
    step = line.digit("a1", "*", 3.0)
    assert of(step, "a1") == [PlayMusic(), PlayPrompts(("report_thanks",))]
    assert of(step, "b1") == [PlayMusic(), PlayPrompts(("partner_left", "nobody_else_here"))]  # nothing about why
    assert counted(step) == [Statistic.REPORT]
    line.hung_up("a1", 4.0)
    line.hung_up("b1", 4.0)
    line.answered("a2", 5.0, A)  # both call again with the same numbers
    line.answered("b2", 6.0, B)
    assert partner_of(line, "a2") is None and partner_of(line, "b2") is None
    line.answered("c1", 7.0, C)
    assert partner_of(line, "c1") == "a2"  # not b, though b was there first
    # a second caller reports b: held apart, told only that the other has left
    line.answered("d1", 8.0, D)
    assert partner_of(line, "d1") == "b2"
    talking(line, "b2", "d1", 9.0)
    step = line.digit("d1", "*", 10.0)
    assert of(step, "b2") == [PlayMusic(), PlayPrompts(("partner_left", "cooldown"))]
    assert counted(step) == [Statistic.REPORT, Statistic.COOLDOWN_STARTED]
    assert line.journey("b2").state is State.COOLDOWN  # type: ignore[union-attr]
    line.prompt_finished("d1", 11.0)
    line.prompt_finished("b2", 11.0)
    line.answered("e1", 12.0, Caller("ee" * 8, 0))
    assert partner_of(line, "e1") == "d1" and partner_of(line, "b2") is None  # b is never offered
    line.hung_up("b2", 13.0)
    step = line.answered("b3", 20.0, B)  # calling again does not end the cooldown
    assert of(step, "b3") == [PlayMusic(), PlayPrompts(("cooldown",))]
    assert line.journey("b3").deadline == 310.0  # type: ignore[union-attr]
    line.answered("f1", 30.0, Caller("ff" * 8, 0))
    assert partner_of(line, "f1") is None
    line.due(310.0)  # the cooldown is over: b waits like anyone, and is paired
    assert partner_of(line, "b3") == "f1"


def test_over_the_rate_a_kind_message_then_goodbye() -> None:
    line = line_with(max_calls_per_hour=1)
    line.answered("a1", 0.0, A)
    line.hung_up("a1", 1.0)
    step = line.answered("a2", 2.0, A)
    assert of(step, "a2") == [Silence(), PlayPrompts(("rate_limited", "goodbye"))]
    assert counted(step) == [Statistic.RATE_LIMITED]
    assert of(line.prompt_finished("a2", 9.0), "a2") == [HangUp(HangUpReason.OVER_RATE)]


def test_withheld_callers_are_welcome_or_refused_as_the_line_says() -> None:
    withheld = Caller("ee" * 8, 0, withheld=True)
    assert of(line_with().answered("w", 0.0, withheld), "w") == [PlayMusic()]
    step = line_with(accept_withheld=False).answered("w", 0.0, withheld)
    assert of(step, "w") == [Silence(), PlayPrompts(("withheld_refused", "goodbye"))]


def help_line() -> Line:
    return Line(SHORT, SafetyLedger(SafetySettings()), help_line=True)


def test_help_while_talking_connects_the_caller_and_the_partner_waits_again() -> None:
    line = help_line()
    line.answered("a", 0.0, A)
    line.answered("b", 0.0, B)
    talking(line, "a", "b", 1.0)
    step = line.digit("a", "0", 2.0)
    assert of(step, "a") == [Silence(), PlayPrompts(("help_message", "help_connecting"))]
    assert of(step, "b") == [PlayMusic(), PlayPrompts(("stepped_away", "looking_again", "nobody_else_here"))]
    assert counted(step) == [Statistic.HELP_REQUEST]
    assert of(line.prompt_finished("a", 12.0), "a") == [CallHelp(), PlayRingback()]
    line.prompt_finished("b", 12.0)
    line.answered("c", 13.0, C)
    assert partner_of(line, "b") == "c"  # the partner is paired with the next caller
    step = line.help_answered("a", 20.0)
    assert of(step, "a") == [BridgeExternal()] and counted(step) == [Statistic.HELP_CONNECTED]
    assert line.digit("a", "0", 21.0).actions == []  # keys are the help line's now
    assert of(line.help_ended("a", 300.0), "a") == [Silence(), PlayPrompts(("help_call_ended", "goodbye"))]


def test_help_busy_or_unanswered_is_said_kindly_and_the_caller_waits_again() -> None:
    line = help_line()
    line.answered("a", 0.0, A)
    line.digit("a", "0", 1.0)
    line.prompt_finished("a", 10.0)
    step = line.help_failed("a", 40.0)
    assert of(step, "a") == [PlayMusic(), PlayPrompts(("help_unreachable",))]
    assert counted(step) == [Statistic.HELP_FAILED]
    assert line.journey("a").state is State.WAITING  # type: ignore[union-attr]


def test_the_help_key_again_cancels_the_ringing_help_call() -> None:
    line = help_line()
    line.answered("a", 0.0, A)
    line.digit("a", "0", 1.0)
    line.prompt_finished("a", 10.0)
    assert of(line.digit("a", "0", 12.0), "a") == [EndHelpCall(), PlayMusic(), PlayPrompts(("help_cancelled",))]
    assert line.help_answered("a", 13.0).actions == []  # too late: the wiring ends it
    assert of(line.hung_up("a", 14.0), "a") == []


def test_hanging_up_while_the_help_call_rings_ends_it() -> None:
    line = help_line()
    line.answered("a", 0.0, A)
    line.digit("a", "0", 1.0)
    line.prompt_finished("a", 10.0)
    assert of(line.hung_up("a", 11.0), "a") == [EndHelpCall()]


def test_without_a_help_destination_the_help_key_gives_the_message_only() -> None:
    line = line_with()
    line.answered("a", 0.0, A)
    step = line.digit("a", "0", 1.0)
    assert of(step, "a") == [PlayPrompts(("help_message",))] and counted(step) == [Statistic.HELP_REQUEST]


def test_every_safety_prompt_exists() -> None:
    used = {
        "report_thanks", "partner_left", "cooldown", "rate_limited", "withheld_refused", "goodbye", "help_message",
        "help_connecting", "help_unreachable", "help_cancelled", "help_call_ended", "stepped_away", "looking_again",
    }  # fmt: skip
    assert used - PROMPT_IDS == set()


def test_the_safety_and_help_sections_are_checked() -> None:
    config = from_mapping(
        {
            "safety": {"report_threshold": 2, "cooldown": 60},
            "pairing": {"repeat_window": 600},
            "help": {"destination": "sip:help@127.0.0.1"},
        }
    )
    assert config.safety.settings(config.journey.pairing.repeat_window) == SafetySettings(
        report_threshold=2, cooldown=60.0, repeat_window=600.0
    )
    for bad in (
        {"pairing": {"repeat_window": -1}},
        {"lines": [{"name": "own", "numbers": ["*"], "pairing": {"repeat_window": 60}}]},  # every line's
        {"safety": {"report_threshold": 0}},
        {"safety": {"key_rotation": 1.0}},
        {"help": {"method": "carrier pigeon"}},
        {"help": {"destination": "tel:+18005550100"}},
        {"help": {"ring_timeout": 0.0}},
    ):
        with pytest.raises(ConfigError):
            from_mapping(bad)  # type: ignore[arg-type]


OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["answer", "digit", "prompt", "hang_up", "due", "help_answered", "help_failed", "help_ended"]),
        st.integers(0, 5),  # which call (and caller: call n is caller n % 3, so callers call again)
        st.sampled_from(["*", "#", "0", "1", "9"]),
    ),
    max_size=80,
)


REPORTED_THEN_BOTH_WAIT = [("answer", 0, "*"), ("answer", 1, "*"), ("digit", 0, "*"), ("prompt", 0, "*"), ("prompt", 1, "*")]


@settings(max_examples=150, deadline=None)
@given(OPERATIONS)
@example(REPORTED_THEN_BOTH_WAIT + [("due", 0, "*")] * 6)  # past the skip window: still apart
def test_whatever_happens_a_reported_pair_never_meets_and_partners_are_mutual(operations: list[tuple[str, int, str]]) -> None:
    line = Line(SHORT, SafetyLedger(SafetySettings(report_threshold=2, cooldown=50.0, repeat_window=40.0)), help_line=True)
    callers = [Caller(f"{n:016x}", 0) for n in range(3)]
    live: dict[str, Caller] = {}
    reported: set[frozenset[str]] = set()
    now = 0.0
    for what, n, key in operations:
        now += 7.0
        call = f"c{n}"
        if what == "answer":
            if line.journey(call) is None and call not in live:
                live[call] = callers[n % 3]
                line.answered(call, now, live[call])
        elif call not in live or line.journey(call) is None:
            line.due(now)
        elif what == "digit":
            partner = partner_of(line, call)
            line.digit(call, key, now)
            if key == "*" and partner is not None and line.journey(call).state is State.WAITING:  # type: ignore[union-attr]
                reported.add(frozenset((live[call].pseudonym, live[partner].pseudonym)))
        elif what == "prompt":
            line.prompt_finished(call, now)
        elif what == "hang_up":
            line.hung_up(call, now)
        elif what == "due":
            line.due(now)
        else:
            getattr(line, what)(call, now)
        for other in live:
            partner = partner_of(line, other)
            if partner is not None:
                assert partner_of(line, partner) == other
                assert frozenset((live[other].pseudonym, live[partner].pseudonym)) not in reported
                assert live[other] != live[partner]
