"""pjsua2 callers press keys (RFC 4733, pjsua2's default) and the pairing layer acts on them."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from test_codec_interop import logged
from test_end_to_end import A_HZ, B_HZ, C_HZ, CONNECTED_AFTER, assert_hears, assert_hold_audio, prompt_seconds
from test_journey_interop import assert_heard_once, heard_at

from voiceline.sim.analysis import CHUNK_SECONDS, SLIP_SECONDS
from voiceline.sim.runner import CallReport, CallSpec

pytestmark = pytest.mark.interop


LOOKING = prompt_seconds("looking_for_someone_new")
PARTNER_LEFT = prompt_seconds("partner_left")
PRESS_AT = CONNECTED_AFTER + 2.0  # seconds after A connects: A and B have talked for a while


def assert_heard_right_after(report: CallReport, prompt_id: str, before_id: str) -> None:
    """`prompt_id` is heard once, right after `before_id` ends: the two were sent back to back, so
    they are apart by the first one's length, give or take what a phone's jitter buffer may drop or
    repeat meanwhile (what `find_sound` allows per chunk) and a packet."""
    [before], [after] = heard_at(report, before_id), heard_at(report, prompt_id)
    length = prompt_seconds(before_id)
    slip = SLIP_SECONDS * math.ceil(length / CHUNK_SECONDS) + 0.02
    assert abs(after - (before + length)) <= slip, (before, after, length, slip)


def test_hash_pairs_the_caller_with_someone_else(
    voiceline_server: Callable[..., object], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.1}})
    target = server.uri("line")  # type: ignore[attr-defined]
    seconds = PRESS_AT + LOOKING + CONNECTED_AFTER + 4.0
    a, b, c = sim_calls(
        [
            CallSpec(target, tone_hz=A_HZ, seconds=seconds, dtmf_at=((PRESS_AT, "#"),)),
            CallSpec(target, tone_hz=B_HZ, seconds=seconds, start_after=0.2),
            CallSpec(target, tone_hz=C_HZ, seconds=seconds, start_after=0.5),
        ]
    )
    for report in (a, b, c):
        assert report.connected and report.media_started and report.error is None, report
    assert a.connected_at is not None
    pressed = a.connected_at + PRESS_AT  # batch time of the key press
    # A and B talk until A presses #; C waits meanwhile.
    assert_hears(b, A_HZ, B_HZ, CONNECTED_AFTER, pressed - b.connected_at - 0.1)
    # A is told it is looking for someone new, B that the other person left (C is here: nothing more).
    assert_heard_once(a, "looking_for_someone_new", pressed - a.connected_at)
    assert_heard_once(b, "partner_left", pressed - b.connected_at)
    assert heard_at(a, "nobody_else_here") == heard_at(b, "nobody_else_here") == []
    # Then A meets C, who was waiting, and B goes back to waiting (hold audio, no caller).
    met = pressed + LOOKING + CONNECTED_AFTER
    assert_hears(a, C_HZ, A_HZ, met - a.connected_at, met - a.connected_at + 3.0)
    assert_hears(c, A_HZ, C_HZ, met - c.connected_at, met - c.connected_at + 3.0)
    waits = pressed + PARTNER_LEFT + 0.3
    assert_hold_audio(b, waits - b.connected_at, waits - b.connected_at + 3.0, not_hz=(A_HZ, B_HZ, C_HZ))
    events = logged(server, "pairing.next_partner_requested")
    assert len(events) == 1 and "#" not in str(events[0])


def test_hash_with_nobody_else_on_the_line_tells_both_and_keeps_them_apart(
    voiceline_server: Callable[..., object], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.1}, "pairing": {"skip_window": 60.0}})
    target = server.uri("line")  # type: ignore[attr-defined]
    seconds = PRESS_AT + LOOKING + prompt_seconds("nobody_else_here") + 4.0
    a, b = sim_calls(
        [
            CallSpec(target, tone_hz=A_HZ, seconds=seconds, dtmf_at=((PRESS_AT, "#"),)),
            CallSpec(target, tone_hz=B_HZ, seconds=seconds, start_after=0.2),
        ]
    )
    for report in (a, b):
        assert report.connected and report.media_started and report.error is None, report
    assert a.connected_at is not None and b.connected_at is not None
    pressed = a.connected_at + PRESS_AT
    assert_heard_once(a, "looking_for_someone_new", pressed - a.connected_at)
    assert_heard_once(b, "partner_left", pressed - b.connected_at)
    # Each hears it is alone right now, right after what it was told of the parting ...
    assert_heard_right_after(a, "nobody_else_here", "looking_for_someone_new")
    assert_heard_right_after(b, "nobody_else_here", "partner_left")
    told_b = pressed - b.connected_at + PARTNER_LEFT
    # ... and then waits with music: the two are not paired again within the skip window.
    end = seconds - 0.5
    after = told_b + prompt_seconds("nobody_else_here") + 0.3
    assert_hold_audio(a, after - (b.connected_at - a.connected_at), end - 0.2, not_hz=(A_HZ, B_HZ))
    assert_hold_audio(b, after, end - 0.5, not_hz=(A_HZ, B_HZ))
