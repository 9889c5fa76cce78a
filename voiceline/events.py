"""The service's events: what happened, as plain data, and the bus that hands them out.

The app emits; MQTT, metrics and status subscribe. Privacy by construction:
an event names a call only by its random id, a line or trunk only by its
configured name, and carries whole seconds. Nothing links two calls as
partners: a call's own events say whether it was ever paired, never with
whom, and the moment two callers start talking is a per-line event without
call ids (`line.paired`), like a per-line gauge.

`SCHEMA_VERSION` is the version of the JSON form (README, "Events"); it
changes when a field changes meaning or disappears, not when one is added.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog

log = structlog.get_logger("voiceline.events")

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Event:
    name: ClassVar[str]

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        """The documented JSON form: schema, event name, wall time in whole seconds, then the fields."""
        stamp = int(time.time() if now is None else now)
        return {"schema": SCHEMA_VERSION, "event": self.name, "time": stamp, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class NodeOnline(Event):
    name = "node.online"
    node: str
    version: str


@dataclass(frozen=True)
class NodeOffline(Event):
    name = "node.offline"
    node: str


@dataclass(frozen=True)
class CallOffered(Event):
    """An INVITE was admitted by a trunk for a line (it may still be refused: full, closed, no ports)."""

    name = "call.offered"
    call: str
    line: str
    trunk: str


@dataclass(frozen=True)
class CallAnswered(Event):
    """The caller's ACK arrived: the call is up and joins its line's pool."""

    name = "call.answered"
    call: str
    line: str


@dataclass(frozen=True)
class CallRefused(Event):
    """The app refused an offered call (`line_full`, `line_closed`, `no_media_ports`)."""

    name = "call.refused"
    call: str
    line: str
    reason: str
    status: int


@dataclass(frozen=True)
class CallEnded(Event):
    """`duration` is from the answer to the end; `paired`: whether it talked to anyone at all."""

    name = "call.ended"
    call: str
    line: str
    reason: str
    duration: int
    paired: bool


@dataclass(frozen=True)
class LineWaiting(Event):
    """A caller on the line started waiting (new, or back from a partner); no call id."""

    name = "line.waiting"
    line: str
    waiting: int
    talking: int


@dataclass(frozen=True)
class LinePaired(Event):
    """Two callers on the line started talking; no call ids."""

    name = "line.paired"
    line: str
    waiting: int
    talking: int


@dataclass(frozen=True)
class LineGauge(Event):
    name = "line.gauge"
    line: str
    open: bool
    waiting: int
    talking: int
    in_welcome: int
    connecting: int  # paired, hearing the connect cue before the two are bridged
    ending: int  # told talk time is up, or hearing a goodbye
    pairs: int
    longest_wait: int


@dataclass(frozen=True)
class LineOpened(Event):
    name = "line.opened"
    line: str


@dataclass(frozen=True)
class LineClosed(Event):
    name = "line.closed"
    line: str


@dataclass(frozen=True)
class RegistrationChanged(Event):
    name = "trunk.registration"
    trunk: str
    state: str


@dataclass(frozen=True)
class OverloadSummary(Event):
    """What the overload guard refused since the previous summary (sent only when something was)."""

    name = "sip.overload"
    rate_limited: int
    rejected: int
    scanners: int
    over_capacity: int


@dataclass(frozen=True)
class DrainChanged(Event):
    name = "service.drain"
    draining: bool
    calls: int


Subscriber = Callable[[Event], None]


class EventBus:
    """Synchronous fan-out. Subscribers must not block (they queue or count); one that
    raises is logged by type and never breaks the emitter or the other subscribers."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def emit(self, event: Event) -> None:
        for subscriber in tuple(self._subscribers):
            try:
                subscriber(event)
            except Exception as exc:
                log.error("events.subscriber_failed", event_name=event.name, error=type(exc).__name__)
