"""Trunks and lines from the config file and the database, and the changes `voiceline trunk|line` makes.

Config-file entries are read-only here (edit the file); database entries are
added, updated and removed by the CLI while the server runs, which notices the
change within `storage.poll_interval`. A database entry whose name a config
entry already uses is ignored (the config file wins) and reported.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from voiceline.audio.prompts import PromptError, PromptSet
from voiceline.config import Config
from voiceline.journey_config import JourneyConfigError, Override, merged
from voiceline.routing import HA1_FIELDS, Line, Trunk, TrunkError, check_name
from voiceline.storage import Storage, StorageError, StorageUnavailable, UnknownName


class ProvisioningError(ValueError):
    """Bad input for a provisioning command: one line for the admin, exit status 2."""


@dataclass(frozen=True)
class LineJourney:
    """What `voiceline line add|update` sets of a line's journey: None leaves a setting as it is."""

    language: str | None = None
    prompts: str | None = None  # a directory
    overrides: tuple[Override, ...] = ()  # added to the line's own, replacing the same keys


@dataclass(frozen=True)
class Provisioned:
    trunks: list[Trunk]
    lines: list[Line]
    origins: dict[tuple[str, str], str]  # (kind, name) -> "config" | "database"
    shadowed: list[str]  # database entries hidden by a config entry of the same name


async def load(config: Config, storage: Storage) -> Provisioned:
    """Config entries, then database entries; invalid stored rows are skipped and reported as shadowed."""
    origins: dict[tuple[str, str], str] = {}
    trunks = list(config.trunks)
    lines = list(config.lines)
    origins.update({("trunk", t.name): "config" for t in trunks})
    origins.update({("line", line.name): "config" for line in lines})
    shadowed: list[str] = []
    for row in await storage.records("trunks"):
        if ("trunk", row["name"]) in origins:
            shadowed.append(f"trunk {row['name']}")
            continue
        try:
            trunks.append(Trunk.from_settings(row["name"], row["settings"], row["enabled"]))
        except TrunkError:
            shadowed.append(f"trunk {row['name']} (invalid)")
            continue
        origins[("trunk", row["name"])] = "database"
    for row in await storage.records("lines"):
        if ("line", row["name"]) in origins:
            shadowed.append(f"line {row['name']}")
            continue
        try:
            lines.append(Line.from_settings(row["name"], row["settings"]))
        except TrunkError:
            shadowed.append(f"line {row['name']} (invalid)")
            continue
        origins[("line", row["name"])] = "database"
    return Provisioned(trunks, lines, origins, shadowed)


@dataclass(frozen=True)
class TrunkChanges:
    """What `trunk add|update` was given; None leaves a setting as it is."""

    sources: tuple[str, ...] | None = None
    add_sources: tuple[str, ...] = ()
    remove_sources: tuple[str, ...] = ()
    transports: tuple[str, ...] | None = None
    add_transports: tuple[str, ...] = ()
    remove_transports: tuple[str, ...] = ()
    username: str | None = None
    password: str | None = None
    realm: str | None = None
    auth_algorithms: tuple[str, ...] | None = None
    auth_allow_rfc2069: bool | None = None
    no_auth: bool = False
    registrar: str | None = None
    register_username: str | None = None
    register_password: str | None = None
    register_realm: str | None = None
    expiry: int | None = None
    contact_user: str | None = None
    no_register: bool = False
    codecs: tuple[str, ...] | None = None
    max_calls: int | None = None
    srtp: str | None = None

    def apply(self, name: str, enabled: bool, settings: dict[str, Any]) -> Trunk:
        """The trunk `settings` (as stored) describe, with these changes; TrunkError when invalid."""
        merged = dict(settings)
        if self.password is not None:
            for key in HA1_FIELDS.values():  # the new password replaces the stored hashes
                merged.pop(key, None)
        elif merged.get("username") and not self.no_auth:
            renamed = [
                option for option, key in (("--username", "username"), ("--realm", "realm"))
                if getattr(self, key) is not None and getattr(self, key) != merged.get(key)
            ]  # fmt: skip
            if renamed:
                raise ProvisioningError(
                    f"changing {' and '.join(renamed)} needs --password again: only digest hashes of "
                    "user:realm:password are stored"
                )
        for key in ("sources", "transports", "username", "password", "realm", "auth_algorithms",
                    "auth_allow_rfc2069", "codecs", "max_calls", "srtp"):  # fmt: skip
            if getattr(self, key) is not None:
                merged[key] = getattr(self, key)
        for key, added, removed in (
            ("sources", self.add_sources, self.remove_sources),
            ("transports", self.add_transports, self.remove_transports),
        ):
            if added or removed:
                merged[key] = _edited_list(key, list(merged.get(key, [])), added, removed)
        if self.no_auth:
            merged.update(username="", **{key: "" for key in HA1_FIELDS.values()})
            merged.pop("password", None)
        given = {
            key: value
            for key, value in (
                ("registrar", self.registrar),
                ("username", self.register_username),
                ("password", self.register_password),
                ("realm", self.register_realm),
                ("expiry", self.expiry),
                ("contact_user", self.contact_user),
            )
            if value is not None
        }
        registration = merged.get("registration")
        if self.no_register:
            if given:
                raise ProvisioningError("--no-register cannot be combined with registration options")
            registration = None
        elif given:
            if registration is None and ("registrar" not in given or "username" not in given):
                raise ProvisioningError("a registration needs --register URI and --register-username")
            registration = {**(registration or {}), **given}
        merged["registration"] = registration
        return Trunk.from_settings(name, merged, enabled)


class Provisioning:
    """The operations behind `voiceline trunk|line`; every bad input raises ProvisioningError."""

    def __init__(self, config: Config, storage: Storage) -> None:
        self.config = config
        self.storage = storage

    # -- trunks --------------------------------------------------------------

    async def add_trunk(self, name: str, changes: TrunkChanges, enabled: bool = True) -> Trunk:
        self._writable("trunk", name, adding=True)
        try:
            trunk = changes.apply(check_name(name, "trunk"), enabled, {})
        except TrunkError as exc:
            raise ProvisioningError(str(exc)) from None
        await self._store(self.storage.add("trunks", name, trunk.settings(), enabled))
        return trunk

    async def update_trunk(self, name: str, changes: TrunkChanges) -> Trunk:
        self._writable("trunk", name)
        current = await self.trunk(name)
        try:
            trunk = changes.apply(name, current.enabled, current.settings())
        except TrunkError as exc:
            raise ProvisioningError(str(exc)) from None
        await self._store(self.storage.update("trunks", name, trunk.settings()))
        return trunk

    async def remove_trunk(self, name: str) -> None:
        self._writable("trunk", name)
        await self._store(self.storage.remove("trunks", name))

    async def enable_trunk(self, name: str, enabled: bool) -> None:
        self._writable("trunk", name)
        await self._store(self.storage.set_enabled(name, enabled))

    async def trunk(self, name: str) -> Trunk:
        provisioned = await load(self.config, self.storage)
        for trunk in provisioned.trunks:
            if trunk.name == name:
                return trunk
        raise ProvisioningError(f"no trunk named {name!r}")

    async def trunk_rows(self) -> list[dict[str, Any]]:
        """Public views (no passwords) with origin and registration status, for list/show."""
        provisioned = await load(self.config, self.storage)
        status = {row["trunk"]: row for row in await self.storage.registration_status()}
        rows = []
        for trunk in provisioned.trunks:
            row = trunk.public()
            row["origin"] = provisioned.origins[("trunk", trunk.name)]
            if trunk.registration is not None:
                row["registration_status"] = _status_view(status.get(trunk.name))
            rows.append(row)
        return rows

    # -- lines ---------------------------------------------------------------

    async def add_line(
        self, name: str, numbers: tuple[str, ...], max_calls: int = 0, journey: LineJourney | None = None
    ) -> Line:
        self._writable("line", name, adding=True)
        journey = journey or LineJourney()
        line = await self._checked_line(
            _line(
                name=check_name(name, "line"),
                numbers=numbers,
                max_calls=max_calls,
                language=journey.language or "",
                prompts=journey.prompts or "",
                journey=journey.overrides,
            )
        )
        await self._store(self.storage.add("lines", name, line.settings()))
        return line

    async def update_line(
        self,
        name: str,
        numbers: tuple[str, ...] | None = None,
        add_numbers: tuple[str, ...] = (),
        remove_numbers: tuple[str, ...] = (),
        max_calls: int | None = None,
        enabled: bool | None = None,
        journey: LineJourney | None = None,
    ) -> Line:
        """Change a database line; None and () leave a setting as it is (journey overrides are added to its own)."""
        self._writable("line", name)
        current = await self.line(name)
        journey = journey or LineJourney()
        edited = _edited_list("numbers", list(current.numbers if numbers is None else numbers), add_numbers, remove_numbers)
        line = await self._checked_line(
            _line(
                current,
                numbers=tuple(edited),
                max_calls=current.max_calls if max_calls is None else max_calls,
                enabled=current.enabled if enabled is None else enabled,
                language=current.language if journey.language is None else journey.language,
                prompts=current.prompts if journey.prompts is None else journey.prompts,
                journey=merged(current.journey, journey.overrides),
            )
        )
        await self._store(self.storage.update("lines", name, line.settings()))
        return line

    async def line(self, name: str) -> Line:
        provisioned = await load(self.config, self.storage)
        for line in provisioned.lines:
            if line.name == name:
                return line
        raise ProvisioningError(f"no line named {name!r}")

    async def _checked_line(self, line: Line) -> Line:
        """`line` if its numbers reach no other line, its journey fits together and its prompts load."""
        try:
            journey = self.config.line_journey(line).validate()
        except JourneyConfigError as exc:
            raise ProvisioningError(str(exc)) from None
        try:
            await asyncio.to_thread(PromptSet.load, journey.prompts.language, journey.prompts.directory or None)
        except PromptError as exc:
            raise ProvisioningError(str(exc)) from None
        provisioned = await load(self.config, self.storage)
        for other in provisioned.lines:
            taken = set(other.numbers) & set(line.numbers)
            if taken and other.name != line.name:
                raise ProvisioningError(f"number {sorted(taken)[0]!r} already reaches line {other.name!r}")
        return line

    async def remove_line(self, name: str) -> None:
        self._writable("line", name)
        await self._store(self.storage.remove("lines", name))

    async def line_rows(self) -> list[dict[str, Any]]:
        provisioned = await load(self.config, self.storage)
        return [
            {**line.public(), "origin": provisioned.origins[("line", line.name)]} for line in provisioned.lines
        ]

    # -- helpers -------------------------------------------------------------

    def _writable(self, kind: str, name: str, adding: bool = False) -> None:
        in_config = [item.name for item in (self.config.trunks if kind == "trunk" else self.config.lines)]
        if name in in_config:
            verb = "already exists in" if adding else "is defined in"
            raise ProvisioningError(f"{kind} {name!r} {verb} the config file; edit the file instead")

    @staticmethod
    async def _store(operation: Any) -> None:
        try:
            await operation
        except UnknownName as exc:
            raise ProvisioningError(str(exc)) from None
        except StorageUnavailable:
            raise  # not the admin's mistake: the command reports it as such
        except StorageError as exc:  # DuplicateName and friends
            raise ProvisioningError(str(exc)) from None


def _line(base: Line | None = None, **fields: Any) -> Line:
    """A new line of `fields`, or `base` with `fields` changed; ProvisioningError saying why not."""
    try:
        return Line(**fields) if base is None else replace(base, **fields)
    except TrunkError as exc:
        raise ProvisioningError(str(exc)) from None


def _edited_list(what: str, items: list[str], added: tuple[str, ...], removed: tuple[str, ...]) -> list[str]:
    """`items` with `removed` taken out (each must be there) and `added` appended (once)."""
    missing = [item for item in removed if item not in items]
    if missing:
        raise ProvisioningError(f"{missing[0]!r} is not one of the {what} ({', '.join(items) or 'none'})")
    kept = [item for item in items if item not in removed]
    return kept + [item for item in dict.fromkeys(added) if item not in kept]


def _status_view(row: dict[str, Any] | None) -> dict[str, Any]:
    if row is None:
        return {"state": "unknown", "detail": "the server has not reported yet"}
    return {
        "state": row["state"],
        "detail": row["detail"],
        "updated": _when(row["updated_at"]),
        "expires": _when(row["expires_at"]),
        "next_attempt": _when(row["next_attempt"]),
    }


def _when(unix_time: float | None) -> str | None:
    if unix_time is None:
        return None
    return datetime.fromtimestamp(unix_time, UTC).isoformat(timespec="seconds")


def wall_time(loop_time: float | None, loop_now: float) -> float | None:
    """A loop-clock time as unix time (for what admins read)."""
    return None if loop_time is None else time.time() + (loop_time - loop_now)
