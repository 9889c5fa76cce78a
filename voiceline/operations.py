"""Operations: the service's live state for people and machines.

One `Operations` per service. The app calls its hooks (one line each) as
calls come and go; it turns them into events on the bus, metrics and a
status snapshot, and it serves the control socket, the metrics endpoint and
the MQTT link. Commands (status, drain, undrain, reload, open/close a line)
arrive the same way from the control socket and from MQTT.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from voiceline import __version__
from voiceline.audio.media import LegStats
from voiceline.config import ConfigError
from voiceline.control import CONTROL_SOCKET, CommandError, ControlServer
from voiceline.events import (
    CallAnswered,
    CallEnded,
    CallOffered,
    CallRefused,
    DrainChanged,
    EventBus,
    LineClosed,
    LineGauge,
    LineOpened,
    LinePaired,
    LineWaiting,
    OverloadSummary,
    RegistrationChanged,
)
from voiceline.metrics import Metrics, MetricsEndpoint
from voiceline.mqtt import MqttLink
from voiceline.pairing.journey import CallSummary, State
from voiceline.sip.overload import OverloadCounters
from voiceline.sip.events import CallInfo

if TYPE_CHECKING:
    from voiceline.app import VoiceLine

log = structlog.get_logger("voiceline.operations")

LOOP_LAG_INTERVAL = 0.5  # seconds between event-loop lag samples
COMMANDS = ("status", "drain", "undrain", "reload", "open_line", "close_line")


class Operations:
    def __init__(self, app: VoiceLine) -> None:
        self.app = app
        self.config = app.config
        self.bus = EventBus()
        self.node = self.config.mqtt.node or socket.gethostname()
        self.closed_lines: set[str] = set()  # in memory: a restart opens every line
        self.metrics = Metrics(self.status)
        self.mqtt: MqttLink | None = None
        self._started = time.monotonic()
        self._answered_at: dict[str, float] = {}  # call id -> monotonic time of its ACK
        self._registration: dict[str, str] = {}  # trunk -> last reported state
        self._overload_seen = OverloadCounters()
        self._control: ControlServer | None = None
        self._endpoint: MetricsEndpoint | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Control socket, metrics endpoint and MQTT; one that cannot start is logged, the service goes on."""
        loop = asyncio.get_running_loop()
        self._started = time.monotonic()
        self._control = ControlServer(Path(self.config.storage.data_dir) / CONTROL_SOCKET, self.command)
        try:
            await self._control.start()
        except OSError as exc:
            self._control = None
            log.warning("control.unavailable", error=exc.strerror or type(exc).__name__)
        address = self.config.metrics.address
        if address is not None:
            self._endpoint = MetricsEndpoint(self.metrics, self.ready)
            try:
                host, port = await self._endpoint.start(*address)
            except OSError as exc:
                self._endpoint = None
                log.warning("metrics.unavailable", error=exc.strerror or type(exc).__name__)
            else:
                log.info("metrics.listening", address=f"{host}:{port}")
        if self.config.mqtt.enabled:
            self.mqtt = MqttLink(self.config.mqtt, self.node, __version__, self.command)
            self.bus.subscribe(self.mqtt.publish)
            self.mqtt.start()
            self._tasks.append(loop.create_task(self._emit_gauges()))
        self._tasks.append(loop.create_task(self._measure_loop_lag()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.mqtt is not None:
            await self.mqtt.close()
        if self._endpoint is not None:
            await self._endpoint.close()
        if self._control is not None:
            await self._control.close()

    def ready(self) -> bool:
        return not self.app.agent.draining

    # -- hooks the app calls ---------------------------------------------------------

    def line_open(self, line: str) -> bool:
        """Neither closed by a command nor disabled in provisioning."""
        provisioned = self.app.policy.directory.lines.get(line)
        return line not in self.closed_lines and (provisioned is None or provisioned.enabled)

    def call_offered(self, call: CallInfo) -> None:
        self.metrics.calls_offered.labels(call.line).inc()
        self.bus.emit(CallOffered(call.id, call.line, call.trunk))

    def call_refused(self, call: CallInfo, reason: str, status: int) -> None:
        self.metrics.refusals.labels(reason).inc()
        self.bus.emit(CallRefused(call.id, call.line, reason, status))

    def call_answered(self, call: CallInfo) -> None:
        self._answered_at[call.id] = time.monotonic()
        self.metrics.calls_answered.labels(call.line).inc()
        self.bus.emit(CallAnswered(call.id, call.line))

    def call_ended(self, call: CallInfo, reason: str, summary: CallSummary | None, stats: LegStats | None) -> None:
        answered = self._answered_at.pop(call.id, None)
        if answered is None:
            return  # never answered: its refusal or cancel is counted elsewhere
        reason = reason or "ended"
        line = call.line
        self.metrics.calls_ended.labels(line, reason).inc()
        if summary is not None:
            self.metrics.wait.labels(line).observe(summary.waited)
            self.metrics.talk.labels(line).observe(summary.talked)
        if stats is not None:
            self.metrics.rtp_received.labels(line).inc(stats.packets_in)
            self.metrics.rtp_expected.labels(line).inc(stats.packets_expected)
            self.metrics.rtp_lost.labels(line).inc(max(0, stats.packets_lost))
            self.metrics.jitter.labels(line).observe(stats.jitter_ms / 1000)
        paired = summary is not None and summary.partners > 0
        self.bus.emit(CallEnded(call.id, line, reason, round(time.monotonic() - answered), paired))

    def pairing_changed(self, line: str, paired: bool) -> None:
        counts = self._line_counts(line)
        if paired:
            self.metrics.pairs.labels(line).inc()
            self.bus.emit(LinePaired(line, counts["waiting"], counts["talking"]))
        else:
            self.bus.emit(LineWaiting(line, counts["waiting"], counts["talking"]))

    def _line_counts(self, line: str) -> dict[str, int]:
        """Callers on `line` by where they are in their journey: the welcome, waiting (the talk/listen
        choice included), connecting (hearing the connect cue), talking, and ending (talk time up, or goodbye)."""
        served = self.app.calls.lines.get(line)
        states = served.journeys.counts() if served is not None else Counter[State]()
        return {
            "in_welcome": states[State.WELCOME],
            "waiting": states[State.CHOICE] + states[State.WAITING],
            "connecting": states[State.CONNECTING],
            "talking": states[State.TALKING],
            "ending": states[State.END_CHOICE] + states[State.GOODBYE],
        }

    def registration_changed(self, trunk: str, state: str) -> None:
        if self._registration.get(trunk) != state:
            self._registration[trunk] = state
            self.bus.emit(RegistrationChanged(trunk, state))

    def refused(self, counts: Mapping[str, int]) -> None:
        """Requests the trunk policy refused (unknown source, wrong transport, ...), as flushed to storage."""
        for reason, count in counts.items():
            self.metrics.refusals.labels(reason).inc(count)

    def drain_changed(self) -> None:
        self.bus.emit(DrainChanged(not self.ready(), len(self.app.agent.calls)))

    # -- status and commands ---------------------------------------------------------

    def status(self) -> dict[str, Any]:
        app = self.app
        agent = app.agent
        calls = agent.calls
        directory = app.policy.directory
        served_lines = app.calls.lines
        line_names = sorted(set(directory.lines) | set(served_lines))
        lines = {}
        now = app.calls.now()  # the lines' clock (metrics ask from a thread)
        for name in line_names:
            counts = self._line_counts(name)
            served = served_lines.get(name)
            lines[name] = {
                "open": self.line_open(name),
                "waiting": counts["waiting"],
                "talking": counts["talking"],
                "in_welcome": counts["in_welcome"],
                "connecting": counts["connecting"],
                "ending": counts["ending"],
                "pairs": counts["talking"] // 2,
                "longest_wait": round(served.journeys.longest_wait(now)) if served is not None else 0,
            }
        trunks = {}
        for name, trunk in sorted(directory.trunks.items()):
            registration = None
            if trunk.registration is not None and trunk.enabled:
                registration = self._registration.get(name, "registering")
            trunks[name] = {
                "enabled": trunk.enabled,
                "calls": sum(1 for call in calls if call.trunk == name),
                "registration": registration,
            }
        status: dict[str, Any] = {
            "version": __version__,
            "node": self.node,
            "uptime": round(time.monotonic() - self._started),
            "draining": not self.ready(),
            "calls": len(calls),
            "lines": lines,
            "trunks": trunks,
            "sip": asdict(agent.counters),
            "overload": asdict(agent.overload.counters),
        }
        if self.mqtt is not None:
            status["mqtt"] = {"connected": self.mqtt.connected, "dropped": self.mqtt.dropped}
        return status

    async def command(self, name: str, args: Mapping[str, Any]) -> dict[str, Any]:
        if name == "status":
            # The loop's tasks: a count that must come back down after load (`make soak` watches it).
            return {**self.status(), "tasks": len(asyncio.all_tasks())}
        if name == "drain":
            self.app.request_drain()
            return {"draining": True}
        if name == "undrain":
            self.app.undrain()
            return {"draining": not self.ready()}
        if name == "reload":
            try:
                await self.app.reload()
            except ConfigError as exc:
                raise CommandError(f"config file: {exc}") from None
            return {"lines": sorted(self.status()["lines"]), "trunks": sorted(self.status()["trunks"])}
        if name in ("open_line", "close_line"):
            line = args.get("line")
            if not isinstance(line, str) or line not in self.status()["lines"]:
                raise CommandError("line: expected the name of a line")
            if name == "close_line" and line not in self.closed_lines:
                self.closed_lines.add(line)
                log.info("line.closed", line=line)
                self.bus.emit(LineClosed(line))
            elif name == "open_line" and line in self.closed_lines:
                self.closed_lines.discard(line)
                log.info("line.opened", line=line)
                self.bus.emit(LineOpened(line))
            return {"line": line, "open": self.line_open(line)}
        raise CommandError(f"unknown command; known: {', '.join(COMMANDS)}")

    # -- background ------------------------------------------------------------------

    async def _emit_gauges(self) -> None:
        while True:
            await asyncio.sleep(self.config.mqtt.gauge_interval)
            status = self.status()
            for name, line in status["lines"].items():
                self.bus.emit(LineGauge(name, **line))
            agent = self.app.agent
            if agent.overload.counters != self._overload_seen:
                now, seen = asdict(agent.overload.counters), asdict(self._overload_seen)
                self._overload_seen = OverloadCounters(**now)
                self.bus.emit(OverloadSummary(**{key: now[key] - seen[key] for key in now}))

    async def _measure_loop_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LOOP_LAG_INTERVAL)
            self.metrics.loop_lag.observe(max(0.0, loop.time() - before - LOOP_LAG_INTERVAL))
