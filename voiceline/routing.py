"""Trunks and lines as data, and the admission policy built on them (sans-I/O).

A trunk is a carrier connection: the addresses its requests come from (IPs,
CIDRs, host names the asyncio edge resolves), optional inbound digest
credentials, an optional outbound registration, its codecs and a call limit.
A line is a named pairing pool reached by one or more dialled numbers (the
Request-URI user part). Provisioning (config file, database) builds them;
`TrunkDirectory` finds a source's trunk and a number's line; `TrunkPolicy`,
the user agent's `RequestPolicy`, decides per request whether it comes from
a trunk and which line it reaches. `sip` knows none of this: it sees the
policy through its admission interface and a registration as a
`RegistrationTarget`.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import InitVar, dataclass, field, fields
from typing import Any

import structlog

from voiceline.codec_table import CODEC_NAMES
from voiceline.journey_config import LINE_SECTIONS, JourneyConfigError, Override, line_overrides, override_tables
from voiceline.sip.admission import Admission, Admit, Drop, Refuse
from voiceline.sip.auth import ALGORITHMS, DigestError, DigestServer, Verdict, digest_ha1, parse_digest
from voiceline.sip.message import SipParseError, SipRequest, parse_uri
from voiceline.sip.sdp import SRTP_POLICIES

log = structlog.get_logger("voiceline.routing")

TRANSPORTS = ("udp", "tcp", "tls")
ANY_NUMBER = "*"
# Unknown sources are logged at most once per this many seconds (with the count since).
UNKNOWN_SOURCE_LOG_SECONDS = 10.0
NetworkType = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}")
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9\-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9\-]{0,62}))*\.?")
_NUMBER = re.compile(r"[A-Za-z0-9+*#\-_.!~'()%]{1,64}")
_USER = re.compile(r"[A-Za-z0-9\-_.!~*'()%&=+$,;?/]{1,64}")
# Inbound credentials are kept as H(username:realm:password) per digest algorithm, never the password.
HA1_FIELDS = {"SHA-256": "ha1_sha256", "MD5": "ha1_md5"}
_HA1_HEX = {"SHA-256": re.compile(r"[0-9a-f]{64}"), "MD5": re.compile(r"[0-9a-f]{32}")}


class TrunkError(ValueError):
    """A trunk or line setting is invalid; the message names the setting, never a secret."""


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TrunkError(f"{what} name must be 1-63 letters, digits, '.', '-' or '_', starting with a letter or digit")
    return name


def parse_source(text: str) -> NetworkType | str:
    """An IP address or CIDR as a network, or a host name as a (lower-case) string."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    if re.fullmatch(r"[0-9./:]+", text) or not _HOSTNAME.fullmatch(text):
        raise TrunkError(f"source {text!r} is not an IP address, CIDR or host name")
    return text.lower().rstrip(".")


@dataclass(frozen=True)
class Registration:
    """Outbound registration: we REGISTER `username` at `registrar` so the carrier routes calls to us."""

    registrar: str  # sip:host[:port]
    username: str
    password: str = field(default="", repr=False)
    realm: str = ""  # empty: answer the realm the registrar challenges with
    expiry: int = 3600
    contact_user: str = ""  # user part of our Contact; empty: `username`

    def __post_init__(self) -> None:
        try:
            uri = parse_uri(self.registrar)
        except SipParseError:
            raise TrunkError("registration.registrar must be a sip: URI such as sip:registrar.example.net") from None
        if uri.scheme != "sip":
            raise TrunkError("registration.registrar must be a sip: URI")
        if not _USER.fullmatch(self.username):
            raise TrunkError("registration.username must be a SIP user name")
        if self.contact_user and not _USER.fullmatch(self.contact_user):
            raise TrunkError("registration.contact_user must be a SIP user name")
        if not 5 <= self.expiry <= 86400:
            raise TrunkError("registration.expiry must be between 5 and 86400 seconds")

    @property
    def host(self) -> str:
        return parse_uri(self.registrar).host

    @property
    def port(self) -> int:
        return parse_uri(self.registrar).port or 5060

    @property
    def contact(self) -> str:
        return self.contact_user or self.username


@dataclass(frozen=True)
class Trunk:
    name: str
    enabled: bool = True
    transports: tuple[str, ...] = ("udp",)
    sources: tuple[str, ...] = ()  # IPs, CIDRs, host names
    username: str = ""  # inbound digest: when set, INVITEs must authenticate
    # Given (config file, `trunk add`) and turned into the HA1 values at once; never kept.
    password: InitVar[str] = ""
    realm: str = "voiceline"
    # Digest algorithms we challenge with, preferred first; ("MD5",) for equipment without SHA-256.
    auth_algorithms: tuple[str, ...] = ("SHA-256", "MD5")
    ha1_sha256: str = field(default="", repr=False)
    ha1_md5: str = field(default="", repr=False)
    # Accept digest answers without qop (RFC 2069): each nonce then serves one request.
    auth_allow_rfc2069: bool = False
    registration: Registration | None = None
    codecs: tuple[str, ...] = ()  # empty: every codec of media.codecs
    max_calls: int = 0  # 0: no limit
    srtp: str = "off"  # one of SRTP_POLICIES: plain RTP only, either, SRTP only

    def __post_init__(self, password: str) -> None:
        check_name(self.name, "trunk")
        if self.srtp not in SRTP_POLICIES:
            raise TrunkError(f"srtp must be one of {', '.join(SRTP_POLICIES)}")
        if not self.transports or any(t not in TRANSPORTS for t in self.transports):
            raise TrunkError(f"trunk transports must be among {', '.join(TRANSPORTS)}")
        for source in self.sources:
            parse_source(source)
        if self.username and not _USER.fullmatch(self.username):
            raise TrunkError("username must be a SIP user name")
        if not self.realm or '"' in self.realm or "\\" in self.realm:
            raise TrunkError("realm must be a non-empty string without quotes or backslashes")
        if not self.auth_algorithms or any(a not in ALGORITHMS for a in self.auth_algorithms):
            raise TrunkError(f"auth_algorithms must be among {', '.join(ALGORITHMS)}")
        self._set_credentials(password)
        if any(c not in CODEC_NAMES for c in self.codecs):
            raise TrunkError(f"codecs must be among {', '.join(CODEC_NAMES)}")
        if not 0 <= self.max_calls <= 100000:
            raise TrunkError("max_calls must be between 0 (no limit) and 100000")
        if not self.sources and self.registration is None:
            raise TrunkError("a trunk needs sources (IPs, CIDRs, host names) or a registration")

    def _set_credentials(self, password: str) -> None:
        """Hash a given password into the HA1 of each offered algorithm; keep no HA1 of others."""
        given = {algorithm: getattr(self, name) for algorithm, name in HA1_FIELDS.items()}
        if password and any(given.values()):
            raise TrunkError("give either a password or its HA1 values, not both")
        if bool(self.username) != bool(password or any(given.values())):
            raise TrunkError("inbound auth needs both username and password")
        for algorithm, name in HA1_FIELDS.items():
            if algorithm not in self.auth_algorithms:
                value = ""
            elif password:
                value = digest_ha1(algorithm, self.username, self.realm, password)
            else:
                value = given[algorithm]
            object.__setattr__(self, name, value)
            if self.username and algorithm in self.auth_algorithms and not _HA1_HEX[algorithm].fullmatch(value):
                raise TrunkError(
                    f"auth_algorithms: {algorithm} needs the password again (only digest hashes are stored)"
                )

    @property
    def ha1(self) -> dict[str, str]:
        """H(username:realm:password) per offered algorithm; empty without inbound auth."""
        if not self.username:
            return {}
        return {algorithm: getattr(self, HA1_FIELDS[algorithm]) for algorithm in self.auth_algorithms}

    @property
    def networks(self) -> list[NetworkType]:
        return [s for s in map(parse_source, self.sources) if not isinstance(s, str)]

    @property
    def hostnames(self) -> list[str]:
        """Names to resolve: host-name sources and a registrar given by name."""
        names = [s for s in map(parse_source, self.sources) if isinstance(s, str)]
        if self.registration is not None and not _is_ip(self.registration.host):
            names.append(self.registration.host.lower())
        return names

    @property
    def registrar_network(self) -> NetworkType | None:
        """A registrar given by IP address also identifies the trunk: the carrier's proxy sends from it."""
        if self.registration is not None and _is_ip(self.registration.host):
            return ipaddress.ip_network(self.registration.host)
        return None

    @classmethod
    def from_settings(cls, name: str, settings: Mapping[str, Any], enabled: bool = True) -> Trunk:
        """From a config table or stored JSON; TrunkError for unknown keys or wrong types.

        Inbound credentials come as `password` (hashed here) or as the stored HA1 values.
        """
        data = dict(settings)
        registration = data.pop("registration", None)
        password = data.pop("password", "")
        if not isinstance(password, str):
            raise TrunkError("trunk.password: expected a string")
        kwargs = _typed(cls, data, skip={"name", "enabled", "registration"}, what="trunk")
        kwargs["password"] = password
        if registration is not None:
            if not isinstance(registration, Mapping):
                raise TrunkError("registration must be a table")
            kwargs["registration"] = Registration(**_typed(Registration, dict(registration), set(), "registration"))
        return cls(name=name, enabled=enabled, **kwargs)

    def settings(self) -> dict[str, Any]:
        """Everything but name and enabled, as stored: HA1 values, the registration password in the clear."""
        data: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("name", "enabled"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, Registration):
                value = {r.name: getattr(value, r.name) for r in fields(value)}
            elif isinstance(value, tuple):
                value = list(value)
            data[f.name] = value
        return data

    def public(self) -> dict[str, Any]:
        """For `list`/`show`: every setting with passwords replaced by whether one is set."""
        data: dict[str, Any] = {"name": self.name, "enabled": self.enabled}
        for key, value in self.settings().items():
            if key in HA1_FIELDS.values():
                continue
            data[key] = value
            if key == "username":
                data["password"] = "set" if self.username else ""
        if data["registration"] is not None:
            data["registration"]["password"] = "set" if self.registration and self.registration.password else ""
        return data


@dataclass(frozen=True)
class Line:
    """A named pairing pool reached by its dialled numbers (Request-URI user parts); "*" takes any number."""

    name: str
    numbers: tuple[str, ...]
    max_calls: int = 0  # callers on this line at once (waiting or talking); 0: no limit
    enabled: bool = True  # a disabled line answers its numbers' calls 480, like a closed one
    country_code: str = ""  # its callers' country calling code: their numbers are recognised in E.164 form
    language: str = ""  # its prompts' language; "": [prompts] language
    prompts: str = ""  # a directory of its own recordings; "": [prompts] directory
    journey: tuple[Override, ...] = ()  # its own journey settings over the top-level ones

    def __post_init__(self) -> None:
        check_name(self.name, "line")
        if self.country_code and not re.fullmatch(r"[1-9][0-9]{0,2}", self.country_code):
            raise TrunkError("country_code is a country calling code: one to three digits")
        if not self.numbers:
            raise TrunkError("a line needs at least one number")
        for number in self.numbers:
            if not _NUMBER.fullmatch(number):
                raise TrunkError(f"number {number!r} is not a dialled number (a SIP user part without ';' or '@')")
        if not 0 <= self.max_calls <= 100000:
            raise TrunkError("max_calls must be between 0 (no limit) and 100000")

    @classmethod
    def from_settings(cls, name: str, settings: Mapping[str, Any]) -> Line:
        """Its settings, with the journey's sections as tables (`{"waiting": {"max_wait": 300}}`)."""
        data = dict(settings)
        tables = {section: data.pop(section) for section in LINE_SECTIONS if section in data}
        try:
            journey = line_overrides(tables)
        except JourneyConfigError as exc:
            raise TrunkError(f"line: {exc}") from None
        return cls(name=name, journey=journey, **_typed(cls, data, skip={"name", "journey"}, what="line"))

    def settings(self) -> dict[str, Any]:
        own = {"language": self.language, "prompts": self.prompts} if self.language or self.prompts else {}
        country = {"country_code": self.country_code} if self.country_code else {}
        return {
            "numbers": list(self.numbers),
            "max_calls": self.max_calls,
            "enabled": self.enabled,
            **country,
            **own,
            **override_tables(self.journey),
        }

    def public(self) -> dict[str, Any]:
        return {"name": self.name, **self.settings()}


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (lambda v: type(v) is int, "an integer"),
    "bool": (lambda v: type(v) is bool, "true or false"),
    "tuple[str, ...]": (lambda v: isinstance(v, list | tuple) and all(isinstance(i, str) for i in v), "a list of strings"),
}


def _typed(cls: Any, data: dict[str, Any], skip: set[str], what: str) -> dict[str, Any]:
    """Check each setting against the dataclass field's annotation (a string: postponed annotations)."""
    types = {f.name: str(f.type) for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in types or key in skip or types[key] not in _CHECKS:
            raise TrunkError(f"{what}: unknown setting {key!r}")
        check, expected = _CHECKS[types[key]]
        if not check(value):
            raise TrunkError(f"{what}.{key}: expected {expected}")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return kwargs


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def source_network(host: str) -> str:
    """The /24 (IPv4) or /48 (IPv6) around an address, for logs."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return "unknown"
    return str(ipaddress.ip_network(f"{address}/{24 if address.version == 4 else 48}", strict=False))


def dialled_number(request_uri: str) -> str | None:
    """The user part of a sip:/sips: Request-URI without user parameters (";phone-context=...")."""
    try:
        user = parse_uri(request_uri).user
    except SipParseError:
        return None
    if user is None:
        return None
    return user.split(";", 1)[0].split(":", 1)[0]


class TrunkDirectory:
    """Trunks and lines in force, with resolved host names. Immutable: a reload builds a new one."""

    def __init__(
        self, trunks: Iterable[Trunk], lines: Iterable[Line], resolved: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        self.trunks = {t.name: t for t in trunks}
        self.lines = {line.name: line for line in lines}
        self.resolved = dict(resolved or {})
        self._numbers: dict[str, Line] = {}
        for line in self.lines.values():
            for number in line.numbers:
                self._numbers.setdefault(number, line)
        # Most specific network first, so a carrier's /32 beats a broad range of another trunk.
        entries: list[tuple[NetworkType, Trunk]] = []
        for trunk in self.trunks.values():
            if not trunk.enabled:
                continue
            nets = trunk.networks
            if trunk.registrar_network is not None:
                nets.append(trunk.registrar_network)
            for name in trunk.hostnames:
                nets += [ipaddress.ip_network(ip) for ip in self.resolved.get(name, ())]
            entries += [(net, trunk) for net in nets]
        entries.sort(key=lambda entry: (-entry[0].prefixlen, entry[1].name))
        self._networks = entries

    @property
    def hostnames(self) -> set[str]:
        return {name for trunk in self.trunks.values() if trunk.enabled for name in trunk.hostnames}

    def source_trunks(self, host: str) -> list[Trunk]:
        """The trunks of the most specific network holding `host`; broader matches never count."""
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return []
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        found: list[Trunk] = []
        for network, trunk in self._networks:  # most specific first
            if found and network.prefixlen < found_prefix:
                break
            if address.version == network.version and address in network:
                found_prefix: int = network.prefixlen
                found.append(trunk)
        return found

    def identify(self, host: str, transport: str) -> Trunk | None:
        """The trunk requests from `host` over `transport` belong to: one of the most specific match, or none."""
        return next((trunk for trunk in self.source_trunks(host) if transport in trunk.transports), None)

    def line_for(self, number: str | None) -> Line | None:
        if number is not None and number in self._numbers:
            return self._numbers[number]
        return self._numbers.get(ANY_NUMBER)


# -- admission ---------------------------------------------------------------------


def _credentials_for(realm: str, values: list[str]) -> str | None:
    """The first Authorization value answering `realm`."""
    for value in values:
        try:
            if parse_digest(value).get("realm") == realm:
                return value
        except DigestError:
            continue
    return None


class TrunkPolicy:
    """The user agent's RequestPolicy: admission by trunk (source address, transport, digest) and line (dialled number).

    Refusals are counted by reason in `refused` (the app moves them to the
    hourly statistics); nothing about the request other than the trunk's
    name and an unknown source's address is ever logged.
    """

    def __init__(
        self,
        directory: TrunkDirectory,
        clock: Callable[[], float],
        active_calls: Callable[[str], int],
        drop_unknown: bool = False,
    ) -> None:
        self.directory = directory
        self.drop_unknown = drop_unknown
        self.refused: Counter[str] = Counter()
        self._clock = clock
        self._active_calls = active_calls
        self._digest: dict[tuple[str, str, tuple[str, ...], bool], DigestServer] = {}
        self._unknown_logged_at = float("-inf")
        self._unknown_since_log = 0

    def check(self, request: SipRequest, source: tuple[str, int], transport: str) -> Admission:
        admitted = self.check_source(source, transport)
        if not isinstance(admitted, Admit) or request.method != "INVITE":
            return admitted
        trunk = self.directory.trunks[admitted.trunk]
        if trunk.username:
            refusal = self._authenticate(trunk, request, source[0])
            if refusal is not None:
                return refusal
        line = self.directory.line_for(dialled_number(request.uri))
        if line is None:
            self.refused["unknown_number"] += 1
            return Refuse(404)
        if trunk.max_calls and self._active_calls(trunk.name) >= trunk.max_calls:
            self.refused["trunk_busy"] += 1
            log.info("trunk.busy", trunk=trunk.name, max_calls=trunk.max_calls)
            return Refuse(503, (("Retry-After", "30"),))
        return Admit(trunk.name, line.name, trunk.codecs, trunk.srtp, line.country_code)

    def check_source(self, source: tuple[str, int], transport: str, count: bool = True) -> Admission:
        trunk = self.directory.identify(source[0], transport.lower())
        if trunk is not None:
            return Admit(trunk.name)
        candidates = self.directory.source_trunks(source[0])
        if not candidates:
            if count:
                self._unknown_source(source[0])
            return Drop() if self.drop_unknown else Refuse(403)
        if count:  # the most specific trunk does not take this transport: a broader one never takes over
            self.refused["wrong_transport"] += 1
            log.warning("trunk.wrong_transport", trunk=candidates[0].name, transport=transport.lower())
        return Refuse(403)

    def trunk_address(self, trunk: str, host: str) -> str | None:
        configured = self.directory.trunks.get(trunk)
        name = host.lower().rstrip(".")
        if configured is None or name not in configured.hostnames:
            return None  # a name the caller chose: never resolved
        addresses = self.directory.resolved.get(name, ())
        return addresses[0] if addresses else None

    def _authenticate(self, trunk: Trunk, request: SipRequest, host: str) -> Refuse | None:
        key = (trunk.name, trunk.realm, trunk.auth_algorithms, trunk.auth_allow_rfc2069)
        server = self._digest.get(key)
        if server is None:
            server = self._digest[key] = DigestServer(
                trunk.realm, trunk.auth_algorithms, allow_rfc2069=trunk.auth_allow_rfc2069
            )
        now = self._clock()
        # A nonce is good only from the address it was sent to.
        verdict = Verdict.CHALLENGE
        credentials = _credentials_for(trunk.realm, request.headers.get_all("Authorization"))
        if credentials is not None:
            verdict = server.check(credentials, request.method, request.uri, trunk.username, trunk.ha1, now, host)
        if verdict is Verdict.OK:
            return None
        if verdict is Verdict.FAILED:
            self.refused["auth_failed"] += 1
            log.warning("trunk.auth_failed", trunk=trunk.name)
            return Refuse(403)
        if verdict is Verdict.REPLAYED:
            self.refused["auth_replayed"] += 1
            log.warning("trunk.auth_replayed", trunk=trunk.name)
        stale = verdict is Verdict.STALE
        challenges = server.challenges(now, host, stale=stale)
        return Refuse(401, tuple(("WWW-Authenticate", value) for value in challenges))

    def _unknown_source(self, host: str) -> None:
        self.refused["unknown_source"] += 1
        self._unknown_since_log += 1
        now = self._clock()
        if now - self._unknown_logged_at >= UNKNOWN_SOURCE_LOG_SECONDS:
            # The network (/24, /48) is what an admin needs to spot a carrier that is not provisioned,
            # without pinpointing one person's phone; no header content is logged.
            log.warning(
                "sip.unknown_source",
                source_network=source_network(host),
                refused=self._unknown_since_log,
                action="drop" if self.drop_unknown else "403",
            )
            self._unknown_logged_at = now
            self._unknown_since_log = 0
