"""HTTP digest authentication for SIP (RFC 3261 section 22, RFC 7616/8760): MD5 and SHA-256, qop=auth.

Sans-I/O: `DigestServer` issues challenges bound to the requester and checks
answers against stored HA1 values (never a password) on a clock it is given;
`DigestClient` answers challenges. Neither logs, and neither puts a password
or a response hash into an exception.
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
from collections.abc import Mapping
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


def digest_ha1(algorithm: str, username: str, realm: str, password: str) -> str:
    """H(username:realm:password): what a server keeps instead of the password (RFC 7616 section 3.4.2)."""
    return _hash(algorithm, f"{username}:{realm}:{password}")


def response_from_ha1(
    algorithm: str, ha1: str, method: str, uri: str, nonce: str, nc: str = "", cnonce: str = "", qop: str = ""
) -> str:
    ha2 = _hash(algorithm, f"{method}:{uri}")
    if qop:
        return _hash(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _hash(algorithm, f"{ha1}:{nonce}:{ha2}")


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
    ha1 = digest_ha1(algorithm, username, realm, password)
    return response_from_ha1(algorithm, ha1, method, uri, nonce, nc, cnonce, qop)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- server side ------------------------------------------------------------------


class Verdict(enum.Enum):
    OK = "ok"
    CHALLENGE = "challenge"  # no or unusable credentials, or a nonce not issued to this requester: challenge afresh
    STALE = "stale"  # right password, expired nonce: challenge again with stale=true
    FAILED = "failed"  # wrong username or password
    REPLAYED = "replayed"  # right password, but a nonce count already seen or a uri not this request's


# A nonce: issue time (8 bytes) + random (8) + HMAC over those and what it was issued for (16).
_STAMP_BYTES = 16
_NONCE_BYTES = 32
_NC = re.compile(r"[0-9a-fA-F]{8}")
# The nonce count an RFC 2069 answer (no nc) is recorded with: such a nonce is good for one request.
_SINGLE_USE = 1 << 32


@dataclass
class DigestServer:
    """Stateless nonces bound to their requester, with a bounded table of the nonce counts seen.

    A nonce carries its issue time and an HMAC (key random per process, never
    stored) over that time, the realm and `bound_to` (the requester's source
    address), so it can be neither forged nor used from elsewhere. Each
    answer's nonce count must exceed the last one seen for its nonce; when the
    table is full the oldest entries go, and every nonce issued up to the
    newest one that went is then answered as stale, so dropping state never
    reopens a replay.
    """

    realm: str
    algorithms: tuple[str, ...] = OFFERED  # challenged in this order; others are refused
    nonce_lifetime: float = 300.0
    max_tracked_nonces: int = 4096
    allow_rfc2069: bool = False  # accept answers without qop (each nonce then serves one request)

    def __post_init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._counts: OrderedDict[str, tuple[float, int]] = OrderedDict()  # nonce -> (issued, last nc)
        self._forgotten_up_to = float("-inf")  # issue time of the newest nonce dropped from the table

    def challenges(self, now: float, bound_to: str, stale: bool = False) -> list[str]:
        """WWW-Authenticate (or Proxy-Authenticate) values, one per algorithm, sharing one nonce."""
        nonce = self._new_nonce(now, bound_to)
        extra = ", stale=true" if stale else ""
        return [
            f'Digest realm={_quote(self.realm)}, nonce="{nonce}", algorithm={algorithm}, qop="auth"{extra}'
            for algorithm in self.algorithms
        ]

    def check(
        self, authorization: str, method: str, uri: str, username: str, ha1: Mapping[str, str], now: float, bound_to: str
    ) -> Verdict:
        """A Verdict for one Authorization value of a request (`method`, Request-URI `uri`) from `bound_to`.

        `ha1`: the expected credentials as H(username:realm:password) per algorithm.
        """
        try:
            params = parse_digest(authorization)
        except DigestError:
            return Verdict.CHALLENGE
        algorithm = params.get("algorithm", "MD5").upper()
        nonce = params.get("nonce", "")
        if algorithm not in self.algorithms or algorithm not in ha1 or params.get("realm") != self.realm:
            return Verdict.CHALLENGE
        if "response" not in params:
            return Verdict.CHALLENGE
        issued = self._nonce_time(nonce, bound_to)
        if issued is None:
            return Verdict.CHALLENGE
        qop, nc, cnonce = params.get("qop", ""), params.get("nc", ""), params.get("cnonce", "")
        if qop:
            if qop != "auth" or not _NC.fullmatch(nc) or not cnonce:
                return Verdict.CHALLENGE
        elif not self.allow_rfc2069:
            return Verdict.CHALLENGE
        signed_uri = params.get("uri", "")
        expected = response_from_ha1(algorithm, ha1[algorithm], method, signed_uri, nonce, nc, cnonce, qop)
        if params.get("username") != username or not hmac.compare_digest(expected, params["response"].lower()):
            return Verdict.FAILED
        if now - issued > self.nonce_lifetime or issued <= self._forgotten_up_to:
            return Verdict.STALE
        if signed_uri != uri:
            return Verdict.REPLAYED  # an answer captured for another request
        count = int(nc, 16) if qop else _SINGLE_USE
        last = self._counts.get(nonce)
        if last is not None and (not qop or count <= last[1]):
            return Verdict.REPLAYED
        self._remember(nonce, issued, count, now)
        return Verdict.OK

    def _remember(self, nonce: str, issued: float, count: int, now: float) -> None:
        self._counts[nonce] = (issued, count)
        self._counts.move_to_end(nonce)
        # Expired nonces are refused by time anyway; beyond the bound, the oldest go.
        while self._counts:
            oldest, (oldest_issued, _) = next(iter(self._counts.items()))
            if len(self._counts) > self.max_tracked_nonces:
                self._forgotten_up_to = max(self._forgotten_up_to, oldest_issued)
            elif now - oldest_issued <= self.nonce_lifetime:
                break
            del self._counts[oldest]

    def _mac(self, stamp: bytes, bound_to: str) -> bytes:
        message = stamp + b"\0" + self.realm.encode() + b"\0" + bound_to.encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()[: _NONCE_BYTES - _STAMP_BYTES]

    def _new_nonce(self, now: float, bound_to: str) -> str:
        stamp = struct.pack(">d", now) + secrets.token_bytes(_STAMP_BYTES - 8)
        return base64.urlsafe_b64encode(stamp + self._mac(stamp, bound_to)).decode().rstrip("=")

    def _nonce_time(self, nonce: str, bound_to: str) -> float | None:
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except ValueError:
            return None
        if len(raw) != _NONCE_BYTES:
            return None
        stamp, mac = raw[:_STAMP_BYTES], raw[_STAMP_BYTES:]
        if not hmac.compare_digest(mac, self._mac(stamp, bound_to)):
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
