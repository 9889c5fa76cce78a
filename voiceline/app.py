"""Wiring: configuration -> storage, media engine, SIP user agent, trunks and each line's journeys and prompts."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import resource
import signal
import time
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import structlog

from voiceline.audio.codecs import available as codec_available
from voiceline.audio.hold import hold_music, load_wav
from voiceline.audio.latch import Learning
from voiceline.audio.media import MediaEngine, MediaError
from voiceline.audio.prompts import PromptError, PromptSet
from voiceline.calls import Calls, LineSetup
from voiceline import config as config_module
from voiceline.codec_table import Codec
from voiceline.codec_table import lookup as lookup_codec
from voiceline.config import Config, ConfigError, SipConfig
from voiceline.operations import Operations
from voiceline.journey_config import SECTIONS as JOURNEY_SECTIONS
from voiceline.journey_config import JourneyConfigError
from voiceline.routing import Line, TrunkDirectory, TrunkPolicy
from voiceline.sdnotify import SystemdNotifier
from voiceline.sip.overload import OverloadLimits, RateLimit
from voiceline.sip.session_timer import SessionTimerPolicy
from voiceline.sip.transaction import Timers
from voiceline.sip.transport import StreamLimits, StreamTransport, TlsListener, open_transports
from voiceline.sip.core import CoreSettings
from voiceline.sip.useragent import UserAgent
from voiceline.storage import Storage, write_private
from voiceline.tasks import supervised
from voiceline.trunk_supervisor import TrunkSupervisor

log = structlog.get_logger("voiceline.app")

PID_FILE = "voiceline.pid"  # in the data dir: how `voiceline drain` finds the server
BUSIEST_HOURS_INTERVAL = 3600.0  # seconds between refreshing each line's busiest hours


class VoiceLine:
    """The running service."""

    def __init__(self, config: Config, config_file: str | None = None) -> None:
        self.config = config
        self.config_file = config_file  # re-read for trunks and lines on reload (SIGHUP)
        self.ops = Operations(self)
        self.drain_requested = asyncio.Event()
        self.line_setups: dict[str, LineSetup] = {}  # line name -> its journey settings and prompts
        self._prompt_sets: dict[tuple[str, str], PromptSet] = {}  # (language, directory) -> loaded set
        self.storage: Storage | None = None
        self.media: MediaEngine | None = None
        self.agent: UserAgent | None = None
        self.trunks: TrunkSupervisor | None = None
        self.calls: Calls | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []

    def line_setup(self, name: str) -> LineSetup:
        """A line's journey and prompts, as last loaded; a line unknown to provisioning gets the defaults."""
        setup = self.line_setups.get(name)
        if setup is None:
            journey = self.config.journey
            setup = LineSetup(journey.settings(), self._prompt_sets[(journey.prompts.language, journey.prompts.directory)])
        return setup

    async def _lines_changed(self, lines: Mapping[str, Line], first: bool) -> None:
        """Ready each line's journey settings and prompts (loaded off the loop). At start a bad prompt
        file or setting stops the service; later the line keeps what it had and the error is logged."""
        wanted = [(self.config.journey.prompts.language, self.config.journey.prompts.directory)]
        journeys = {}
        for name, line in lines.items():
            journeys[name] = journey = self.config.line_journey(line)
            wanted.append((journey.prompts.language, journey.prompts.directory))
        loaded: dict[tuple[str, str], PromptSet] = {}
        for language, directory in dict.fromkeys(wanted):
            try:
                loaded[(language, directory)] = await asyncio.to_thread(PromptSet.load, language, directory or None)
            except PromptError as exc:
                if first:
                    raise ConfigError(str(exc)) from None
                log.error("prompts.load_failed", detail=str(exc))
        self._prompt_sets = {**self._prompt_sets, **loaded}
        for name, journey in journeys.items():
            prompts = self._prompt_sets.get((journey.prompts.language, journey.prompts.directory))
            try:
                settings = journey.settings()
            except JourneyConfigError as exc:
                if first:
                    raise ConfigError(f"line {name}: {exc}") from None
                log.error("line.journey_invalid", line=name, detail=str(exc))
                continue
            if prompts is None:
                continue  # refused above: the line keeps the prompts it had
            self.line_setups[name] = LineSetup(settings, prompts)
            if self.calls is not None:
                self.calls.configure(name, self.line_setups[name])

    async def _refresh_busiest_hours(self) -> None:
        """Each line's busiest hours from the hourly statistics: at start, then hourly."""
        assert self.storage is not None and self.calls is not None and self.trunks is not None
        while True:
            for name in self.trunks.policy.directory.lines:
                self.calls.set_busiest_hours(name, await self.storage.busiest_hours(name, time.time()))
            await asyncio.sleep(BUSIEST_HOURS_INTERVAL)

    async def start(self) -> None:
        sip = self.config.sip
        self.storage = await Storage.open(Path(self.config.storage.data_dir), self.config.storage.key_file)
        hold_audio = load_wav(self.config.media.hold_audio) if self.config.media.hold_audio else hold_music()
        bind_host = sip.listen_address[0]
        self.media = MediaEngine(
            bind_host,
            self.config.media.port_range,
            hold_audio,
            inband_dtmf=self.config.media.inband_dtmf,
            learning=Learning(self.config.media.learning_packets, self.config.media.learning_seconds),
        )
        settings = CoreSettings(
            advertised_host=sip.advertised_host,
            answer_delay=sip.answer_delay,
            timers=Timers(sip.t1, sip.t2, sip.t4),
            max_message_size=sip.max_message_size,
            codecs=self._usable_codecs(),
            session_timers=SessionTimerPolicy(sip.session_expires, sip.min_session_expires),
            max_call_duration=sip.max_call_duration,
            overload=overload_limits(sip),
        )
        loop = asyncio.get_running_loop()
        policy = TrunkPolicy(
            TrunkDirectory((), ()), loop.time, self._calls_on_trunk, drop_unknown=sip.unknown_source == "drop"
        )
        self.calls = Calls(
            self.media, self.line_setup, self._line_max_calls, self.storage, self._write, self._hangup, live_view=self.ops
        )
        self.agent = UserAgent(settings, self.calls, policy)
        # Trunks and lines are in force before the first request.
        self.trunks = await TrunkSupervisor.load(
            self.config,
            self.storage,
            policy,
            self.agent,
            self._write,
            on_registration=self.ops.registration_changed,
            on_refusals=self.ops.refused,
            on_lines=self._lines_changed,
        )
        directory = policy.directory
        limits = StreamLimits(sip.max_message_size, sip.connection_idle_timeout, sip.max_connections)
        listening = await open_transports(
            *sip.listen_address, sip.transports, self.agent.message_received, limits, tls_listener(sip)
        )
        for transport in listening:
            self.agent.attach(transport)
            bound_host, bound_port = transport.local_address
            log.info(
                "sip.listening",
                address=f"{bound_host}:{bound_port}",
                transport=transport.name.lower(),
                advertised=sip.advertised_host,
                trunks=sorted(directory.trunks),
                lines=sorted(directory.lines),
            )
        host = sip.listen_address[0]
        if not sip.public_address and host == "0.0.0.0":
            log.warning(
                "sip.public_address_unset",
                advertised=sip.advertised_host,
                hint="only callers on this machine will have audio; set sip.public_address",
            )
        await self.trunks.start()
        self._background.append(loop.create_task(supervised("refresh_busiest_hours", self._refresh_busiest_hours)))
        timeout = self.config.media.inactivity_timeout
        if timeout:
            reap = functools.partial(self.calls.reap_silent_calls, timeout)
            self._background.append(loop.create_task(supervised("reap_silent_calls", reap)))
        await self.ops.start()

    async def drain(self, stop: asyncio.Event) -> None:
        """Refuse new calls and wait until the last call ended, `stop` is set or sip.drain_timeout passed."""
        assert self.agent is not None
        self.agent.drain()
        self.ops.drain_changed()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.sip.drain_timeout
        while self.agent.calls and self.agent.draining and not stop.is_set() and loop.time() < deadline:
            await asyncio.sleep(0.2)
        if self.agent.draining:
            log.info("service.drained", calls=len(self.agent.calls))

    def request_drain(self) -> None:
        self.drain_requested.set()

    def undrain(self) -> None:
        """Take new calls again; a drain in progress ends without stopping the service."""
        self.drain_requested.clear()
        if self.agent is not None and self.agent.draining:
            self.agent.undrain()
            self.ops.drain_changed()

    def reload_soon(self) -> None:
        """SIGHUP: reload in the background; a broken config file leaves trunks and lines as they were."""

        async def reload_logged() -> None:
            try:
                await self.reload()
            except ConfigError as exc:
                log.error("provisioning.reload_failed", error="ConfigError", detail=str(exc))
            except Exception as exc:
                log.error("provisioning.reload_failed", error=type(exc).__name__)

        self._write(reload_logged())

    async def reload(self) -> None:
        """Trunks, lines and journeys again: the config file's (when there is one) and the database's;
        every line's prompts are read again (a bad file keeps that line's old prompts)."""
        if self.config_file is not None:
            fresh = await asyncio.to_thread(config_module.load, self.config_file)  # file I/O off the loop
            journey = fresh.journey
            self.config = replace(
                self.config,
                trunks=fresh.trunks,
                lines=fresh.lines,
                **{section: getattr(journey, section) for section in JOURNEY_SECTIONS},
            )
        assert self.trunks is not None
        await self.trunks.reload(self.config)
        # Prompt files may have changed even when the lines did not: read them again.
        await self._lines_changed(self.trunks.policy.directory.lines, first=False)
        log.info("provisioning.reloaded", trunks=len(self.trunks.policy.directory.trunks))

    def _usable_codecs(self) -> tuple[Codec, ...]:
        """The configured codecs whose libraries load here (Opus needs libopus)."""
        configured = tuple(lookup_codec(name) for name in self.config.media.codecs)
        usable = tuple(codec for codec in configured if codec_available(codec))
        for codec in configured:
            if codec not in usable:
                log.warning("media.codec_unavailable", codec=codec.name)
        if not usable:
            raise MediaError("none of the configured codecs can be used")
        return usable

    async def stop(self) -> None:
        """BYE every call, unregister, close: each step contained, so one failure never skips the rest."""
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        stopping = [self.trunks.stop()] if self.trunks is not None else []
        if self.agent is not None:
            with _contained("totals"):
                log.info("sip.totals", **asdict(self.agent.counters), **asdict(self.agent.overload.counters))
                for transport in self.agent.transports.values():
                    if isinstance(transport, StreamTransport):
                        log.info("sip.connections", transport=transport.name.lower(), **asdict(transport.counters))
            # The BYEs go out first (shutdown sends them before it first waits); unregistering runs alongside.
            stopping.insert(0, self.agent.shutdown())
        for result in await asyncio.gather(*stopping, return_exceptions=True):
            if isinstance(result, Exception):
                error = type(result).__name__
                log.error("service.stop_failed", step="calls and registrations", error=error, exc_info=result)
        with _contained("transports"):
            for transport in self.agent.transports.values() if self.agent else ():
                transport.close()
        await self.ops.stop()  # after the last calls ended: their events go out first
        with _contained("media"):
            if self.media is not None:
                self.media.close()
        with _contained("refusals"):
            if self.trunks is not None:
                self.trunks.flush_refusals()
        if self._writes:
            await asyncio.wait(self._writes, timeout=5)
        with _contained("storage"):
            if self.storage is not None:
                await self.storage.close()
        log.info("service.stopped")

    def _calls_on_trunk(self, trunk: str) -> int:
        return sum(1 for call in self.agent.calls if call.trunk == trunk) if self.agent else 0

    def _write(self, operation: Coroutine[Any, Any, None]) -> None:
        write = asyncio.get_running_loop().create_task(operation)
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    def _line_max_calls(self, line: str) -> int:
        configured = self.trunks.policy.directory.lines.get(line) if self.trunks else None
        return configured.max_calls if configured is not None else 0

    def _hangup(self, call_id: str, reason: str) -> None:
        if self.agent is not None:
            self.agent.hangup(call_id, reason)


@contextlib.contextmanager
def _contained(step: str) -> Iterator[None]:
    """One step of stopping: its failure is logged and the next step still runs."""
    try:
        yield
    except Exception as exc:
        log.error("service.stop_failed", step=step, error=type(exc).__name__, exc_info=exc)


def overload_limits(sip: SipConfig) -> OverloadLimits:
    return OverloadLimits(
        rates={
            "INVITE": RateLimit(sip.invite_rate, sip.invite_burst),
            "REGISTER": RateLimit(sip.register_rate, sip.register_burst),
            "OPTIONS": RateLimit(sip.options_rate, sip.options_burst),
        },
        other=RateLimit(sip.other_rate, sip.other_burst),
        max_calls=sip.max_calls,
        scanner_user_agents=tuple(name.lower() for name in sip.scanner_user_agents),
    )


def tls_listener(sip: SipConfig) -> TlsListener | None:
    tls_address = sip.tls_address
    if tls_address is None:
        return None
    return TlsListener(tls_address, sip.tls_certificate, sip.tls_private_key, sip.tls_ca_file)


def tune_process(realtime_priority: int) -> None:
    """Room for every call's sockets (two per leg), and real-time scheduling when configured."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if realtime_priority:
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(realtime_priority))
        except OSError as exc:
            log.warning("process.realtime_unavailable", priority=realtime_priority, error=exc.strerror)
        else:
            log.info("process.realtime", policy="SCHED_RR", priority=realtime_priority)


async def serve(config: Config, config_file: str | None = None) -> int:
    """Run until SIGINT/SIGTERM (BYE every call, exit 0) or a drain (SIGUSR1) has finished.

    SIGHUP reloads trunks and lines (from `config_file` and the database); an undrain
    (control socket, MQTT) during a drain goes back to taking calls.
    """
    tune_process(config.media.realtime_priority)
    app = VoiceLine(config, config_file)
    systemd = SystemdNotifier.from_environment()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, app.request_drain)
    loop.add_signal_handler(signal.SIGHUP, app.reload_soon)
    pid_file = Path(config.storage.data_dir) / PID_FILE
    try:
        await app.start()
        # What start-up built (modules, config, engines) lives as long as the process: keep it out of
        # the cyclic collector, whose full passes would otherwise stall the relay for tens of ms.
        gc.freeze()
        write_private(pid_file, f"{os.getpid()}\n")
        systemd.ready()
        while not stop.is_set():
            stopped, draining = loop.create_task(stop.wait()), loop.create_task(app.drain_requested.wait())
            await asyncio.wait((stopped, draining), return_when=asyncio.FIRST_COMPLETED)
            draining.cancel()
            stopped.cancel()
            if stop.is_set():
                break
            systemd.status("draining")
            await app.drain(stop)
            if app.agent is not None and app.agent.draining:
                break  # drained; else undrained: take calls again
            systemd.status("taking calls")
        log.info("service.stopping", calls=len(app.agent.calls) if app.agent else 0)
    finally:
        await systemd.stopping()
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()
        await app.stop()
    return 0

