"""Configuration: embedded defaults, an optional TOML file, then command-line overrides.

`config/voiceline.toml` documents every key with its default; a test keeps it
equal to the defaults below.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    # Port 0 lets the OS pick a free port (handy in tests); the bound one is logged.
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{what}: {host!r} is not an IP address") from None
    return host, int(port)


def parse_port_range(text: str, what: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not sep or not lo.isdigit() or not hi.isdigit():
        raise ConfigError(f"{what}: expected LO-HI, got {text!r}")
    low, high = int(lo), int(hi)
    if not 1024 <= low < high < 65536 or high - low < 3:
        raise ConfigError(f"{what}: range {text!r} must lie within 1024-65535 and hold at least 4 ports")
    return low, high


@dataclass(frozen=True)
class SipConfig:
    listen: str = "0.0.0.0:5060"
    public_address: str = ""
    answer_delay: float = 0.5
    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    max_message_size: int = 65535

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_host_port(self.listen, "sip.listen")

    @property
    def advertised_host(self) -> str:
        if self.public_address:
            return self.public_address
        host = self.listen_address[0]
        return "127.0.0.1" if host == "0.0.0.0" else host


@dataclass(frozen=True)
class MediaConfig:
    rtp_ports: str = "20000-29999"
    codecs: tuple[str, ...] = ("PCMU", "PCMA")
    hold_audio: str = ""
    realtime_priority: int = 0

    @property
    def port_range(self) -> tuple[int, int]:
        return parse_port_range(self.rtp_ports, "media.rtp_ports")


@dataclass(frozen=True)
class StorageConfig:
    data_dir: str = "./var"


@dataclass(frozen=True)
class LogConfig:
    format: str = "console"
    level: str = "info"


@dataclass(frozen=True)
class Config:
    sip: SipConfig = field(default_factory=SipConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> Config:
        self.sip.listen_address
        self.media.port_range
        if self.sip.public_address:
            try:
                ipaddress.ip_address(self.sip.public_address)
            except ValueError:
                raise ConfigError("sip.public_address: not an IP address") from None
        if not 0 <= self.sip.answer_delay <= 60:
            raise ConfigError("sip.answer_delay: must be between 0 and 60 seconds")
        for name in ("t1", "t2", "t4"):
            if not 0 < getattr(self.sip, name) <= 60:
                raise ConfigError(f"sip.{name}: must be between 0 and 60 seconds")
        if not 1024 <= self.sip.max_message_size <= 1 << 20:
            raise ConfigError("sip.max_message_size: must be between 1024 and 1048576")
        unknown = [c for c in self.media.codecs if c not in ("PCMU", "PCMA")]
        if unknown or not self.media.codecs:
            raise ConfigError("media.codecs: choose from PCMU, PCMA")
        if self.media.hold_audio and not Path(self.media.hold_audio).is_file():
            raise ConfigError("media.hold_audio: file not found")
        if not 0 <= self.media.realtime_priority <= 99:
            raise ConfigError("media.realtime_priority: must be between 0 (off) and 99")
        if self.log.format not in ("console", "json"):
            raise ConfigError("log.format: must be 'console' or 'json'")
        if self.log.level not in ("debug", "info", "warning", "error"):
            raise ConfigError("log.level: must be debug, info, warning or error")
        return self


_SECTIONS: dict[str, type] = {"sip": SipConfig, "media": MediaConfig, "storage": StorageConfig, "log": LogConfig}


def _section(name: str, cls: Any, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table")
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in {f.name for f in fields(cls)}:
            raise ConfigError(f"{name}.{key}: unknown key")
        default = getattr(defaults, key)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name}.{key}: expected a list of strings")
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif type(value) is not type(default):
            raise ConfigError(f"{name}.{key}: expected {type(default).__name__}")
        kwargs[key] = value
    return replace(defaults, **kwargs)


def from_mapping(data: dict[str, Any]) -> Config:
    sections: dict[str, Any] = {}
    for name, values in data.items():
        if name not in _SECTIONS:
            raise ConfigError(f"[{name}]: unknown section")
        sections[name] = _section(name, _SECTIONS[name], values)
    return Config(**sections).validate()


def load(path: str | Path | None) -> Config:
    """The embedded defaults, overlaid with the TOML file at `path` when given."""
    if path is None:
        return Config().validate()
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file is not valid TOML: {exc}") from None
    return from_mapping(data)
