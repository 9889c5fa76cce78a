"""Session timers (RFC 4028): negotiation and the refresh/expiry clock, on a fake clock."""

from __future__ import annotations

import pytest

from voiceline.sip.message import Headers, SipParseError
from voiceline.sip.session_timer import (
    Action,
    Agreement,
    SessionTimer,
    SessionTimerPolicy,
    TooSmall,
    answer_request,
    answer_response,
    parse_session_expires,
    request_headers,
)

POLICY = SessionTimerPolicy(session_expires=1800, min_se=90)


def headers(**fields: str) -> Headers:
    return Headers((name.replace("_", "-"), value) for name, value in fields.items())


def test_too_small_interval_gets_422_with_our_min_se() -> None:
    assert answer_request(headers(Session_Expires="60", Supported="timer"), POLICY) == TooSmall(90)
    # The peer's own larger Min-SE is honoured in the 422 too.
    assert answer_request(headers(Session_Expires="60", Min_SE="120"), POLICY) == TooSmall(120)


def test_requested_interval_and_refresher_are_honoured() -> None:
    agreement = answer_request(headers(Session_Expires="600;refresher=uac", Supported="timer"), POLICY)
    assert isinstance(agreement, Agreement)
    assert agreement.interval == 600 and not agreement.we_refresh
    assert dict(agreement.response_headers) == {"Session-Expires": "600;refresher=uac", "Require": "timer"}
    agreement = answer_request(headers(Session_Expires="600;refresher=uas", Supported="timer"), POLICY)
    assert isinstance(agreement, Agreement) and agreement.we_refresh
    assert "Require" not in dict(agreement.response_headers)


def test_longer_interval_than_ours_is_shortened_but_never_below_min_se() -> None:
    agreement = answer_request(headers(Session_Expires="7200", Supported="timer"), POLICY)
    assert isinstance(agreement, Agreement) and agreement.interval == 1800
    strict = SessionTimerPolicy(session_expires=100, min_se=90)
    agreement = answer_request(headers(Session_Expires="7200", Min_SE="300"), strict)
    assert isinstance(agreement, Agreement) and agreement.interval == 300


def test_we_choose_the_refresher_when_the_request_leaves_it_open() -> None:
    supports = answer_request(headers(Session_Expires="900", Supported="100rel, timer"), POLICY)
    assert isinstance(supports, Agreement) and not supports.we_refresh  # the caller can refresh
    plain = answer_request(headers(), POLICY)  # no timer support at all: we insert one and refresh
    assert isinstance(plain, Agreement) and plain.we_refresh and plain.interval == 1800
    assert dict(plain.response_headers) == {"Session-Expires": "1800;refresher=uas"}
    assert answer_request(headers(), SessionTimerPolicy(session_expires=0)) is None


def test_malformed_session_expires_is_a_parse_error() -> None:
    with pytest.raises(SipParseError):
        parse_session_expires("soon")
    assert parse_session_expires("90 ; refresher=UAS") == (90, "uas")


def test_our_refresh_and_the_peers_answer() -> None:
    assert dict(request_headers(600, POLICY)) == {
        "Supported": "timer",
        "Session-Expires": "600;refresher=uac",
        "Min-SE": "90",
    }
    assert answer_response(headers(Session_Expires="900;refresher=uac"), 600) == Agreement(900, True, ())
    assert answer_response(headers(Session_Expires="900;refresher=uas"), 600) == Agreement(900, False, ())
    assert answer_response(headers(), 600) == Agreement(600, True, ())


def run(timer: SessionTimer, until: float) -> list[tuple[float, Action]]:
    """Step the timer through its deadlines like the user agent does."""
    events: list[tuple[float, Action]] = []
    while (deadline := timer.next_deadline()) <= until:
        action = timer.poll(deadline)
        assert action is not None
        events.append((deadline, action))
        if action is Action.EXPIRE:
            break
    return events


def test_refresher_refreshes_at_half_interval_and_expires_if_never_answered() -> None:
    timer = SessionTimer(interval=90, we_refresh=True, refreshed_at=0.0)
    # Refresh at 45 s; unanswered, the session ends at 90 - min(32, 30) = 60 s.
    assert run(timer, 100) == [(45.0, Action.REFRESH), (60.0, Action.EXPIRE)]


def test_answered_refresh_restarts_the_interval() -> None:
    timer = SessionTimer(interval=1800, we_refresh=True, refreshed_at=0.0)
    assert run(timer, 900) == [(900.0, Action.REFRESH)]
    timer.restart(Agreement(1800, True, ()), 901.0)
    assert timer.poll(1700.0) is None
    assert run(timer, 1801.0) == [(1801.0, Action.REFRESH)]


def test_non_refresher_expires_32_seconds_early_unless_refreshed() -> None:
    timer = SessionTimer(interval=1800, we_refresh=False, refreshed_at=0.0)
    assert timer.poll(1767.9) is None
    timer.restart(Agreement(1800, False, ()), 1000.0)  # the peer refreshed
    assert timer.poll(2767.0) is None
    assert run(timer, 4000) == [(2768.0, Action.EXPIRE)]


def test_refused_refresh_is_retried_no_sooner_than_asked() -> None:
    timer = SessionTimer(interval=600, we_refresh=True, refreshed_at=0.0)
    assert timer.poll(300.0) is Action.REFRESH
    timer.retry(301.5)  # 491: try again after a pause
    assert timer.poll(301.0) is None
    assert timer.poll(301.5) is Action.REFRESH
    timer.retry(302.0, min_se=900)  # 422 with Min-SE 900: the next refresh asks for more, at once
    assert timer.poll(302.0) is Action.REFRESH and timer.ask == 900
    assert timer.expires_at == 600 - 32  # the session agreed so far still ends on time
