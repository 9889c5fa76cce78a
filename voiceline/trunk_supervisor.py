"""The trunk supervisor: keeps the trunks and lines in force, their host names resolved and their registrations up.

- Provisioning: `voiceline trunk|line` (another process) moves the database's
  data_version; each poll (`storage.poll_interval`) reloads trunks and lines
  when it moved, and a bad row or a busy database waits for the next poll.
- DNS: trunk host names (sources, registrars given by name) are resolved
  again every `sip.resolve_interval`; a name that fails keeps its last
  addresses. Only names from the trunks' own configuration are resolved.
- Registrations: one driver per enabled trunk with a registration; a changed
  trunk restarts its driver; each status change goes to the database.
- Refusals the trunk policy counted move to the hourly statistics each poll.

`load` puts the trunks in force before the user agent listens; `start`
registers and starts the watching loops once it does.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import structlog

from voiceline.config import Config
from voiceline.provisioning import load as load_provisioned
from voiceline.provisioning import wall_time
from voiceline.routing import Line, Trunk, TrunkDirectory, TrunkPolicy
from voiceline.sip.registration import RegistrationClient, RegistrationDriver, RegistrationStatus
from voiceline.sip.transport import Address
from voiceline.sip.useragent import UserAgent
from voiceline.storage import Storage
from voiceline.tasks import supervised

log = structlog.get_logger("voiceline.trunk_supervisor")

Write = Callable[[Coroutine[Any, Any, None]], None]
RegistrationState = Callable[[str, str], None]  # (trunk, state): for the live view
Refusals = Callable[[Mapping[str, int]], None]  # counts by reason: for the live view
# (the lines in force, whether this is the first load): the app readies each line's journey and prompts
LinesChanged = Callable[[Mapping[str, Line], bool], Coroutine[Any, Any, None]]


def _ignore(*_: object) -> None:
    pass


class TrunkSupervisor:
    """Owns the trunk policy's directory (a reload builds a new one) and the registration drivers."""

    def __init__(
        self,
        config: Config,
        storage: Storage,
        policy: TrunkPolicy,
        agent: UserAgent,
        write: Write,
        on_registration: RegistrationState = _ignore,
        on_refusals: Refusals = _ignore,
        on_lines: LinesChanged | None = None,
    ) -> None:
        """In force only once `load` has run."""
        self.policy = policy
        self._on_registration = on_registration
        self._on_refusals = on_refusals
        self._on_lines = on_lines  # told the lines in force at the first load and whenever they change
        self.registrations: dict[str, tuple[Trunk, RegistrationDriver]] = {}
        self._config = config
        self._storage = storage
        self._agent = agent
        self._write = write  # the app's background writes, awaited before storage closes
        self._data_version = -1
        self._registering = False  # from `start`: registrations need the user agent's transport
        self._tasks: list[asyncio.Task[None]] = []

    async def load(self) -> None:
        """Trunks and lines in force, their names resolved, before the user agent hears a request."""
        await self._storage.clear_registration_status()
        await self._reload_provisioning()

    async def start(self) -> None:
        """Once the user agent listens: register the trunks that do, then watch for changes."""
        self._registering = True
        await self._reconcile_registrations()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(supervised("watch_provisioning", self._watch_provisioning)),
            loop.create_task(supervised("watch_hostnames", self._watch_hostnames)),
        ]

    async def stop(self) -> None:
        """Stop watching and remove every registration (Expires: 0); the app runs this alongside its BYEs."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        drivers = [driver for _, driver in self.registrations.values()]
        self.registrations.clear()
        for result in await asyncio.gather(*(driver.stop() for driver in drivers), return_exceptions=True):
            if isinstance(result, Exception):
                log.error("service.stop_failed", step="registrations", error=type(result).__name__, exc_info=result)

    async def reload(self, config: Config) -> None:
        """Trunks and lines again now (SIGHUP, the reload command): `config`'s and the database's."""
        self._config = config
        self._data_version = -2  # forces the reload (-1 is the first load)
        await self._reload_provisioning()

    def flush_refusals(self) -> None:
        """Move the policy's refusal counts to the hourly statistics."""
        if not self.policy.refused:
            return
        refused: Counter[str] = self.policy.refused
        self.policy.refused = Counter()
        self._on_refusals(refused)
        for reason, count in refused.items():
            self._write(self._storage.record_refusal(reason, self._storage.clock(), count))

    # -- provisioning -------------------------------------------------------------

    async def _watch_provisioning(self) -> None:
        """Apply `voiceline trunk|line` changes: the database's data_version moves when another process writes."""
        while True:
            await asyncio.sleep(self._config.storage.poll_interval)
            self.flush_refusals()
            try:
                await self._reload_provisioning()
            except Exception as exc:  # a bad row or a busy database must not stop the watcher
                log.error("provisioning.reload_failed", error=type(exc).__name__)

    async def _reload_provisioning(self) -> None:
        version = await self._storage.data_version()
        if version == self._data_version:
            return
        first = self._data_version == -1
        self._data_version = version
        provisioned = await load_provisioned(self._config, self._storage)
        for name in provisioned.shadowed:
            log.warning("provisioning.ignored", entry=name, hint="a config-file entry has the same name, or it is invalid")
        old = self.policy.directory
        new = self.policy.directory = TrunkDirectory(provisioned.trunks, provisioned.lines, old.resolved)
        if not first and (old.trunks != new.trunks or old.lines != new.lines):
            log.info("provisioning.loaded", trunks=sorted(new.trunks), lines=sorted(new.lines))
        if self._on_lines is not None and (first or old.lines != new.lines):
            await self._on_lines(new.lines, first)
        if new.hostnames - set(old.resolved):
            await self._resolve_hostnames()
        if self._registering:
            await self._reconcile_registrations()

    # -- host names ---------------------------------------------------------------

    async def _watch_hostnames(self) -> None:
        while True:
            await asyncio.sleep(self._config.sip.resolve_interval)
            await self._resolve_hostnames()

    async def _resolve_hostnames(self) -> None:
        """Re-resolve trunk host names; a name that fails keeps its last addresses."""
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

    # -- registrations --------------------------------------------------------------

    async def _reconcile_registrations(self) -> None:
        """One driver per enabled trunk with a registration; a changed trunk restarts its driver."""
        listening = self._agent.transport
        assert listening is not None  # `start` runs once the user agent listens
        wanted = {t.name: t for t in self.policy.directory.trunks.values() if t.enabled and t.registration is not None}
        for name, (trunk, driver) in list(self.registrations.items()):
            if wanted.get(name) != trunk:
                del self.registrations[name]
                await driver.stop()
        sip = self._config.sip
        local = (sip.advertised_host, listening.local_address[1])
        for name, trunk in wanted.items():
            if name in self.registrations:
                continue
            assert trunk.registration is not None
            client = RegistrationClient(
                trunk.registration, local, listening.name, sip.register_retry_min, sip.register_retry_max
            )
            driver = RegistrationDriver(name, client, self._agent.request, _resolve, self._registration_changed)
            self.registrations[name] = (trunk, driver)
            driver.start()

    def _registration_changed(self, trunk: str, status: RegistrationStatus) -> None:
        now = asyncio.get_running_loop().time()
        expires_in = None if status.expires_at is None else round(status.expires_at - now)
        retry_in = None if status.next_attempt is None else round(status.next_attempt - now, 1)
        log.info("trunk.registration", trunk=trunk, state=status.state.value, detail=status.detail,
                 expires_in=expires_in, next_attempt_in=retry_in)  # fmt: skip
        self._on_registration(trunk, status.state.value)
        if trunk in self.policy.directory.trunks:
            self._write(
                self._storage.set_registration_status(
                    trunk, status.state.value, status.detail, time.time(),
                    wall_time(status.expires_at, now), wall_time(status.next_attempt, now),
                )  # fmt: skip
            )


async def _resolve(host: str, port: int) -> Address:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    return str(infos[0][4][0]), int(infos[0][4][1])
