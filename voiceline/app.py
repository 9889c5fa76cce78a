"""Wiring: configuration -> storage, media engine, SIP user agent, trunks and one pairing pool per line."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import os
import resource
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from voiceline.audio.codecs import available as codec_available
from voiceline.audio.hold import chime_pattern, load_wav
from voiceline.audio.media import MediaEngine, MediaError, MediaLeg
from voiceline.config import Config, SipConfig
from voiceline.pairing.service import PairingService, Participant
from voiceline.provisioning import load as load_provisioned
from voiceline.provisioning import wall_time
from voiceline.sip.overload import OverloadLimits, RateLimit
from voiceline.sip.registration import RegistrationClient, RegistrationDriver, RegistrationStatus
from voiceline.sip.session_timer import SessionTimerPolicy
from voiceline.sip.transaction import Timers
from voiceline.sip.transport import (
    Address,
    MessageHandler,
    SipTransport,
    StreamLimits,
    StreamTransport,
    client_tls_context,
    open_stream,
    open_udp,
    server_tls_context,
)
from voiceline.sip.trunks import Trunk, TrunkDirectory, TrunkPolicy
from voiceline.sip.useragent import Call, CallRejected, CallState, UserAgent, UserAgentSettings
from voiceline.storage import CallAudio, Storage

log = structlog.get_logger("voiceline.app")

PID_FILE = "voiceline.pid"  # in the data dir: how `voiceline drain` finds the server
# With port 0 UDP and TCP share one kernel-chosen port; tries when TCP finds it taken.
SHARED_PORT_ATTEMPTS = 20
# A housekeeping loop that failed starts again after this many seconds.
TASK_RESTART_SECONDS = 1.0


@dataclass(eq=False)
class CallerLeg:
    """A confirmed call as pairing sees it: an id and what it hears."""

    call: Call
    media: MediaLeg

    @property
    def id(self) -> str:
        return self.call.id

    def hear_hold(self) -> None:
        self.media.hold()

    def hear(self, other: Participant) -> None:
        assert isinstance(other, CallerLeg)
        self.media.listen_to(other.media)


class VoiceLine:
    """The running service. Implements the user agent's CallHandler."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pools: dict[str, PairingService] = {}  # line name -> its own pool: lines never mix
        self.storage: Storage | None = None
        self.media: MediaEngine | None = None
        self.agent: UserAgent | None = None
        self.policy: TrunkPolicy | None = None
        self.registrations: dict[str, tuple[Trunk, RegistrationDriver]] = {}
        self._legs: dict[Call, MediaLeg] = {}
        self._quiet_since: dict[Call, float] = {}  # confirmed calls: since when silence counts
        self._writes: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._data_version = -1

    def pool(self, line: str) -> PairingService:
        if line not in self.pools:
            self.pools[line] = PairingService()
        return self.pools[line]

    async def start(self) -> None:
        sip = self.config.sip
        self.storage = await Storage.open(Path(self.config.storage.data_dir))
        hold_audio = load_wav(self.config.media.hold_audio) if self.config.media.hold_audio else chime_pattern()
        bind_host = sip.listen_address[0]
        self.media = MediaEngine(
            bind_host, self.config.media.port_range, hold_audio, inband_dtmf=self.config.media.inband_dtmf
        )
        settings = UserAgentSettings(
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
        self.policy = TrunkPolicy(
            TrunkDirectory((), ()), loop.time, self._calls_on_trunk, drop_unknown=sip.unknown_source == "drop"
        )
        await self.storage.clear_registration_status()
        await self._reload_provisioning()  # trunks and lines are in force before the first request
        self.agent = UserAgent(settings, self, self.policy)
        directory = self.policy.directory
        for transport in await open_transports(sip, self.agent.message_received):
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
        await self._reconcile_registrations()
        self._background = [
            loop.create_task(_supervised("watch_provisioning", self._watch_provisioning)),
            loop.create_task(_supervised("watch_hostnames", self._watch_hostnames)),
        ]
        if self.config.media.inactivity_timeout:
            self._background.append(loop.create_task(_supervised("reap_silent_calls", self._reap_silent_calls)))

    async def drain(self, stop: asyncio.Event) -> None:
        """Refuse new calls and wait until the last call ended, `stop` is set or sip.drain_timeout passed."""
        assert self.agent is not None
        self.agent.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.sip.drain_timeout
        while self.agent.calls and not stop.is_set() and loop.time() < deadline:
            await asyncio.sleep(0.2)
        log.info("service.drained", calls=len(self.agent.calls))

    def _usable_codecs(self) -> tuple[str, ...]:
        """The configured codecs whose libraries load here (Opus needs libopus)."""
        usable = tuple(name for name in self.config.media.codecs if codec_available(name))
        for name in self.config.media.codecs:
            if name not in usable:
                log.warning("media.codec_unavailable", codec=name)
        if not usable:
            raise MediaError("none of the configured codecs can be used")
        return usable

    async def stop(self) -> None:
        """BYE every call, unregister, close: each step contained, so one failure never skips the rest."""
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        stopping = [driver.stop() for _, driver in self.registrations.values()]
        self.registrations.clear()
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
        with _contained("media"):
            if self.media is not None:
                self.media.close()
        with _contained("refusals"):
            self._flush_refusals()
        if self._writes:
            await asyncio.wait(self._writes, timeout=5)
        with _contained("storage"):
            if self.storage is not None:
                await self.storage.close()
        log.info("service.stopped")

    # -- trunks, lines and registrations ----------------------------------------

    def _calls_on_trunk(self, trunk: str) -> int:
        return sum(1 for call in self.agent.calls if call.trunk == trunk) if self.agent else 0

    async def _watch_provisioning(self) -> None:
        """Apply `voiceline trunk|line` changes: the database's data_version moves when another process writes."""
        while True:
            await asyncio.sleep(self.config.storage.poll_interval)
            self._flush_refusals()
            try:
                await self._reload_provisioning()
            except Exception as exc:  # a bad row or a busy database must not stop the watcher
                log.error("provisioning.reload_failed", error=type(exc).__name__)

    async def _reload_provisioning(self) -> None:
        assert self.storage is not None and self.policy is not None
        version = await self.storage.data_version()
        if version == self._data_version:
            return
        first = self._data_version == -1
        self._data_version = version
        provisioned = await load_provisioned(self.config, self.storage)
        for name in provisioned.shadowed:
            log.warning("provisioning.ignored", entry=name, hint="a config-file entry has the same name, or it is invalid")
        old = self.policy.directory
        self.policy.directory = TrunkDirectory(provisioned.trunks, provisioned.lines, old.resolved)
        if not first and (old.trunks != self.policy.directory.trunks or old.lines != self.policy.directory.lines):
            log.info("provisioning.loaded", trunks=sorted(self.policy.directory.trunks), lines=sorted(self.policy.directory.lines))
        if self.policy.directory.hostnames - set(old.resolved):
            await self._resolve_hostnames()
        if self.agent is not None:
            await self._reconcile_registrations()

    async def _watch_hostnames(self) -> None:
        while True:
            await asyncio.sleep(self.config.sip.resolve_interval)
            await self._resolve_hostnames()

    async def _resolve_hostnames(self) -> None:
        """Re-resolve trunk host names; a name that fails keeps its last addresses."""
        assert self.policy is not None
        directory = self.policy.directory
        resolved = {name: directory.resolved.get(name, []) for name in directory.hostnames}
        loop = asyncio.get_running_loop()
        for name in resolved:
            try:
                infos = await loop.getaddrinfo(name, None, type=socket.SOCK_DGRAM)
            except OSError:
                log.warning("trunk.resolve_failed", host=name)
                continue
            resolved[name] = sorted({str(info[4][0]) for info in infos})
        if resolved != directory.resolved:
            self.policy.directory = TrunkDirectory(directory.trunks.values(), directory.lines.values(), resolved)

    async def _reconcile_registrations(self) -> None:
        """One driver per enabled trunk with a registration; a changed trunk restarts its driver."""
        assert self.policy is not None and self.agent is not None and self.agent.transport is not None
        wanted = {t.name: t for t in self.policy.directory.trunks.values() if t.enabled and t.registration is not None}
        for name, (trunk, driver) in list(self.registrations.items()):
            if wanted.get(name) != trunk:
                del self.registrations[name]
                await driver.stop()
        sip = self.config.sip
        local = (sip.advertised_host, self.agent.transport.local_address[1])
        for name, trunk in wanted.items():
            if name in self.registrations:
                continue
            assert trunk.registration is not None
            client = RegistrationClient(
                trunk.registration, local, self.agent.transport.name, sip.register_retry_min, sip.register_retry_max
            )
            driver = RegistrationDriver(name, client, self.agent.request, self._resolve, self._registration_changed)
            self.registrations[name] = (trunk, driver)
            driver.start()

    @staticmethod
    async def _resolve(host: str, port: int) -> Address:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        return str(infos[0][4][0]), int(infos[0][4][1])

    def _registration_changed(self, trunk: str, status: RegistrationStatus) -> None:
        now = asyncio.get_running_loop().time()
        expires_in = None if status.expires_at is None else round(status.expires_at - now)
        retry_in = None if status.next_attempt is None else round(status.next_attempt - now, 1)
        log.info("trunk.registration", trunk=trunk, state=status.state.value, detail=status.detail,
                 expires_in=expires_in, next_attempt_in=retry_in)  # fmt: skip
        if self.storage is not None and self.policy is not None and trunk in self.policy.directory.trunks:
            self._write(
                self.storage.set_registration_status(
                    trunk, status.state.value, status.detail, time.time(),
                    wall_time(status.expires_at, now), wall_time(status.next_attempt, now),
                )  # fmt: skip
            )

    def _flush_refusals(self) -> None:
        if self.policy is None or self.storage is None or not self.policy.refused:
            return
        refused: Counter[str] = self.policy.refused
        self.policy.refused = Counter()
        for reason, count in refused.items():
            self._write(self.storage.record_refusal(reason, time.time(), count))

    def _write(self, operation: Coroutine[Any, Any, None]) -> None:
        write = asyncio.get_running_loop().create_task(operation)
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    # -- CallHandler -------------------------------------------------------------

    async def call_offered(self, call: Call) -> int:
        assert self.media is not None
        line = self.policy.directory.lines.get(call.line) if self.policy else None
        if line is not None and line.max_calls and sum(1 for c in self._legs if c.line == call.line) >= line.max_calls:
            log.info("line.full", call=call.id, line=call.line)
            raise CallRejected(486, retry_after=60)
        try:
            leg = await self.media.open_leg()
        except MediaError:
            log.warning("call.no_media_ports", call=call.id)
            raise CallRejected(503, retry_after=30) from None
        if call.audio is not None:  # else the offer goes out in our 200 and the ACK answers it
            _start_media(leg, call)
        self._legs[call] = leg
        return leg.local_port

    def call_confirmed(self, call: Call) -> None:
        leg = self._legs[call]
        if call.offer is None:
            _start_media(leg, call)
        self._quiet_since[call] = asyncio.get_running_loop().time()
        leg.set_sending(not call.on_hold)
        pool = self.pool(call.line)
        pool.join(CallerLeg(call, leg), held=call.on_hold)
        leg.on_digit = functools.partial(pool.digit, call.id)

    def call_media_changed(self, call: Call) -> None:
        leg = self._legs.get(call)
        if leg is None or call.audio is None:
            return
        remote = (call.audio.remote_host, call.audio.remote_port)
        leg.update_remote(remote)
        self._quiet_since[call] = asyncio.get_running_loop().time()
        if call.on_hold:
            leg.set_sending(False)
            self.pool(call.line).hold(call.id)
        else:
            leg.set_sending(True)
            self.pool(call.line).resume(call.id)

    def call_dtmf(self, call: Call, digit: str) -> None:
        """A digit from SIP INFO (the user agent's side); RTP digits come through `MediaLeg.on_digit`."""
        self.pool(call.line).digit(call.id, digit)

    def call_ended(self, call: Call) -> None:
        self._quiet_since.pop(call, None)
        leg = self._legs.pop(call, None)
        audio = CallAudio()
        if leg is not None:
            leg.close()
            stats = leg.stats()
            log.info("call.media_stats", call=call.id, **asdict(stats))
            audio = CallAudio(stats.packets_expected, stats.packets_lost, stats.jitter_ms)
        summary = self.pool(call.line).leave(call.id)
        if summary is not None and self.storage is not None:
            paired = summary.partners > 0
            self._write(self.storage.record_call(call.line, time.time(), summary.waited, summary.talked, paired, audio))

    async def _reap_silent_calls(self) -> None:
        """End calls whose caller sent no RTP for media.inactivity_timeout while not on hold."""
        timeout = self.config.media.inactivity_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(5.0, timeout / 4))
            now = loop.time()
            for call, since in list(self._quiet_since.items()):
                try:
                    self._reap_if_silent(call, since, now, timeout)
                except Exception as exc:  # one call's error never spares the others
                    log.error("call.reap_failed", call=call.id, error=type(exc).__name__, exc_info=exc)

    def _reap_if_silent(self, call: Call, since: float, now: float, timeout: float) -> None:
        leg = self._legs.get(call)
        if leg is None or call.on_hold or call.state is not CallState.CONFIRMED:
            return
        if now - max(since, leg.last_received) > timeout:
            assert self.agent is not None
            log.warning("call.media_timeout", call=call.id, seconds=timeout)
            self.agent.hangup(call, "no media")  # ends the call even when its BYE cannot be sent


async def _supervised(name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a housekeeping loop for the service's lifetime: an error is logged (redacted trace) and it starts again."""
    while True:
        try:
            await run()
            return
        except Exception as exc:
            log.error("service.task_failed", task=name, error=type(exc).__name__, exc_info=exc)
            await asyncio.sleep(TASK_RESTART_SECONDS)


@contextlib.contextmanager
def _contained(step: str) -> Iterator[None]:
    """One step of stopping: its failure is logged and the next step still runs."""
    try:
        yield
    except Exception as exc:
        log.error("service.stop_failed", step=step, error=type(exc).__name__, exc_info=exc)


def _start_media(leg: MediaLeg, call: Call) -> None:
    audio = call.audio
    assert audio is not None
    leg.start((audio.remote_host, audio.remote_port), audio.codec, audio.payload_type, audio.telephone_event_pt)


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


async def open_transports(sip: SipConfig, on_message: MessageHandler) -> list[SipTransport]:
    """UDP and TCP on `sip.listen` (one port for both), TLS on `sip.listen_tls` when set."""
    host, port = sip.listen_address
    limits = StreamLimits(sip.max_message_size, sip.connection_idle_timeout, sip.max_connections)
    opened: list[SipTransport] = []
    try:
        for attempt in range(SHARED_PORT_ATTEMPTS):
            if "udp" in sip.transports:
                udp = await open_udp(host, port, on_message)
                opened.append(udp)
            if "tcp" not in sip.transports:
                break
            tcp_port = opened[0].local_address[1] if opened else port
            try:
                opened.append(await open_stream("TCP", host, tcp_port, on_message, limits))
                break
            except OSError as exc:
                # Port 0: the UDP port the kernel chose may be taken for TCP; choose again.
                if port != 0 or exc.errno != errno.EADDRINUSE or attempt == SHARED_PORT_ATTEMPTS - 1:
                    raise
                for transport in opened:
                    transport.close()
                opened.clear()
        tls_address = sip.tls_address
        if tls_address is not None:
            tls = await open_stream(
                "TLS",
                *tls_address,
                on_message,
                limits,
                server_ssl=server_tls_context(sip.tls_certificate, sip.tls_private_key),
                client_ssl=client_tls_context(sip.tls_ca_file),
            )
            opened.append(tls)
    except BaseException:
        for transport in opened:
            transport.close()
        raise
    return opened


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


async def serve(config: Config) -> int:
    """Run until SIGINT/SIGTERM (BYE every call, exit 0) or a drain (SIGUSR1) has finished."""
    tune_process(config.media.realtime_priority)
    app = VoiceLine(config)
    stop = asyncio.Event()
    drain = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, drain.set)
    pid_file = Path(config.storage.data_dir) / PID_FILE
    try:
        await app.start()
        # What start-up built (modules, config, engines) lives as long as the process: keep it out of
        # the cyclic collector, whose full passes would otherwise stall the relay for tens of ms.
        gc.freeze()
        pid_file.write_text(f"{os.getpid()}\n", encoding="ascii")
        stopped, draining = loop.create_task(stop.wait()), loop.create_task(drain.wait())
        await asyncio.wait((stopped, draining), return_when=asyncio.FIRST_COMPLETED)
        draining.cancel()
        stopped.cancel()
        if drain.is_set() and not stop.is_set():
            await app.drain(stop)
        log.info("service.stopping", calls=len(app.agent.calls) if app.agent else 0)
    finally:
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()
        await app.stop()
    return 0
