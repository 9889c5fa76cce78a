"""The caller's journey, action by action on a fake clock: which prompts, in which order, when."""

from __future__ import annotations

import random
import tomllib
from collections import Counter
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voiceline.audio.prompts import CONNECT_CUE as AUDIO_CONNECT_CUE
from voiceline.pairing.journey import (
    CONNECT_CUE,
    Action,
    Bridge,
    CallSummary,
    Count,
    HangUp,
    HangUpReason,
    Journey,
    JourneySettings,
    KeyMap,
    PlayMusic,
    PlayPrompts,
    Silence,
    State,
    Statistic,
    busiest_prompts,
    keys_prompts,
)
from voiceline.pairing.line import Line, Step

PROMPT_IDS = set(tomllib.loads((Path(__file__).parent.parent / "prompts" / "en.toml").read_text())["prompts"])
KEYS = keys_prompts(KeyMap())
WELCOME = ("welcome", "skip_welcome_hint", *KEYS)
CHOICE = ("key_talk", "number_1", "key_listen", "number_2", "preference_or_wait")
CONNECT = (CONNECT_CUE, "connected")
END_OF_TALK = ("talk_time_over", "end_of_talk_choice", "key_hash", "end_of_talk_or_hang_up")
SHORT = JourneySettings(reassure_every=10.0, max_wait=35.0, preference_wait=20.0, skip_window=30.0)
SPREAD = JourneySettings().end_choice_spread  # the default: up to 8 s


def of(step: Step, call: str) -> list[Action]:
    return [action for who, action in step.actions if who == call]


def counted(step: Step) -> list[Statistic]:
    return [count.statistic for count in step.statistics]


def waiting(line: Line, call: str, now: float) -> None:
    """Answered, welcome and choice heard: `call` is in the pool."""
    line.answered(call, now)
    line.prompt_finished(call, now)
    line.prompt_finished(call, now)


def talking(line: Line, a: str, b: str, now: float) -> None:
    waiting(line, a, now)
    waiting(line, b, now)
    line.prompt_finished(a, now)
    line.prompt_finished(b, now)
    journey = line.journey(a)
    assert journey is not None and journey.state is State.TALKING


def test_prompt_ids_exist_in_the_default_prompt_set() -> None:
    assert CONNECT_CUE == AUDIO_CONNECT_CUE
    used = {*WELCOME, *CHOICE, *END_OF_TALK, *busiest_prompts((0, 23)), *busiest_prompts((19, 22))}
    assert used - PROMPT_IDS == set()


def test_busiest_hours_are_spoken_as_a_bare_number_then_a_full_hour() -> None:
    assert busiest_prompts((19, 22)) == ("busiest_between", "number_7", "and", "hour_22")
    assert busiest_prompts((0, 2)) == ("busiest_between", "number_12", "and", "hour_2")
    assert busiest_prompts(None) == ()


def test_the_welcome_speaks_the_line_s_own_keys() -> None:
    keys = KeyMap(someone_else="*", talk=None, listen=None, report=None)
    assert keys_prompts(keys) == (
        "keys_intro", "key_someone_else", "key_star", "key_keys_again", "number_9", "key_help", "number_0",
        "hang_up_to_leave",
    )  # fmt: skip
    with pytest.raises(ValueError):
        KeyMap(talk="#")
    with pytest.raises(ValueError):
        KeyMap(help="A")  # not on every phone
    with pytest.raises(ValueError):
        Line(JourneySettings()).busiest_hours = (22, 24)
    with pytest.raises(ValueError):
        JourneySettings(max_talk=30.0, warn_before=30.0)


def test_lone_caller_welcome_music_reassurance_quiet_line_and_max_wait_goodbye() -> None:
    line = Line(JourneySettings(reassure_every=10.0, max_wait=45.0))
    line.busiest_hours = (19, 22)
    assert of(line.answered("a", 0.0), "a") == [Silence(), PlayPrompts(WELCOME)]
    assert line.deadline is None  # nothing is timed while the welcome plays
    assert of(line.prompt_finished("a", 25.0), "a") == [PlayMusic(), PlayPrompts(CHOICE)]
    assert of(line.prompt_finished("a", 31.0), "a") == []  # waiting to the music
    assert line.deadline == 41.0  # the wait began with the choice; reassured every 10 s after the choice was heard
    assert line.due(40.9).actions == []
    busiest = ("busiest_between", "number_7", "and", "hour_22")
    assert of(line.due(41.0), "a") == [PlayPrompts(("quiet_line", *busiest))]  # nobody else is on the line
    assert of(line.due(51.0), "a") == [PlayPrompts(("reassure_1",))]  # told once, then reassured
    assert of(line.due(61.0), "a") == [PlayPrompts(("reassure_2",))]  # alternating phrasings
    assert line.deadline == 70.0  # max_wait: 45 s after the choice began
    step = line.due(70.0)
    assert of(step, "a") == [Silence(), PlayPrompts(("max_wait_goodbye", *busiest, "goodbye"))]
    assert counted(step) == [Statistic.MAX_WAIT_GOODBYE]
    assert line.deadline is None
    assert line.digit("a", "#", 71.0).actions == []  # the goodbye is heard to its end
    assert of(line.prompt_finished("a", 76.0), "a") == [HangUp(HangUpReason.MAX_WAIT)]


def test_a_timer_whose_step_failed_is_still_there_to_be_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service retries a failed `due` a second later: the failed caller's timer must still be set."""
    line = Line(SHORT)
    waiting(line, "a", 0.0)
    deadline = line.deadline
    assert deadline == 10.0
    handle = Journey.handle

    def failing(journey: Journey, *args: object) -> NoReturn:
        raise RuntimeError("a bug in a step")

    monkeypatch.setattr(Journey, "handle", failing)
    with pytest.raises(RuntimeError):
        line.due(deadline)
    monkeypatch.setattr(Journey, "handle", handle)
    assert line.deadline == deadline
    assert of(line.due(deadline + 1.0), "a") == [PlayPrompts(("quiet_line",))]  # nobody else on the line


def test_any_key_skips_the_welcome_and_a_preference_key_also_chooses() -> None:
    line = Line(SHORT)
    line.answered("a", 0.0)
    assert of(line.digit("a", "5", 2.0), "a") == [PlayMusic(), PlayPrompts(CHOICE)]
    line.answered("b", 0.0)
    assert of(line.digit("b", "2", 3.0), "b") == [PlayMusic(), PlayPrompts(("preference_listen",))]
    # Without a choice to offer, the welcome stops (an empty prompt replaces it) and the music plays.
    line = Line(JourneySettings(offer_choice=False))
    line.answered("c", 0.0)
    assert of(line.digit("c", "5", 2.0), "c") == [PlayMusic(), PlayPrompts(())]
    assert line.journey("c").seeking  # type: ignore[union-attr]


def test_a_line_without_welcome_or_choice_starts_with_the_music() -> None:
    line = Line(JourneySettings(welcome=False, offer_choice=False))
    assert of(line.answered("a", 0.0), "a") == [PlayMusic()]
    assert line.journey("a") is not None and line.journey("a").seeking  # type: ignore[union-attr]


def test_a_pair_hears_the_connect_cue_before_being_bridged() -> None:
    line = Line(SHORT)
    waiting(line, "a", 0.0)
    line.answered("b", 5.0)
    line.prompt_finished("b", 5.0)
    step = line.prompt_finished("b", 8.0)  # b has heard the choice: the two are paired
    assert of(step, "a") == [Silence(), PlayPrompts(CONNECT)]
    assert of(step, "b") == [Silence(), PlayPrompts(CONNECT)]
    waits = [count.seconds for count in step.statistics if count.statistic is Statistic.WAIT_PAIRED]
    assert waits == [8.0, 3.0]  # a waited since the choice at 0, b since 5
    assert line.prompt_finished("a", 10.0).actions == []  # a has heard it, b not yet: nobody is bridged
    step = line.prompt_finished("b", 10.5)
    assert step.actions == [("a", Bridge("b")), ("b", Bridge("a"))]
    assert line.deadline is None  # talking has no timer while max_talk is off


def test_partner_leaving_sends_the_other_back_to_waiting_told_so() -> None:
    line = Line(SHORT)
    talking(line, "a", "b", 0.0)
    waiting(line, "c", 1.0)
    step = line.hung_up("b", 5.0)
    assert of(step, "a") == [PlayMusic(), PlayPrompts(("partner_left",))]  # c is on the line: not alone
    assert counted(step) == []  # a conversation ended, not a wait
    step = line.prompt_finished("a", 8.0)  # told, then paired with c
    assert of(step, "a") == [Silence(), PlayPrompts(CONNECT)]
    assert of(step, "c") == [Silence(), PlayPrompts(CONNECT)]


def test_partner_leaving_with_nobody_else_on_the_line() -> None:
    line = Line(SHORT)
    talking(line, "a", "b", 0.0)
    assert of(line.hung_up("a", 5.0), "b") == [PlayMusic(), PlayPrompts(("partner_left", "nobody_else_here"))]


def test_hash_with_a_third_caller_pairs_the_one_who_asked_with_them() -> None:
    line = Line(SHORT)
    talking(line, "a", "b", 0.0)
    waiting(line, "c", 1.0)
    step = line.digit("a", "#", 5.0)
    assert of(step, "a") == [PlayMusic(), PlayPrompts(("looking_for_someone_new",))]
    assert of(step, "b") == [PlayMusic(), PlayPrompts(("partner_left",))]
    assert counted(step) == [Statistic.SKIP]
    step = line.prompt_finished("a", 7.0)
    assert of(step, "a") == [Silence(), PlayPrompts(CONNECT)]
    assert of(step, "c") == [Silence(), PlayPrompts(CONNECT)]
    assert of(line.prompt_finished("b", 8.0), "b") == []  # b waits: a is taken, and b was just skipped


def test_hash_with_nobody_else_keeps_the_two_apart_for_the_skip_window_then_for_good_after_two_skips() -> None:
    line = Line(SHORT)
    talking(line, "a", "b", 0.0)
    step = line.digit("b", "#", 4.0)
    assert of(step, "b") == [PlayMusic(), PlayPrompts(("looking_for_someone_new", "nobody_else_here"))]
    assert of(step, "a") == [PlayMusic(), PlayPrompts(("partner_left", "nobody_else_here"))]
    line.prompt_finished("a", 6.0)
    assert line.prompt_finished("b", 7.0).actions == []  # both waiting, kept apart
    assert line.deadline == 14.0  # reassured while kept apart
    line.due(14.0)
    line.due(24.0)
    assert line.deadline == 34.0  # skip_window after the #
    step = line.due(34.0)
    assert of(step, "a") == [Silence(), PlayPrompts(CONNECT)]  # paired again: one skip only
    line.prompt_finished("a", 36.0)
    line.prompt_finished("b", 36.0)
    line.digit("b", "#", 40.0)  # b skips a a second time
    line.prompt_finished("a", 42.0)
    line.prompt_finished("b", 42.0)
    for now in (52.0, 62.0, 70.0, 74.0):  # reassured, never connected
        assert all(action != PlayPrompts(CONNECT) for _, action in line.due(now).actions)


def test_talk_time_warning_is_mixed_over_the_conversation_for_both_then_the_end_of_talk_choice() -> None:
    line = Line(JourneySettings(max_talk=60.0, warn_before=15.0, end_choice_wait=20.0))
    talking(line, "a", "b", 0.0)
    assert line.deadline == 45.0
    step = line.due(45.0)
    # Only a prompt: no Silence or PlayMusic, so both stay bridged under it.
    assert step.actions == [("a", PlayPrompts(("talk_time_warning",))), ("b", PlayPrompts(("talk_time_warning",)))]
    assert line.deadline == 60.0
    step = line.due(60.0)
    assert of(step, "a") == [Silence(), PlayPrompts(END_OF_TALK)]
    assert of(step, "b") == [Silence(), PlayPrompts(END_OF_TALK)]
    assert counted(step) == [Statistic.TALK_LIMIT_ENDING]  # one per conversation
    line.prompt_finished("a", 68.0)
    line.prompt_finished("b", 68.0)
    assert of(line.digit("a", "#", 70.0), "a") == [PlayMusic(), PlayPrompts(("looking_for_someone_new",))]
    line.prompt_finished("a", 72.0)
    assert line.digit("b", "#", 73.0).actions == [("b", PlayMusic()), ("b", PlayPrompts(("looking_for_someone_new",)))]
    assert line.prompt_finished("b", 75.0).actions == []  # the two just parted: not paired again at once


def test_the_end_of_talk_choice_left_unanswered_ends_in_a_goodbye() -> None:
    line = Line(JourneySettings(max_talk=60.0, warn_before=15.0, end_choice_wait=20.0))
    talking(line, "a", "b", 0.0)
    line.due(45.0)
    line.due(60.0)
    line.prompt_finished("b", 68.0)
    deadline = line.deadline  # b's choice is open for end_choice_wait after it was heard, and a spread
    assert deadline is not None and 88.0 <= deadline <= 88.0 + SPREAD
    assert line.due(deadline - 0.01).actions == []
    assert of(line.due(deadline), "b") == [Silence(), PlayPrompts(("goodbye",))]
    assert of(line.prompt_finished("b", deadline + 3.0), "b") == [HangUp(HangUpReason.TALK_TIME_OVER)]
    assert line.journey("b") is None  # left the line; a's hang-up later is news of nothing
    assert line.hung_up("b", deadline + 4.0) == Step()


@given(st.integers(min_value=0, max_value=2**32))
@settings(max_examples=50)
def test_partners_who_let_the_end_of_talk_choice_pass_are_not_hung_up_in_the_same_instant(seed: int) -> None:
    """Two BYEs with the same reason at the same moment would let a log reader link the two calls."""
    line = Line(JourneySettings(max_talk=60.0, warn_before=15.0, end_choice_wait=20.0), rng=random.Random(seed))
    talking(line, "a", "b", 0.0)
    line.due(45.0)
    line.due(60.0)
    line.prompt_finished("a", 68.0)  # both heard the choice end at the same moment
    line.prompt_finished("b", 68.0)
    goodbyes: dict[str, float] = {}
    while len(goodbyes) < 2:
        now = line.deadline
        assert now is not None and 88.0 <= now <= 88.0 + SPREAD
        for call, action in line.due(now).actions:
            if action == PlayPrompts(("goodbye",)):
                goodbyes[call] = now
    assert goodbyes["a"] != goodbyes["b"]


@pytest.mark.parametrize("spread", [SPREAD, 2.0])
def test_the_end_of_talk_spread_differs_between_callers_within_the_configured_spread(spread: float) -> None:
    spreads = set()
    settings = JourneySettings(max_talk=60.0, warn_before=15.0, end_choice_wait=20.0, end_choice_spread=spread)
    line = Line(settings, rng=random.Random(7))
    for pair in range(20):
        a, b = f"a{pair}", f"b{pair}"
        talking(line, a, b, 0.0)
        line.due(45.0)
        line.due(60.0)
        for call in (a, b):
            line.prompt_finished(call, 68.0)
            journey = line.journey(call)
            assert journey is not None and journey.deadline is not None
            spreads.add(round(journey.deadline - 88.0, 3))
        line.hung_up(a, 70.0)
        line.hung_up(b, 70.0)
    assert len(spreads) == 40 and min(spreads) >= 0.0 and max(spreads) <= spread
    assert max(spreads) - min(spreads) > spread / 2  # spread over the range, not a constant
    with pytest.raises(ValueError):
        JourneySettings(end_choice_spread=-1.0)


def test_talking_and_waiting_do_not_count_against_each_other() -> None:
    line = Line(JourneySettings(max_talk=60.0, warn_before=15.0, reassure_every=50.0))
    waiting(line, "a", 0.0)
    line.due(50.0)
    talking_since = 55.0
    waiting(line, "b", talking_since)
    line.prompt_finished("a", talking_since)
    line.prompt_finished("b", talking_since)
    assert line.deadline == talking_since + 45.0  # the warning counts from the bridge, not from the call


def test_preference_pairs_a_talker_with_a_listener_ahead_of_another_talker() -> None:
    line = Line(SHORT)
    line.answered("a", 0.0)
    line.prompt_finished("a", 0.0)
    line.digit("a", "1", 1.0)
    line.prompt_finished("a", 2.0)  # a talker, waiting since 2 s
    line.answered("b", 3.0)
    line.prompt_finished("b", 3.0)
    line.digit("b", "1", 4.0)
    assert line.prompt_finished("b", 5.0).actions == []  # two talkers: not paired yet
    line.answered("c", 6.0)
    line.prompt_finished("c", 6.0)
    assert of(line.digit("c", "2", 7.0), "c") == [PlayPrompts(("preference_listen",))]  # music since the choice
    step = line.prompt_finished("c", 8.0)
    assert of(step, "a") == [Silence(), PlayPrompts(CONNECT)]
    assert of(step, "c") == [Silence(), PlayPrompts(CONNECT)]
    assert of(step, "b") == []
    assert Statistic.PREFERENCE_MATCH in counted(step)


def test_a_preference_delays_nobody_beyond_the_preference_wait() -> None:
    line = Line(SHORT)
    for call, now in (("a", 0.0), ("b", 3.0)):
        line.answered(call, now)
        line.prompt_finished(call, now)
        line.digit(call, "2", now)  # two listeners
        line.prompt_finished(call, now + 1.0)
    assert line.deadline == 10.0  # a's first reassurance
    line.due(10.0)
    line.due(13.0)
    assert of(line.due(20.0), "a") == [PlayPrompts(("reassure_2",))]
    assert line.deadline == 21.0
    step = line.due(21.0)  # a has been in the pool for preference_wait: anyone will do
    assert of(step, "a") == [Silence(), PlayPrompts(CONNECT)]
    assert Statistic.PREFERENCE_MATCH not in counted(step)


def test_keys_while_waiting_and_talking() -> None:
    line = Line(SHORT)
    talking(line, "a", "b", 0.0)
    assert line.digit("a", "0", 1.0).actions == [("a", PlayPrompts(("help_message",)))]
    assert line.digit("a", "9", 2.0).actions == [("a", PlayPrompts(KEYS))]
    assert line.digit("a", "1", 4.0).actions == []  # a preference means nothing while talking
    waiting(line, "c", 5.0)
    assert of(line.digit("c", "1", 6.0), "c") == [PlayPrompts(("preference_talk",))]  # at any time while waiting


def test_a_call_leaving_the_line_gives_its_time_waiting_and_talking() -> None:
    line = Line(SHORT)
    waiting(line, "a", 0.0)  # the wait counts from the choice
    line.answered("b", 4.0)
    line.prompt_finished("b", 6.0)
    line.prompt_finished("b", 9.0)  # paired at 9
    line.prompt_finished("a", 11.0)
    line.prompt_finished("b", 11.0)  # talking from 11
    step = line.hung_up("b", 71.0)
    assert step.ended == [("b", CallSummary(waited=3.0, talked=60.0, partners=1))]
    line.prompt_finished("a", 74.0)  # told the partner left: waiting again
    assert line.hung_up("a", 80.0).ended == [("a", CallSummary(waited=9.0 + 9.0, talked=60.0, partners=1))]


def test_hanging_up_while_waiting_counts_an_abandoned_wait() -> None:
    line = Line(SHORT)
    waiting(line, "a", 0.0)
    step = line.hung_up("a", 12.5)
    assert step.actions == [] and step.statistics == [Count(Statistic.WAIT_ABANDONED, 12.5)]
    assert line.journey("a") is None and line.deadline is None
    assert line.prompt_finished("a", 13.0).actions == []  # late news of an ended call is ignored


def test_hold_while_talking_tells_the_partner_and_resume_bridges_again() -> None:
    line = Line(SHORT)
    talking(line, "a", "b", 0.0)
    step = line.held("a", 5.0)
    assert step.actions == [("b", PlayMusic()), ("b", PlayPrompts(("stepped_away",)))]  # a hears nothing while held
    step = line.resumed("a", 9.0)
    assert sorted(step.actions) == [("a", Bridge("b")), ("b", Bridge("a"))]
    line.held("a", 10.0)
    line.held("b", 11.0)  # both on hold
    step = line.resumed("b", 12.0)
    assert step.actions == [("b", PlayMusic()), ("b", PlayPrompts(("stepped_away",)))]  # a is still away


def test_a_caller_on_hold_is_paired_with_nobody_until_resumed() -> None:
    line = Line(SHORT)
    waiting(line, "a", 0.0)
    assert line.held("a", 1.0).actions == []
    line.answered("b", 2.0)
    line.prompt_finished("b", 2.0)
    assert line.prompt_finished("b", 3.0).actions == []
    assert of(line.due(10.0), "a") == []  # no reassurance to a line on hold
    step = line.resumed("a", 12.0)
    assert of(step, "a") == [Silence(), PlayPrompts(CONNECT)]
    assert of(step, "b") == [Silence(), PlayPrompts(CONNECT)]


def test_a_partner_gone_silent_while_talking_leaves_the_other_told_the_line_dropped() -> None:
    line = Line(SHORT)
    talking(line, "a", "b", 0.0)
    waiting(line, "c", 1.0)
    step = line.silent("b", 5.0)
    assert of(step, "a") == [PlayMusic(), PlayPrompts(("line_dropped",))]  # c is on the line: not alone
    assert of(step, "b") == [PlayMusic(), PlayPrompts(("line_dropped",))]  # should it still hear us
    step = line.prompt_finished("a", 8.0)  # told, then paired with c
    assert of(step, "a") == [Silence(), PlayPrompts(CONNECT)]
    assert of(step, "c") == [Silence(), PlayPrompts(CONNECT)]


def test_a_partner_gone_silent_while_connecting_with_nobody_else_on_the_line() -> None:
    line = Line(SHORT)
    waiting(line, "a", 0.0)
    waiting(line, "b", 1.0)  # paired: both hear the connect prompts
    step = line.silent("a", 2.0)
    assert of(step, "b") == [PlayMusic(), PlayPrompts(("line_dropped", "nobody_else_here"))]
    assert line.prompt_finished("b", 4.0).actions == []  # a, silent, is no partner for anyone


def test_a_silent_caller_is_paired_with_nobody_until_heard_again() -> None:
    line = Line(SHORT)
    talking(line, "a", "b", 0.0)
    line.silent("b", 5.0)
    line.prompt_finished("a", 7.0)
    assert line.prompt_finished("b", 7.0).actions == []  # both waiting, b silent: not paired again
    journey = line.journey("b")
    assert journey is not None and journey.state is State.WAITING and not journey.seeking
    step = line.heard_again("b", 9.0)  # its audio came back: a waiting caller like any other
    assert of(step, "a") == [Silence(), PlayPrompts(CONNECT)]
    assert of(step, "b") == [Silence(), PlayPrompts(CONNECT)]


def test_a_caller_silent_while_waiting_is_paired_with_nobody() -> None:
    line = Line(SHORT)
    waiting(line, "a", 0.0)
    assert line.silent("a", 1.0).actions == []  # nothing to tell it
    line.answered("b", 2.0)
    line.prompt_finished("b", 2.0)
    assert line.prompt_finished("b", 3.0).actions == []
    assert line.silent("a", 4.0).actions == []  # told twice: nothing changes
    assert of(line.heard_again("a", 5.0), "a") == [Silence(), PlayPrompts(CONNECT)]


def test_a_caller_on_hold_at_max_wait_is_hung_up_without_a_goodbye_it_could_not_hear() -> None:
    line = Line(SHORT)
    waiting(line, "a", 0.0)
    line.held("a", 1.0)
    step = line.due(35.0)
    assert step.actions == [("a", HangUp(HangUpReason.MAX_WAIT))]
    assert counted(step) == [Statistic.MAX_WAIT_GOODBYE]
    assert line.journey("a") is None


events = st.lists(
    st.tuples(
        st.sampled_from(["answered", "digit", "finished", "hung_up", "held", "resumed", "silent", "heard", "due"]),
        st.sampled_from(["a", "b", "c", "d"]),
        st.sampled_from(list("0129*#5")),
        st.floats(min_value=0.0, max_value=40.0),
    ),
    max_size=80,
)


@settings(max_examples=300)
@given(events)
def test_any_sequence_of_events_keeps_the_line_consistent(sequence: list[tuple[str, str, str, float]]) -> None:
    """Whatever happens: known prompts only, nobody bridged with itself, bridges mutual, clock respected."""
    line = Line(JourneySettings(reassure_every=7.0, max_wait=50.0, max_talk=30.0, warn_before=5.0,
                                preference_wait=9.0, skip_window=11.0, end_choice_wait=4.0))  # fmt: skip
    now = 0.0
    hearing: dict[str, str] = {}
    for kind, call, key, advance in sequence:
        now += advance
        # As the service's timer would: `due` at every deadline up to now, each one later than the last.
        while (deadline := line.deadline) is not None and deadline <= now:
            check(line.due(deadline), hearing, line)
            assert line.deadline is None or line.deadline > deadline
        if kind == "answered":
            step = line.answered(call, now) if line.journey(call) is None else Step()
        elif kind == "digit":
            step = line.digit(call, key, now)
        elif kind == "finished":
            step = line.prompt_finished(call, now)
        elif kind == "held":
            step = line.held(call, now)
        elif kind == "resumed":
            step = line.resumed(call, now)
        elif kind == "silent":
            step = line.silent(call, now)
        elif kind == "heard":
            step = line.heard_again(call, now)
        elif kind == "hung_up":
            step = line.hung_up(call, now)
            hearing.pop(call, None)
        else:
            step = line.due(now)
        check(step, hearing, line)


def check(step: Step, hearing: dict[str, str], line: Line) -> None:
    for call, summary in step.ended:
        assert line.journey(call) is None and summary.waited >= 0 and summary.talked >= 0
    hung_up = {who for who, action in step.actions if isinstance(action, HangUp)}
    assert hung_up <= {call for call, _ in step.ended}  # a call we hang up has left the line, with its figures
    for who, action in step.actions:
        assert line.journey(who) is not None or isinstance(action, HangUp)  # a call leaves the line as it is hung up
        if isinstance(action, PlayPrompts):
            assert set(action.prompts) - PROMPT_IDS <= {CONNECT_CUE}
        if isinstance(action, Bridge):
            assert action.partner != who
            hearing[who] = action.partner
        elif isinstance(action, PlayMusic | Silence | HangUp):
            hearing.pop(who, None)
    for who, partner in hearing.items():  # whoever hears a partner is paired with them
        journey = line.journey(partner)
        assert journey is not None and journey.partner == who
    # The line keeps its counts and timers as journeys change: they agree with the journeys themselves.
    journeys = [journey for call in "abcd" if (journey := line.journey(call)) is not None]
    assert line.counts() == Counter(journey.state for journey in journeys)
    timers = [deadline for journey in journeys if (deadline := journey.deadline) is not None]
    deadline = line.deadline
    assert (deadline is None) == (not timers and line._pool.deadline(line._now) is None)  # the pool's own is internal
    assert not timers or (deadline is not None and deadline <= min(timers))
    assert deadline is None or deadline in timers or deadline == line._pool.deadline(line._now)
