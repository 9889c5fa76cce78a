"""pjsua2 callers press keys (RFC 4733, pjsua2's default) and the pairing layer acts on them."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_codec_interop import logged
from test_end_to_end import A_HZ, B_HZ, C_HZ, assert_hears, assert_hold_audio

from voiceline.sim.runner import DTMF_DELAY_SECONDS, CallReport, CallSpec

pytestmark = pytest.mark.interop


def test_hash_pairs_the_caller_with_someone_else(
    voiceline_server: Callable[..., object], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.1}})
    target = server.uri("line")  # type: ignore[attr-defined]
    a, b, c = sim_calls(
        [
            CallSpec(target, tone_hz=A_HZ, seconds=6.0, dtmf="#"),
            CallSpec(target, tone_hz=B_HZ, seconds=6.0, start_after=0.2),
            CallSpec(target, tone_hz=C_HZ, seconds=6.0, start_after=0.5),
        ]
    )
    for report in (a, b, c):
        assert report.connected and report.media_started and report.error is None, report
    pressed = a.connected_at + DTMF_DELAY_SECONDS  # batch time of the key press
    # A and B talk until A presses #; C waits meanwhile.
    assert_hears(b, A_HZ, B_HZ, 0.3, pressed - b.connected_at - 0.1)
    # Then A meets C, who was waiting, and B goes back to waiting (hold audio, no caller).
    assert_hears(a, C_HZ, A_HZ, pressed - a.connected_at + 0.5, pressed - a.connected_at + 3.5)
    assert_hears(c, A_HZ, C_HZ, pressed - c.connected_at + 0.5, pressed - c.connected_at + 3.5)
    assert_hold_audio(b, pressed - b.connected_at + 0.5, pressed - b.connected_at + 3.5, not_hz=(A_HZ, B_HZ, C_HZ))
    events = logged(server, "pairing.next_partner_requested")
    assert len(events) == 1 and "#" not in str(events[0])
