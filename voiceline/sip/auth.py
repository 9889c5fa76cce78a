"""HTTP digest authentication for SIP (RFC 3261 section 22, RFC 7616/8760): MD5 and SHA-256, qop=auth.

Sans-I/O: `DigestServer` issues challenges and checks credentials against a
clock it is given; `DigestClient` answers challenges. Neither logs, and neither
puts a password or a response hash into an exception.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
import secrets
import struct
from collections import OrderedDict
from dataclasses import dataclass

ALGORITHMS = {"MD5": "md5", "SHA-256": "sha256"}
# Offered in this order: the stronger first (RFC 8760 section 2.4).
OFFERED = ("SHA-256", "MD5")

_PARAM = re.compile(r'\s*([A-Za-z0-9_\-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*(?:,|$)')


class DigestError(ValueError):
    """A challenge or credentials header that cannot be used."""


def parse_digest(value: str) -> dict[str, str]:
    """The parameters of `Digest k=v, k="v"` (names lower-cased); DigestError unless it is Digest."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        raise DigestError("not a Digest header")
    params: dict[str, str] = {}
    position = 0
    rest = rest.strip()
    while position < len(rest):
        match = _PARAM.match(rest, position)
        if match is None or match.end() == position:
            raise DigestError("malformed Digest parameters")
        quoted, bare = match.group(2), match.group(3)
        params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        position = match.end()
    return params


def _hash(algorithm: str, text: str) -> str:
    return hashlib.new(ALGORITHMS[algorithm], text.encode("utf-8")).hexdigest()


def digest_response(
    algorithm: str,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    nc: str = "",
    cnonce: str = "",
    qop: str = "",
) -> str:
    ha1 = _hash(algorithm, f"{username}:{realm}:{password}")
    ha2 = _hash(algorithm, f"{method}:{uri}")
    if qop:
        return _hash(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _hash(algorithm, f"{ha1}:{nonce}:{ha2}")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- server side ------------------------------------------------------------------


class Verdict(enum.Enum):
    OK = "ok"
    CHALLENGE = "challenge"  # no or unusable credentials: send a fresh challenge
    STALE = "stale"  # right password, old nonce: challenge again with stale=true
    FAILED = "failed"  # wrong username or password, or a replayed nonce count


@dataclass
class DigestServer:
    """Stateless nonces (time + HMAC) with a bounded table of the last nonce count seen per nonce."""

    realm: str
    algorithms: tuple[str, ...] = OFFERED  # challenged in this order; others are refused
    nonce_lifetime: float = 300.0
    max_tracked_nonces: int = 4096

    def __post_init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._counts: OrderedDict[str, int] = OrderedDict()

    def challenges(self, now: float, stale: bool = False) -> list[str]:
        """WWW-Authenticate (or Proxy-Authenticate) values, one per algorithm, sharing one nonce."""
        nonce = self._new_nonce(now)
        extra = ", stale=true" if stale else ""
        return [
            f'Digest realm={_quote(self.realm)}, nonce="{nonce}", algorithm={algorithm}, qop="auth"{extra}'
            for algorithm in self.algorithms
        ]

    def check(self, authorization: str, method: str, username: str, password: str, now: float) -> Verdict:
        """A Verdict for one Authorization header value against the expected credentials."""
        try:
            params = parse_digest(authorization)
        except DigestError:
            return Verdict.CHALLENGE
        algorithm = params.get("algorithm", "MD5").upper()
        nonce = params.get("nonce", "")
        if algorithm not in self.algorithms or params.get("realm") != self.realm or "response" not in params:
            return Verdict.CHALLENGE
        issued = self._nonce_time(nonce)
        if issued is None:
            return Verdict.CHALLENGE
        qop = params.get("qop", "")
        nc = params.get("nc", "")
        if qop not in ("", "auth") or (qop and not re.fullmatch(r"[0-9a-fA-F]{8}", nc)):
            return Verdict.CHALLENGE
        expected = digest_response(
            algorithm, username, self.realm, password, method, params.get("uri", ""), nonce, nc, params.get("cnonce", ""), qop
        )
        if params.get("username") != username or not hmac.compare_digest(expected, params["response"].lower()):
            return Verdict.FAILED
        if now - issued > self.nonce_lifetime:
            return Verdict.STALE
        if qop:
            count = int(nc, 16)
            if count <= self._counts.get(nonce, 0):
                return Verdict.FAILED  # a replayed (or reordered) request
            self._counts[nonce] = count
            self._counts.move_to_end(nonce)
            while len(self._counts) > self.max_tracked_nonces:
                self._counts.popitem(last=False)
        return Verdict.OK

    def _new_nonce(self, now: float) -> str:
        stamp = struct.pack(">d", now) + secrets.token_bytes(8)
        mac = hmac.new(self._key, stamp, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(stamp + mac).decode().rstrip("=")

    def _nonce_time(self, nonce: str) -> float | None:
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except ValueError:
            return None
        if len(raw) != 32:
            return None
        stamp, mac = raw[:16], raw[16:]
        if not hmac.compare_digest(mac, hmac.new(self._key, stamp, hashlib.sha256).digest()[:16]):
            return None
        return float(struct.unpack(">d", stamp[:8])[0])


# -- client side ------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    realm: str
    nonce: str
    algorithm: str
    qop: str  # "auth" or "" (RFC 2069 style)
    opaque: str | None
    stale: bool


def pick_challenge(values: list[str], realm: str | None = None) -> Challenge | None:
    """The strongest usable challenge among WWW-/Proxy-Authenticate values (of `realm`, when given), or None."""
    usable: list[Challenge] = []
    for value in values:
        try:
            params = parse_digest(value)
        except DigestError:
            continue
        algorithm = params.get("algorithm", "MD5").upper()
        qops = [q.strip().lower() for q in params.get("qop", "").split(",") if q.strip()]
        if algorithm not in ALGORITHMS or "nonce" not in params or (qops and "auth" not in qops):
            continue
        if realm is not None and params.get("realm") != realm:
            continue
        usable.append(
            Challenge(
                params.get("realm", ""),
                params["nonce"],
                algorithm,
                "auth" if qops else "",
                params.get("opaque"),
                params.get("stale", "").lower() == "true",
            )
        )
    usable.sort(key=lambda c: OFFERED.index(c.algorithm))
    return usable[0] if usable else None


class DigestClient:
    """Answers challenges for one set of credentials, counting uses of each nonce."""

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self._password = password
        self._challenge: Challenge | None = None
        self._nc = 0

    def __repr__(self) -> str:  # never show the password
        return f"DigestClient(username={self.username!r})"

    def accept(self, challenge: Challenge) -> None:
        if self._challenge is None or challenge.nonce != self._challenge.nonce:
            self._nc = 0
        self._challenge = challenge

    @property
    def challenge(self) -> Challenge | None:
        return self._challenge

    def authorization(self, method: str, uri: str) -> str | None:
        """The Authorization value for the next request, or None before any challenge."""
        challenge = self._challenge
        if challenge is None:
            return None
        self._nc += 1
        nc = f"{self._nc:08x}"
        cnonce = secrets.token_hex(8)
        response = digest_response(
            challenge.algorithm, self.username, challenge.realm, self._password, method, uri,
            challenge.nonce, nc, cnonce, challenge.qop,
        )  # fmt: skip
        parts = [
            f"username={_quote(self.username)}",
            f"realm={_quote(challenge.realm)}",
            f"nonce={_quote(challenge.nonce)}",
            f"uri={_quote(uri)}",
            f'response="{response}"',
            f"algorithm={challenge.algorithm}",
        ]
        if challenge.qop:
            parts += [f"qop={challenge.qop}", f"nc={nc}", f'cnonce="{cnonce}"']
        if challenge.opaque is not None:
            parts.append(f"opaque={_quote(challenge.opaque)}")
        return "Digest " + ", ".join(parts)
