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

from voiceline.codec_table import CODEC_NAMES
from voiceline.journey_config import SECTIONS as JOURNEY_SECTIONS
from voiceline.journey_config import JourneyConfig, JourneyConfigError, PromptsConfig
from voiceline.keyfile import KEY_FILE_NAME
from voiceline.pairing.safety import SafetySettings
from voiceline.routing import Line, Trunk, TrunkError


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


SIP_TRANSPORTS = ("udp", "tcp")
# User-Agent substrings of SIP scanners and war-diallers (lower case): dropped unanswered.
SCANNER_USER_AGENTS = (
    "friendly-scanner",
    "sipvicious",
    "sipcli",
    "vaxsipuseragent",
    "sip-scan",
    "sundayddr",
    "pplsip",
)


@dataclass(frozen=True)
class SipConfig:
    listen: str = "0.0.0.0:5060"
    transports: tuple[str, ...] = SIP_TRANSPORTS
    listen_tls: str = ""
    tls_certificate: str = ""
    tls_private_key: str = ""
    tls_ca_file: str = ""
    connection_idle_timeout: float = 600.0
    max_connections: int = 1024
    public_address: str = ""
    answer_delay: float = 0.5
    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    max_message_size: int = 65535
    session_expires: int = 1800
    min_session_expires: int = 90
    max_call_duration: float = 14400.0
    drain_timeout: float = 3600.0
    # Stopping (BYEs, unregistering, events, the last writes, closing) as a whole, seconds.
    shutdown_timeout: float = 10.0
    max_calls: int = 500
    invite_rate: float = 50.0
    invite_burst: int = 100
    register_rate: float = 10.0
    register_burst: int = 20
    options_rate: float = 20.0
    options_burst: int = 40
    other_rate: float = 200.0  # every other method, one bucket per source
    other_burst: int = 400
    scanner_user_agents: tuple[str, ...] = SCANNER_USER_AGENTS
    # A request from a source no trunk matches: "reject" (403) or "drop" (no answer).
    unknown_source: str = "reject"
    # Seconds between re-resolving trunk host names.
    resolve_interval: float = 60.0
    # Registration retry backoff: first and longest wait after a failure, seconds.
    register_retry_min: float = 5.0
    register_retry_max: float = 300.0

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_host_port(self.listen, "sip.listen")

    @property
    def tls_address(self) -> tuple[str, int] | None:
        return parse_host_port(self.listen_tls, "sip.listen_tls") if self.listen_tls else None

    @property
    def advertised_host(self) -> str:
        if self.public_address:
            return self.public_address
        host = self.listen_address[0]
        return "127.0.0.1" if host == "0.0.0.0" else host


@dataclass(frozen=True)
class MediaConfig:
    rtp_ports: str = "20000-29999"
    codecs: tuple[str, ...] = CODEC_NAMES  # Opus needs libopus at run time
    hold_audio: str = ""
    inactivity_timeout: float = 60.0
    partner_silence: float = 8.0
    inband_dtmf: bool = True
    realtime_priority: int = 0
    learning_packets: int = 4
    learning_seconds: float = 1.5
    kernel_forwarding: str = "auto"  # auto | off

    @property
    def port_range(self) -> tuple[int, int]:
        return parse_port_range(self.rtp_ports, "media.rtp_ports")


@dataclass(frozen=True)
class StorageConfig:
    data_dir: str = "./var"
    # Seconds between checks for trunk/line changes made by `voiceline trunk|line`.
    poll_interval: float = 1.0
    # Key that encrypts stored registration passwords; empty: secret.key in data_dir.
    secret_key_file: str = ""
    # Seconds between writes of the statistics held in memory: what a crash can lose.
    flush_interval: float = 5.0

    @property
    def key_file(self) -> Path:
        return Path(self.secret_key_file) if self.secret_key_file else Path(self.data_dir) / KEY_FILE_NAME


@dataclass(frozen=True)
class LogConfig:
    format: str = "console"
    level: str = "info"
    library_level: str = "info"  # other libraries' loggers: never below `level`


@dataclass(frozen=True)
class MetricsConfig:
    # Prometheus text endpoint with /metrics, /healthz and /readyz: HOST:PORT; empty: off.
    listen: str = ""

    @property
    def address(self) -> tuple[str, int] | None:
        return parse_host_port(self.listen, "metrics.listen") if self.listen else None


@dataclass(frozen=True)
class MqttConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: str = ""  # empty: the system's trusted CAs
    username: str = ""
    password: str = ""
    client_id: str = ""  # empty: voiceline-NODE
    node: str = ""  # empty: the host name
    topic_prefix: str = "voiceline"  # topics are PREFIX/NODE/...
    gauge_interval: float = 10.0
    queue_size: int = 1000  # events waiting for the broker; more are dropped and counted


@dataclass(frozen=True)
class SafetyConfig:
    """Safety without identity (README "Safety"): what is remembered of callers, by pseudonym, in memory only."""

    key_rotation: float = 86400.0  # seconds a pseudonym key lives; what it made is forgotten with it
    report_threshold: int = 3  # different callers reporting one caller within a key's life: held apart
    cooldown: float = 86400.0  # how long a caller reported that often is held apart
    max_calls_per_hour: int = 30  # per caller; 0: no limit
    accept_withheld: bool = True  # callers who withhold their number may call

    def settings(self, repeat_window: float) -> SafetySettings:
        """What the pairing layer's safety ledger reads; `repeat_window` is `[pairing]`'s."""
        return SafetySettings(
            self.report_threshold, self.cooldown, self.max_calls_per_hour, repeat_window, self.accept_withheld
        )


@dataclass(frozen=True)
class Config:
    sip: SipConfig = field(default_factory=SipConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    # The caller's journey on every line, from the top-level [welcome] ... [help] tables
    # (a line may override any of it, `[lines.help]` included).
    journey: JourneyConfig = field(default_factory=JourneyConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)  # one set for every line: one ledger knows callers across lines
    # Trunks and lines from the config file; the database adds more (`voiceline trunk add`).
    trunks: tuple[Trunk, ...] = (Trunk("loopback", sources=("127.0.0.0/8", "::1"), transports=("udp", "tcp", "tls")),)
    lines: tuple[Line, ...] = (Line("default", ("*",)),)

    def line_journey(self, line: Line) -> JourneyConfig:
        """A line's journey: the top-level sections with the line's own settings on top."""
        journey = self.journey.overridden(line.journey)
        own = {"language": line.language or journey.prompts.language, "directory": line.prompts or journey.prompts.directory}
        return replace(journey, prompts=PromptsConfig(**own))

    def validate(self) -> Config:
        self.sip.listen_address
        self.media.port_range
        self._validate_transports()
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
        if self.sip.min_session_expires < 1:
            raise ConfigError("sip.min_session_expires: must be at least 1 second (RFC 4028 asks for 90)")
        if self.sip.session_expires and self.sip.session_expires < self.sip.min_session_expires:
            raise ConfigError("sip.session_expires: must be 0 (off) or at least sip.min_session_expires")
        if self.sip.max_call_duration < 0 or self.media.inactivity_timeout < 0 or self.media.partner_silence < 0:
            raise ConfigError(
                "sip.max_call_duration, media.inactivity_timeout, media.partner_silence: must be 0 (off) or positive"
            )
        if self.sip.drain_timeout <= 0:
            raise ConfigError("sip.drain_timeout: must be positive")
        if not 0.5 <= self.sip.shutdown_timeout <= 600:
            raise ConfigError("sip.shutdown_timeout: must be between 0.5 and 600 seconds")
        if not 1024 <= self.sip.max_message_size <= 1 << 20:
            raise ConfigError("sip.max_message_size: must be between 1024 and 1048576")
        unknown = [c for c in self.media.codecs if c not in CODEC_NAMES]
        if unknown or not self.media.codecs:
            raise ConfigError(f"media.codecs: choose from {', '.join(CODEC_NAMES)}")
        if self.media.hold_audio and not Path(self.media.hold_audio).is_file():
            raise ConfigError("media.hold_audio: file not found")
        if self.sip.max_calls < 1:
            raise ConfigError("sip.max_calls: must be at least 1")
        for method in ("invite", "register", "options", "other"):
            if getattr(self.sip, f"{method}_rate") <= 0 or getattr(self.sip, f"{method}_burst") < 1:
                raise ConfigError(f"sip.{method}_rate and sip.{method}_burst: must be positive")
        if self.sip.unknown_source not in ("reject", "drop"):
            raise ConfigError("sip.unknown_source: must be 'reject' or 'drop'")
        if not 1 <= self.sip.resolve_interval <= 86400:
            raise ConfigError("sip.resolve_interval: must be between 1 and 86400 seconds")
        if not 0.1 <= self.sip.register_retry_min <= self.sip.register_retry_max <= 86400:
            raise ConfigError("sip.register_retry_min/max: need 0.1 <= min <= max <= 86400 seconds")
        if not 0.1 <= self.storage.poll_interval <= 60:
            raise ConfigError("storage.poll_interval: must be between 0.1 and 60 seconds")
        if not 0.1 <= self.storage.flush_interval <= 300:
            raise ConfigError("storage.flush_interval: must be between 0.1 and 300 seconds")
        for kind, items in (("trunks", self.trunks), ("lines", self.lines)):
            names = [item.name for item in items]
            if len(set(names)) != len(names):
                raise ConfigError(f"[[{kind}]]: names must be unique")
        if not 2 <= self.media.learning_packets <= 50:
            raise ConfigError("media.learning_packets: must be between 2 and 50")
        if not 0 <= self.media.learning_seconds <= 10:
            raise ConfigError("media.learning_seconds: must be between 0 and 10 seconds")
        if self.media.kernel_forwarding not in ("auto", "off"):
            raise ConfigError("media.kernel_forwarding: auto or off")
        if not 0 <= self.media.realtime_priority <= 99:
            raise ConfigError("media.realtime_priority: must be between 0 (off) and 99")
        self.metrics.address
        self._validate_mqtt()
        self._validate_journeys()
        self._validate_safety()
        if self.log.format not in ("console", "json"):
            raise ConfigError("log.format: must be 'console' or 'json'")
        for key in ("level", "library_level"):
            if getattr(self.log, key) not in ("debug", "info", "warning", "error"):
                raise ConfigError(f"log.{key}: must be debug, info, warning or error")
        return self

    def _validate_journeys(self) -> None:
        try:
            self.journey.validate()
        except JourneyConfigError as exc:
            raise ConfigError(str(exc)) from None
        for line in self.lines:
            try:
                self.line_journey(line).validate()
            except JourneyConfigError as exc:
                raise ConfigError(f"[[lines]] {line.name}: {exc}") from None

    def _validate_mqtt(self) -> None:
        mqtt = self.mqtt
        if not 1 <= mqtt.port <= 65535:
            raise ConfigError("mqtt.port: must be between 1 and 65535")
        for key in ("node", "topic_prefix", "client_id"):
            if any(char in getattr(mqtt, key) for char in "+#\0"):
                raise ConfigError(f"mqtt.{key}: must not contain +, # or NUL")
        if not mqtt.topic_prefix or mqtt.topic_prefix.startswith("/") or mqtt.topic_prefix.endswith("/"):
            raise ConfigError("mqtt.topic_prefix: must be non-empty without a leading or trailing /")
        if "/" in mqtt.node:
            raise ConfigError("mqtt.node: must not contain /")
        if not 1 <= mqtt.gauge_interval <= 3600:
            raise ConfigError("mqtt.gauge_interval: must be between 1 and 3600 seconds")
        if not 10 <= mqtt.queue_size <= 1_000_000:
            raise ConfigError("mqtt.queue_size: must be between 10 and 1000000")
        if mqtt.ca_file and not Path(mqtt.ca_file).is_file():
            raise ConfigError("mqtt.ca_file: file not found")
        if mqtt.password and not mqtt.username:
            raise ConfigError("mqtt.password: needs mqtt.username")

    def _validate_safety(self) -> None:
        if not 60 <= self.safety.key_rotation <= 7 * 86400:
            raise ConfigError("safety.key_rotation: must be between 60 seconds and 7 days")
        try:
            self.safety.settings(self.journey.pairing.repeat_window)
        except ValueError as exc:
            raise ConfigError(f"safety: {exc}") from None

    def _validate_transports(self) -> None:
        sip = self.sip
        unknown = [name for name in sip.transports if name not in SIP_TRANSPORTS]
        if unknown or len(set(sip.transports)) != len(sip.transports):
            raise ConfigError("sip.transports: choose from udp, tcp (TLS is sip.listen_tls)")
        if not sip.transports and not sip.listen_tls:
            raise ConfigError("sip.transports: empty and sip.listen_tls unset: nothing would listen")
        if sip.tls_address is not None:
            for key in ("tls_certificate", "tls_private_key"):
                path = getattr(sip, key)
                if not path or not Path(path).is_file():
                    raise ConfigError(f"sip.{key}: a readable file is required when sip.listen_tls is set")
        if sip.tls_ca_file and not Path(sip.tls_ca_file).is_file():
            raise ConfigError("sip.tls_ca_file: file not found")
        if not 1 <= sip.connection_idle_timeout <= 86400:
            raise ConfigError("sip.connection_idle_timeout: must be between 1 and 86400 seconds")
        if sip.max_connections < 1:
            raise ConfigError("sip.max_connections: must be at least 1")


_SECTIONS: dict[str, type] = {
    "sip": SipConfig,
    "media": MediaConfig,
    "storage": StorageConfig,
    "log": LogConfig,
    "metrics": MetricsConfig,
    "mqtt": MqttConfig,
    "safety": SafetyConfig,
}


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


def _entries(name: str, values: Any) -> tuple[Any, ...]:
    """`[[trunks]]` or `[[lines]]`: each table needs a name; the rest are its settings."""
    if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
        raise ConfigError(f"{name}: expected [[{name}]] tables")
    entries: list[Any] = []
    for index, table in enumerate(values):
        settings = dict(table)
        entry_name = settings.pop("name", None)
        if not isinstance(entry_name, str):
            raise ConfigError(f"[[{name}]] #{index + 1}: needs a name")
        try:
            if name == "trunks":
                enabled = settings.pop("enabled", True)
                if not isinstance(enabled, bool):
                    raise TrunkError("enabled: expected true or false")
                entries.append(Trunk.from_settings(entry_name, settings, enabled))
            else:
                entries.append(Line.from_settings(entry_name, settings))
        except TrunkError as exc:
            raise ConfigError(f"[[{name}]] {entry_name}: {exc}") from None
    return tuple(entries)


def from_mapping(data: dict[str, Any]) -> Config:
    sections: dict[str, Any] = {}
    journey: dict[str, Any] = {}  # the journey's sections stand at top level in the file
    for name, values in data.items():
        if name in ("trunks", "lines"):
            sections[name] = _entries(name, values)
        elif name in JOURNEY_SECTIONS:
            journey[name] = _section(name, JOURNEY_SECTIONS[name], values)
        elif name in _SECTIONS:
            sections[name] = _section(name, _SECTIONS[name], values)
        else:
            raise ConfigError(f"[{name}]: unknown section")
    return Config(**sections, journey=JourneyConfig(**journey)).validate()


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
