"""Wiring: configuration -> storage, media engine, SIP user agent, trunks and one pairing pool per line."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from typing import Any
from pathlib import Path

import structlog

from voiceline.audio.hold import chime_pattern, load_wav
from voiceline.audio.media import MediaEngine, MediaError, MediaLeg
from voiceline.config import Config
from voiceline.pairing.service import PairingService, Participant
from voiceline.provisioning import load as load_provisioned
from voiceline.provisioning import wall_time
from voiceline.sip.registration import RegistrationClient, RegistrationDriver, RegistrationStatus
from voiceline.sip.transport import Address, open_udp
from voiceline.sip.trunks import Trunk, TrunkDirectory, TrunkPolicy
from voiceline.sip.useragent import Call, CallRejected, UserAgent, UserAgentSettings
from voiceline.sip.transaction import Timers
from voiceline.storage import Storage

log = structlog.get_logger("voiceline.app")


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
        self.media = MediaEngine(bind_host, self.config.media.port_range, hold_audio)
        settings = UserAgentSettings(
            advertised_host=sip.advertised_host,
            answer_delay=sip.answer_delay,
            timers=Timers(sip.t1, sip.t2, sip.t4),
            max_message_size=sip.max_message_size,
            codecs=self.config.media.codecs,
        )
        loop = asyncio.get_running_loop()
        self.policy = TrunkPolicy(
            TrunkDirectory((), ()), loop.time, self._calls_on_trunk, drop_unknown=sip.unknown_source == "drop"
        )
        await self.storage.clear_registration_status()
        await self._reload_provisioning()  # trunks and lines are in force before the first request
        self.agent = UserAgent(settings, self, self.policy)
        host, port = sip.listen_address
        transport = await open_udp(host, port, self.agent.datagram_received)
        self.agent.attach(transport)
        bound_host, bound_port = transport.local_address
        directory = self.policy.directory
        log.info(
            "sip.listening",
            address=f"{bound_host}:{bound_port}",
            transport="udp",
            advertised=sip.advertised_host,
            trunks=sorted(directory.trunks),
            lines=sorted(directory.lines),
        )
        await self._reconcile_registrations()
        self._background = [
            loop.create_task(self._watch_provisioning()),
            loop.create_task(self._watch_hostnames()),
        ]
        if not sip.public_address and host == "0.0.0.0":
            log.warning(
                "sip.public_address_unset",
                advertised=sip.advertised_host,
                hint="only callers on this machine will have audio; set sip.public_address",
            )

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*(driver.stop() for _, driver in self.registrations.values()), return_exceptions=True)
        self.registrations.clear()
        if self.agent is not None:
            log.info("sip.totals", **asdict(self.agent.counters))
            await self.agent.shutdown()
            if self.agent.transport is not None:
                self.agent.transport.close()
        if self.media is not None:
            self.media.close()
        self._flush_refusals()
        if self._writes:
            await asyncio.wait(self._writes, timeout=5)
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
        audio = call.audio
        leg.start((audio.remote_host, audio.remote_port), audio.codec, audio.payload_type, audio.telephone_event_pt)
        self._legs[call] = leg
        return leg.local_port

    def call_confirmed(self, call: Call) -> None:
        self.pool(call.line).join(CallerLeg(call, self._legs[call]))

    def call_ended(self, call: Call) -> None:
        leg = self._legs.pop(call, None)
        if leg is not None:
            leg.close()
        summary = self.pool(call.line).leave(call.id)
        if summary is not None and self.storage is not None:
            self._write(
                self.storage.record_call(call.line, time.time(), summary.waited, summary.talked, summary.partners > 0)
            )


async def serve(config: Config) -> int:
    """Run until SIGINT/SIGTERM; then BYE every call and exit 0."""
    app = VoiceLine(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
        await stop.wait()
        log.info("service.stopping", calls=len(app.agent.calls) if app.agent else 0)
    finally:
        await app.stop()
    return 0
