"""Session timers (RFC 4028) for one dialog, sans-I/O: negotiation and deadlines.

Each 2xx to an INVITE or UPDATE of the dialog (ours or the peer's) restarts the
session interval. The refresher sends a refresh half way through it; the other
side (and the refresher, if its refreshes fail) ends the session with BYE when
the interval runs out, minus min(32 s, interval / 3) (RFC 4028 section 10).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from voiceline.sip.message import Headers, SipParseError

MIN_SE_FLOOR = 90  # the smallest Min-SE RFC 4028 allows (section 4)


@dataclass(frozen=True)
class SessionTimerPolicy:
    session_expires: int = 1800  # the interval we ask for; 0 disables session timers unless the peer asks
    min_se: int = MIN_SE_FLOOR  # the shortest interval we accept


@dataclass(frozen=True)
class TooSmall:
    """Answer 422 with this Min-SE."""

    min_se: int


@dataclass(frozen=True)
class Agreement:
    """The session interval agreed in one request/response, and who refreshes."""

    interval: int
    we_refresh: bool
    response_headers: tuple[tuple[str, str], ...]


class Action(enum.Enum):
    REFRESH = "refresh"
    EXPIRE = "expire"


def supports_timer(headers: Headers) -> bool:
    return any(option.strip().lower() == "timer" for option in _options(headers, "Supported"))


def _options(headers: Headers, name: str) -> list[str]:
    return [item for value in headers.get_all(name) for item in value.split(",")]


def parse_session_expires(value: str) -> tuple[int, str | None]:
    """`delta-seconds [;refresher=uac|uas]` -> (seconds, refresher)."""
    delta, *params = (part.strip() for part in value.split(";"))
    if not delta.isascii() or not delta.isdigit() or len(delta) > 10:
        raise SipParseError("malformed Session-Expires")
    refresher = None
    for param in params:
        name, _, param_value = param.partition("=")
        if name.strip().lower() == "refresher" and param_value.strip().lower() in ("uac", "uas"):
            refresher = param_value.strip().lower()
    return int(delta), refresher


def _min_se(headers: Headers) -> int:
    value = (headers.get("Min-SE") or "").split(";")[0].strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 10 else 0


def answer_request(headers: Headers, policy: SessionTimerPolicy) -> Agreement | TooSmall | None:
    """As the UAS of an INVITE/UPDATE: what the session interval becomes (section 9).

    None when neither side wants session timers.
    """
    requested = headers.get("Session-Expires")
    peer_supports = supports_timer(headers)
    floor = max(policy.min_se, _min_se(headers))
    if requested is not None:
        interval, refresher = parse_session_expires(requested)
        if interval < policy.min_se:
            return TooSmall(max(policy.min_se, _min_se(headers)))
        if policy.session_expires:
            interval = max(min(interval, policy.session_expires), floor)  # we may shorten it, never below Min-SE
    elif policy.session_expires:
        interval, refresher = max(policy.session_expires, floor), None
    else:
        return None
    if refresher is None:
        # We choose: a peer that supports timers refreshes; one that does not cannot.
        refresher = "uac" if peer_supports else "uas"
    response: list[tuple[str, str]] = [("Session-Expires", f"{interval};refresher={refresher}")]
    if refresher == "uac":
        response.append(("Require", "timer"))
    return Agreement(interval, refresher == "uas", tuple(response))


def request_headers(interval: int, policy: SessionTimerPolicy) -> list[tuple[str, str]]:
    """What our refresh carries: we stay the refresher (we are its UAC)."""
    return [
        ("Supported", "timer"),
        ("Session-Expires", f"{interval};refresher=uac"),
        ("Min-SE", str(policy.min_se)),
    ]


def answer_response(headers: Headers, interval: int) -> Agreement:
    """As the UAC of our refresh: the interval and refresher its 2xx settled (section 7.2)."""
    value = headers.get("Session-Expires")
    if value is None:
        return Agreement(interval, True, ())  # the peer does not do timers: we keep refreshing  # the peer does not do timers: we keep refreshing
    agreed, refresher = parse_session_expires(value)
    return Agreement(agreed, refresher != "uas", ())


@dataclass
class SessionTimer:
    interval: int
    we_refresh: bool
    refreshed_at: float
    refresh_sent: bool = False
    retry_at: float = 0.0  # a refresh the peer refused for now (491) goes again no sooner
    ask: int = 0  # the interval our next refresh asks for (raised by a 422's Min-SE)

    def __post_init__(self) -> None:
        self.ask = self.ask or self.interval

    def restart(self, agreement: Agreement, now: float) -> None:
        self.interval = self.ask = agreement.interval
        self.we_refresh = agreement.we_refresh
        self.refreshed_at = now
        self.refresh_sent = False
        self.retry_at = 0.0

    def retry(self, not_before: float, min_se: int | None = None) -> None:
        """Our refresh was refused (491 glare; 422 with the peer's Min-SE): send another."""
        if min_se is not None:
            self.ask = max(self.ask, min_se)
        self.refresh_sent = False
        self.retry_at = not_before

    @property
    def refresh_at(self) -> float:
        return self.retry_at or self.refreshed_at + self.interval / 2

    @property
    def expires_at(self) -> float:
        return self.refreshed_at + self.interval - min(32, self.interval / 3)

    def next_deadline(self) -> float:
        if self.we_refresh and not self.refresh_sent:
            return min(self.refresh_at, self.expires_at)
        return self.expires_at

    def poll(self, now: float) -> Action | None:
        if now >= self.expires_at:
            return Action.EXPIRE
        if self.we_refresh and not self.refresh_sent and now >= self.refresh_at:
            self.refresh_sent = True
            return Action.REFRESH
        return None
