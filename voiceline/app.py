"""Wiring: configuration -> storage, media engine, SIP user agent, trunks and each line's journeys and prompts."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import resource
import signal
import sys
import threading
from collections.abc import Awaitable, Coroutine, Iterator, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import structlog

from voiceline.audio.codecs import available as codec_available
from voiceline.audio.hold import hold_music, load_wav
from voiceline.audio.latch import Learning
from voiceline.audio.media import MediaEngine, MediaError
from voiceline.audio.prompts import PromptError, PromptSet
from voiceline.calls import Calls, HelpRoute, LineSetup
from voiceline import config as config_module
from voiceline.codec_table import Codec
from voiceline.codec_table import lookup as lookup_codec
from voiceline.config import Config, ConfigError, SipConfig
from voiceline.operations import Operations
from voiceline.pairing.safety import SafetyLedger
from voiceline.journey_config import JourneyConfigError
from voiceline.routing import Line, TrunkDirectory, TrunkPolicy
from voiceline.sdnotify import SystemdNotifier
from voiceline.sip.message import SipParseError, parse_uri
from voiceline.sip.overload import OverloadLimits, RateLimit
from voiceline.sip.session_timer import SessionTimerPolicy
from voiceline.sip.transaction import Timers
from voiceline.sip.transport import StreamLimits, StreamTransport, TlsListener, open_transports
from voiceline.sip.core import CoreSettings
from voiceline.sip.useragent import UserAgent
from voiceline.datadir_lock import DataDirBusy, DataDirLock
from voiceline.startup import ExitCode, start_failure
from voiceline.storage import Storage
from voiceline.tasks import supervised
from voiceline.trunk_supervisor import TrunkSupervisor

log = structlog.get_logger("voiceline.app")
_Result = TypeVar("_Result")

BYE_WAIT = 4.0  # longest wait at shutdown for the answers to our BYEs
CLOSE_RESERVE = 0.5  # of the shutdown deadline, kept for closing the storage after the writes
STOP_GRACE = 2.0  # past the shutdown deadline, a process still not ended ends itself
BUSIEST_HOURS_INTERVAL = 3600.0  # seconds between refreshing each line's busiest hours


class VoiceLine:
    """The service: `open` makes its parts (storage open first), `start` puts trunks and lines in
    force and listens, `stop` ends it. Every part exists from `open` on; until `start` nothing listens."""

    def __init__(
        self,
        config: Config,
        storage: Storage,
        config_file: str | None = None,
        drain_requested: asyncio.Event | None = None,
    ) -> None:
        """Use `open`: it opens the storage first (a data dir that cannot serve is found before anything else)."""
        self.config = config
        self.config_file = config_file  # re-read for trunks and lines on reload (SIGHUP)
        self.storage = storage
        self.ops = Operations(self)
        # Set by SIGUSR1 (from before the service exists) or a drain command; cleared by an undrain.
        self.drain_requested = drain_requested or asyncio.Event()
        self.line_setups: dict[str, LineSetup] = {}  # line name -> its journey settings and prompts
        self._prompt_sets: dict[tuple[str, str], PromptSet] = {}  # (language, directory) -> loaded set
        self._writes: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        sip = config.sip
        codecs = self._usable_codecs()  # what can fail comes before the media engine, which holds the kernel path
        hold_audio = load_wav(config.media.hold_audio) if config.media.hold_audio else hold_music()
        self.media = MediaEngine(
            sip.listen_address[0],
            config.media.port_range,
            hold_audio,
            inband_dtmf=config.media.inband_dtmf,
            learning=Learning(config.media.learning_packets, config.media.learning_seconds),
            kernel_forwarding=config.media.kernel_forwarding == "auto",
        )
        settings = CoreSettings(
            advertised_host=sip.advertised_host,
            answer_delay=sip.answer_delay,
            timers=Timers(sip.t1, sip.t2, sip.t4),
            max_message_size=sip.max_message_size,
            codecs=codecs,
            session_timers=SessionTimerPolicy(sip.session_expires, sip.min_session_expires),
            max_call_duration=sip.max_call_duration,
            overload=overload_limits(sip),
            key_rotation=config.safety.key_rotation,
        )
        # Its directory is the trunks and lines in force: `trunks` replaces it on each (re)load.
        self.policy = TrunkPolicy(
            TrunkDirectory((), ()),
            asyncio.get_running_loop().time,
            self._calls_on_trunk,
            drop_unknown=sip.unknown_source == "drop",
        )
        # The user agent and the calls need each other: the agent is made first, taking no calls
        # until the calls are its handler.
        self.agent = UserAgent(settings, None, self.policy)
        self.calls = Calls(
            self.media,
            self.line_setup,
            self._line_max_calls,
            storage,
            self._write,
            self._hangup,
            live_view=self.ops,
            dialer=self.agent,
            ledger=SafetyLedger(config.safety.settings(config.journey.pairing.repeat_window)),
            help_route=self.help_route,
            trunk_of=self._source_trunk,
        )
        self.agent.handler = self.calls
        self.trunks = TrunkSupervisor(
            config,
            storage,
            self.policy,
            self.agent,
            self._write,
            on_registration=self.ops.registration_changed,
            on_refusals=self.ops.refused,
            on_lines=self._lines_changed,
        )

    @classmethod
    async def open(
        cls, config: Config, config_file: str | None = None, drain_requested: asyncio.Event | None = None
    ) -> VoiceLine:
        """The service's storage opened and its parts made, not yet listening. A part that cannot be
        made (a codec, the hold audio) closes the storage again before its error is raised."""
        storage = await Storage.open(
            Path(config.storage.data_dir), config.storage.key_file, flush_interval=config.storage.flush_interval
        )
        try:
            return cls(config, storage, config_file, drain_requested)
        except BaseException:
            await storage.close()  # nothing written yet: one attempt, no deadline to keep
            raise

    def line_setup(self, name: str) -> LineSetup:
        """A line's journey and prompts, as last loaded; a line unknown to provisioning gets the defaults."""
        setup = self.line_setups.get(name)
        if setup is None:
            journey = self.config.journey
            setup = LineSetup(journey.settings(), self._prompt_sets[(journey.prompts.language, journey.prompts.directory)])
        return setup

    def help_route(self, line: str) -> HelpRoute | None:
        """Where `line`'s help key connects (its `[lines.help]` over `[help]`, as now provisioned): None
        without a help destination.

        To the destination's host; with the help trunk's outbound account (its registration's
        user and password, for a carrier's digest challenge, and as our From) when it has one."""
        provisioned = self.policy.directory.lines.get(line)
        help = self.config.line_journey(provisioned).help if provisioned is not None else self.config.journey.help
        if not help.destination:
            return None
        try:
            uri = parse_uri(help.destination)
        except SipParseError:
            log.error("help.destination_invalid")  # the help key then plays the safety message only
            return None
        trunk = self.policy.directory.trunks.get(help.trunk) if help.trunk else None
        if help.trunk and trunk is None:
            log.warning("help.trunk_unknown", trunk=help.trunk)  # the help call goes without its account
        account = trunk.registration if trunk is not None else None
        return HelpRoute(
            help.destination,
            help.method,
            uri.host,
            uri.port or 5060,
            help.trunk,
            account.username if account else "",
            account.password if account else "",
            f"sip:{account.username}@{account.host}" if account else None,
            help.pass_identity,
            help.ring_timeout,
        )

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
            self.calls.configure(name, self.line_setups[name])

    async def _refresh_busiest_hours(self) -> None:
        """Each line's busiest hours from the hourly statistics: at start, then hourly."""
        while True:
            for name in self.policy.directory.lines:
                self.calls.set_busiest_hours(name, await self.storage.busiest_hours(name, self.storage.clock()))
            await asyncio.sleep(BUSIEST_HOURS_INTERVAL)

    async def start(self) -> None:
        """Trunks and lines in force before the first request, then listen, register and serve."""
        sip = self.config.sip
        await self.trunks.load()
        directory = self.policy.directory
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
        if self.media.kernel_path_unavailable is not None:
            log.warning("media.kernel_path_unavailable", reason=self.media.kernel_path_unavailable)
        elif self.media.kernel_routes.path is not None:
            log.info("media.kernel_path_on")
        host = sip.listen_address[0]
        if not sip.public_address and host == "0.0.0.0":
            log.warning(
                "sip.public_address_unset",
                advertised=sip.advertised_host,
                hint="only callers on this machine will have audio; set sip.public_address",
            )
        await self.trunks.start()
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(supervised("refresh_busiest_hours", self._refresh_busiest_hours)))
        timeout, partner_silence = self.config.media.inactivity_timeout, self.config.media.partner_silence
        if timeout or partner_silence:
            reap = functools.partial(self.calls.reap_silent_calls, timeout, partner_silence)
            self._background.append(loop.create_task(supervised("reap_silent_calls", reap)))
        await self.ops.start()

    async def drain(self, stop: asyncio.Event) -> None:
        """Refuse new calls and wait until the last call ended, `stop` is set or sip.drain_timeout passed."""
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
        if self.agent.draining:
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
            self.config = replace(self.config, trunks=fresh.trunks, lines=fresh.lines, journey=fresh.journey)
        await self.trunks.reload(self.config)
        # Prompt files may have changed even when the lines did not: read them again.
        await self._lines_changed(self.policy.directory.lines, first=False)
        log.info("provisioning.reloaded", trunks=len(self.policy.directory.trunks))

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

    async def stop(self, deadline: float | None = None) -> bool:
        """BYE every call, unregister, flush the writes, close: by `deadline` (loop time; default
        sip.shutdown_timeout from now). Each step is contained, so one failure never skips the rest;
        what the deadline leaves unfinished is abandoned and counted in the log.

        The SIP sockets close last: until then new INVITEs get 503 with Retry-After. False when the
        storage did not close in time: its thread may still run, so the process must not wait for it.
        """
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.config.sip.shutdown_timeout
        unfinished: list[str] = []
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        with _contained("totals"):
            log.info("sip.totals", **asdict(self.agent.counters), **asdict(self.agent.overload.counters))
            for transport in self.agent.transports.values():
                if isinstance(transport, StreamTransport):
                    log.info("sip.connections", transport=transport.name.lower(), **asdict(transport.counters))
        # The BYEs go out first (shutdown sends them before it first waits); unregistering runs alongside.
        byes_answered = min(BYE_WAIT, max(0.0, deadline - loop.time()))
        stopping = [self._end_calls(byes_answered), self.trunks.stop()]
        if not await _by(deadline, "calls and registrations", _each_contained("calls and registrations", stopping)):
            unfinished.append("calls and registrations")
        # After the last calls ended: their events go out first.
        if not await _by(deadline, "events and control", self.ops.stop()):
            unfinished.append("events and control")
        with _contained("media"):
            self.media.close()
        with _contained("refusals"):
            self.trunks.flush_refusals()
        close_reserve = min(CLOSE_RESERVE, self.config.sip.shutdown_timeout / 10)
        abandoned_writes = await self._finish_writes(deadline - close_reserve)
        storage_closed = await _by(deadline, "storage", self.storage.close(deadline - close_reserve), cancel=False)
        if not storage_closed:
            unfinished.append("storage")
        with _contained("transports"):
            for transport in self.agent.transports.values():
                transport.close()
        if unfinished or abandoned_writes:
            log.warning(
                "service.stop_deadline",
                timeout=self.config.sip.shutdown_timeout,
                abandoned_writes=abandoned_writes,
                # Held statistics the storage could not write in time (it logs its own count when it closes).
                abandoned_records=0 if storage_closed else self.storage.held_records,
                unfinished=unfinished,
            )
        log.info("service.stopped")
        return storage_closed

    async def _end_calls(self, byes_answered: float) -> None:
        """Help calls first (nothing waits on them any more), then BYE every call and wait up to
        `byes_answered` for the answers."""
        await self.calls.shutdown()
        await self.agent.shutdown(byes_answered)

    async def _finish_writes(self, deadline: float) -> int:
        """Wait for the pending writes until `deadline`; cancel the rest and say how many."""
        if not self._writes:
            return 0
        _, pending = await asyncio.wait(self._writes, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
        for write in pending:
            write.cancel()
        return len(pending)

    def _calls_on_trunk(self, trunk: str) -> int:
        return sum(1 for call in self.agent.calls if call.trunk == trunk)

    def _write(self, operation: Coroutine[Any, Any, None]) -> None:
        write = asyncio.get_running_loop().create_task(operation)
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    def _line_max_calls(self, line: str) -> int:
        configured = self.policy.directory.lines.get(line)
        return configured.max_calls if configured is not None else 0

    def _source_trunk(self, address: str) -> str:
        """The trunk whose sources hold `address` ("" for none): requests from it in our call are admitted."""
        trunks = self.policy.directory.source_trunks(address)
        return trunks[0].name if trunks else ""

    def _hangup(self, call_id: str, reason: str) -> None:
        self.agent.hangup(call_id, reason)


async def _each_contained(step: str, works: list[Coroutine[Any, Any, None]]) -> None:
    """Run `works` side by side; each failure is logged and the others still finish."""
    for result in await asyncio.gather(*works, return_exceptions=True):
        if isinstance(result, Exception):
            log.error("service.stop_failed", step=step, error=type(result).__name__, exc_info=result)


async def _by(deadline: float, step: str, work: Awaitable[Any], cancel: bool = True) -> bool:
    """Run one step of stopping until `deadline`: whether it finished. A failure is logged (it finished).

    Unfinished, it is cancelled, or with `cancel=False` left to run (the storage's close, whose
    thread finishes a statement it started whatever we do).
    """
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
    if not done:
        if cancel:
            task.cancel()
        return False
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.error("service.stop_failed", step=step, error=type(exc).__name__, exc_info=exc)
    return True


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
    (control socket, MQTT) during a drain goes back to taking calls. The data dir is ours
    (its lock) from before the database opens until the process ends. A start-up failure
    raises StartFailed (its line and exit code); stopping takes at most sip.shutdown_timeout.
    """
    tune_process(config.media.realtime_priority)
    loop = asyncio.get_running_loop()
    # Before anything else: a SIGTERM from here on stops the start instead of killing the process.
    stop = _StopSignal(loop, config.sip.shutdown_timeout)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # A drain (SIGUSR1) or reload (SIGHUP) asked for during start-up is done once the service has
    # started (start-up itself loads the trunks).
    drain_requested, reload_requested = asyncio.Event(), asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, drain_requested.set)
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)
    try:
        owner = await asyncio.to_thread(DataDirLock.acquire, Path(config.storage.data_dir))
    except (DataDirBusy, OSError) as exc:
        raise start_failure(exc, config) or exc from None
    if owner.predecessor is not None:
        # Its calls were counted at answer; their in-call requests get 481 and count as orphans.
        log.warning("service.unclean_stop_before", pid=owner.predecessor)
    try:
        return await _serve_owned(config, config_file, stop, drain_requested, reload_requested)
    finally:
        owner.release()


async def _serve_owned(
    config: Config,
    config_file: str | None,
    stop: _StopSignal,
    drain_requested: asyncio.Event,
    reload_requested: asyncio.Event,
) -> int:
    systemd = SystemdNotifier.from_environment()
    loop = asyncio.get_running_loop()
    app: VoiceLine | None = None
    failure: BaseException | None = None
    try:
        app = await _unless_stopped(VoiceLine.open(config, config_file, drain_requested), stop)
        await _unless_stopped(app.start(), stop)
        loop.add_signal_handler(signal.SIGHUP, app.reload_soon)
        if reload_requested.is_set():
            app.reload_soon()
        await _run(app, systemd, stop)
    except _StoppedDuringStart:
        log.info("service.stopping", calls=0, during="start")
    except BaseException as exc:  # start-up failed (or the task was cancelled): stop what started, then say so
        failure = exc
    deadline = stop.deadline_from_now()
    overrun = threading.Timer(deadline - loop.time() + STOP_GRACE, _overrun)
    overrun.daemon = True
    overrun.start()
    with _contained("systemd"):
        await systemd.stopping()
    closed = await app.stop(deadline) if app is not None else _stopped_unopened()
    explained = start_failure(failure, config) if isinstance(failure, Exception) else None
    if not closed:
        # The storage thread is stuck in a statement: waiting for it would outlive the deadline.
        if failure is not None:
            log.error("service.start_failed", error=type(failure).__name__, detail=str(explained or ""))
        _end_process_now(explained.code if explained else ExitCode.FAILED if failure else ExitCode.OK)
    overrun.cancel()
    if failure is not None:
        raise explained or failure
    return ExitCode.OK


class _StopSignal:
    """SIGINT/SIGTERM: `event` is set, and the one shutdown deadline counts from the first signal."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.event = asyncio.Event()
        self.deadline: float | None = None
        self.timeout = timeout
        self._loop = loop

    def set(self) -> None:
        if self.deadline is None:
            self.deadline = self._loop.time() + self.timeout
        self.event.set()

    def deadline_from_now(self) -> float:
        """The deadline, counted from now when no signal came (a drain ended, start-up failed)."""
        if self.deadline is None:
            self.deadline = self._loop.time() + self.timeout
        return self.deadline


async def _run(app: VoiceLine, systemd: SystemdNotifier, stop: _StopSignal) -> None:
    """Take calls, drain when asked; return when it is time to stop."""
    loop = asyncio.get_running_loop()
    # What start-up built (modules, config, engines) lives as long as the process: keep it out of
    # the cyclic collector, whose full passes would otherwise stall the relay for tens of ms.
    gc.freeze()
    systemd.ready()
    log.info("service.started")  # listening, registering, control socket and metrics up
    while not stop.event.is_set():
        stopped, draining = loop.create_task(stop.event.wait()), loop.create_task(app.drain_requested.wait())
        await asyncio.wait((stopped, draining), return_when=asyncio.FIRST_COMPLETED)
        draining.cancel()
        stopped.cancel()
        if stop.event.is_set():
            break
        systemd.status("draining")
        await app.drain(stop.event)
        if app.agent.draining:
            break  # drained; else undrained: take calls again
        systemd.status("taking calls")
    log.info("service.stopping", calls=len(app.agent.calls))


class _StoppedDuringStart(Exception):
    """A stop signal came before start-up finished: what started is stopped, the exit is clean."""


def _stopped_unopened() -> bool:
    """Stopping when the storage never opened: nothing to close."""
    log.info("service.stopped")
    return True


async def _unless_stopped(work: Coroutine[Any, Any, _Result], stop: _StopSignal) -> _Result:
    """`work`'s result, unless a stop signal comes first: then `work` is cancelled and
    _StoppedDuringStart raised.

    A cancelled start-up still unwinding at the shutdown deadline (a statement the database keeps
    waiting) ends the process: nothing of the service runs yet, and nothing may hang.
    """
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.event.wait())
    await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        return task.result()  # a start-up failure is raised here
    task.cancel()
    await asyncio.wait({task}, timeout=max(0.0, stop.deadline_from_now() - asyncio.get_running_loop().time()))
    if not task.done():
        log.warning("service.stop_deadline", timeout=stop.timeout, abandoned_writes=0, unfinished=["start"])
        _end_process_now(ExitCode.OK)
    if not task.cancelled():
        task.exception()  # a start-up that failed while being stopped: the stop is what was asked for
    raise _StoppedDuringStart


def _overrun() -> None:
    """The last resort, on a thread of its own, when stopping is stuck past its deadline and grace.

    Straight to the file descriptor and out: the stuck thread may hold the stdout buffer's lock.
    """
    with contextlib.suppress(OSError):
        os.write(2, b"voiceline: stopping outlived sip.shutdown_timeout; ending the process\n")
    os._exit(ExitCode.STOP_OVERRUN)


def _end_process_now(code: int) -> NoReturn:
    """Exit without waiting for threads (the storage's may be stuck in a statement); the kernel drops our locks."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(int(code))
