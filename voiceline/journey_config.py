"""The caller's journey as configured: top-level sections for every line, and a line's own overrides.

Sections and keys (README "The caller's journey"): `[welcome] enabled,
offer_choice`, `[waiting] reassure_every, max_wait`, `[talking] max_talk (0 =
off), warn_before, end_choice_wait, end_choice_spread`, `[pairing] preference_wait, skip_window`,
`[keys] someone_else, talk, listen, keys_again, help, report ("" = off)`,
`[prompts] language, directory ("" = built-in)`, and where the help key
connects: `[help] destination, trunk, method, pass_identity, ring_timeout`
(README "Safety"). A line overrides any of them: the same sections as tables
of the line (`[lines.waiting] max_wait = 300`), its prompts as `language` and
`prompts` (a directory). Overrides are
kept as (section, key, value) triples, so a line stays a frozen, comparable
value; every value is checked against the key's type at once, and the
result against the journey's own rules (`JourneySettings`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from voiceline.pairing.journey import JourneySettings, KeyMap


class JourneyConfigError(ValueError):
    """A journey setting is unknown, of the wrong type or out of range; the message names it."""


@dataclass(frozen=True)
class WelcomeConfig:
    enabled: bool = True
    offer_choice: bool = True


@dataclass(frozen=True)
class WaitingConfig:
    reassure_every: float = 45.0
    max_wait: float = 600.0


@dataclass(frozen=True)
class TalkingConfig:
    max_talk: float = 0.0  # 0: off
    warn_before: float = 60.0
    end_choice_wait: float = 20.0
    end_choice_spread: float = 8.0


@dataclass(frozen=True)
class PairingConfig:
    preference_wait: float = 60.0
    skip_window: float = 120.0
    repeat_window: float = 3600.0  # read by the one safety ledger of every line: no line sets its own


@dataclass(frozen=True)
class KeysConfig:
    someone_else: str = "#"  # "": that feature is off
    talk: str = "1"
    listen: str = "2"
    keys_again: str = "9"
    help: str = "0"
    report: str = "*"


@dataclass(frozen=True)
class PromptsConfig:
    language: str = "en"
    directory: str = ""  # an admin's recordings replacing the built-in files; "": the built-in set


HELP_METHODS = ("invite", "refer")


@dataclass(frozen=True)
class HelpConfig:
    """Where the help key connects a caller (README "Safety")."""

    destination: str = ""  # SIP URI of the help line; empty: the help key plays the safety message only
    trunk: str = ""  # the trunk the help call goes through (its outbound credentials); empty: straight to the URI's host
    method: str = "invite"  # "invite": we call and bridge; "refer": we ask the trunk's carrier to take the caller over
    pass_identity: bool = False  # give the help line the caller's asserted identity (P-Asserted-Identity); never stored
    ring_timeout: float = 30.0  # seconds the help call may ring before the caller is told it could not get through


SECTIONS: dict[str, type] = {
    "welcome": WelcomeConfig,
    "waiting": WaitingConfig,
    "talking": TalkingConfig,
    "pairing": PairingConfig,
    "keys": KeysConfig,
    "prompts": PromptsConfig,
    "help": HelpConfig,
}
LINE_SECTIONS = ("welcome", "waiting", "talking", "pairing", "keys", "help")  # a line's prompts: `language`, `prompts`
SERVICE_WIDE = (("pairing", "repeat_window"),)  # the same for every line: never a line's override

Override = tuple[str, str, Any]  # (section, key, value)


@dataclass(frozen=True)
class JourneyConfig:
    welcome: WelcomeConfig = field(default_factory=WelcomeConfig)
    waiting: WaitingConfig = field(default_factory=WaitingConfig)
    talking: TalkingConfig = field(default_factory=TalkingConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    help: HelpConfig = field(default_factory=HelpConfig)

    def overridden(self, overrides: Iterable[Override]) -> JourneyConfig:
        """This configuration with a line's `overrides` on top."""
        result = self
        for section, key, value in overrides:
            result = replace(result, **{section: replace(getattr(result, section), **{key: value})})
        return result

    def settings(self) -> JourneySettings:
        """The journey's settings; raises JourneyConfigError when they do not fit together."""
        keys = {item.name: getattr(self.keys, item.name) or None for item in fields(KeysConfig)}
        try:
            return JourneySettings(
                welcome=self.welcome.enabled,
                offer_choice=self.welcome.offer_choice,
                reassure_every=self.waiting.reassure_every,
                max_wait=self.waiting.max_wait,
                max_talk=self.talking.max_talk or None,
                warn_before=self.talking.warn_before,
                end_choice_wait=self.talking.end_choice_wait,
                end_choice_spread=self.talking.end_choice_spread,
                preference_wait=self.pairing.preference_wait,
                skip_window=self.pairing.skip_window,
                keys=KeyMap(**keys),
            )
        except ValueError as exc:
            raise JourneyConfigError(str(exc)) from None

    def validate(self) -> JourneyConfig:
        if self.talking.max_talk < 0:
            raise JourneyConfigError("talking.max_talk: must be 0 (off) or positive")
        if not self.prompts.language:
            raise JourneyConfigError("prompts.language: must name a language, e.g. en")
        if self.help.method not in HELP_METHODS:
            raise JourneyConfigError("help.method: must be 'invite' or 'refer'")
        if self.help.destination and not self.help.destination.lower().startswith(("sip:", "sips:")):
            raise JourneyConfigError("help.destination: must be a sip: or sips: URI")
        if not 1 <= self.help.ring_timeout <= 300:
            raise JourneyConfigError("help.ring_timeout: must be between 1 and 300 seconds")
        self.settings()
        return self


def typed_value(section: str, key: str, value: Any) -> Any:
    """`value` as `section.key` takes it (an int for a float key is fine); raises JourneyConfigError."""
    cls = SECTIONS.get(section)
    if cls is None:
        raise JourneyConfigError(f"{section}: unknown section; known: {', '.join(SECTIONS)}")
    defaults = cls()
    if key not in {item.name for item in fields(cls)}:
        raise JourneyConfigError(f"{section}.{key}: unknown key")
    default = getattr(defaults, key)
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if type(value) is not type(default):
        expected = {bool: "true or false", float: "a number", str: "a string"}[type(default)]
        raise JourneyConfigError(f"{section}.{key}: expected {expected}")
    return value


def line_value(section: str, key: str, value: Any) -> Any:
    """`typed_value`, for a line's own setting."""
    if (section, key) in SERVICE_WIDE:
        raise JourneyConfigError(f"{section}.{key}: the same for every line (set it in [{section}])")
    return typed_value(section, key, value)


def line_overrides(tables: Mapping[str, Any]) -> tuple[Override, ...]:
    """A line's section tables (`{"waiting": {"max_wait": 300}}`) as checked overrides, in a stable order."""
    overrides: list[Override] = []
    for name, values in tables.items():
        if name not in LINE_SECTIONS:
            raise JourneyConfigError(f"{name}: not a section a line may set ({', '.join(LINE_SECTIONS)})")
        if not isinstance(values, Mapping):
            raise JourneyConfigError(f"{name}: expected a table of settings")
        overrides += [(name, key, line_value(name, key, value)) for key, value in values.items()]
    return tuple(sorted(overrides, key=lambda item: item[:2]))


def override_tables(overrides: Iterable[Override]) -> dict[str, dict[str, Any]]:
    """The overrides as section tables again (for storage and display)."""
    tables: dict[str, dict[str, Any]] = {}
    for name, key, value in overrides:
        tables.setdefault(name, {})[key] = value
    return tables


def parse_assignment(text: str) -> Override:
    """`waiting.max_wait=300` (the command line's `--set`) as a checked override."""
    dotted, sep, raw = text.partition("=")
    name, dot, key = dotted.strip().partition(".")
    if not sep or not dot or name not in LINE_SECTIONS:
        raise JourneyConfigError(
            f"{text!r}: expected SECTION.KEY=VALUE with a section of {', '.join(LINE_SECTIONS)}, e.g. waiting.max_wait=300"
        )
    default = getattr(SECTIONS[name](), key, None)
    raw = raw.strip()
    value: Any = raw
    if isinstance(default, bool):
        if raw not in ("true", "false"):
            raise JourneyConfigError(f"{name}.{key}: expected true or false, got {raw!r}")
        value = raw == "true"
    elif isinstance(default, float):
        try:
            value = float(raw)
        except ValueError:
            raise JourneyConfigError(f"{name}.{key}: expected a number, got {raw!r}") from None
    return name, key, line_value(name, key, value)


def merged(overrides: Iterable[Override], more: Iterable[Override]) -> tuple[Override, ...]:
    """`overrides` with `more` replacing the same keys."""
    table = {(name, key): value for name, key, value in (*overrides, *more)}
    return tuple(sorted(((name, key, value) for (name, key), value in table.items()), key=lambda item: item[:2]))
