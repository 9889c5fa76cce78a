"""Who is calling, as far as recognising a returning caller needs: a pseudonym kept in memory only.

A caller's asserted identity (the first P-Asserted-Identity, else the From
user) is normalised (E.164 where the line's country code is known) and keyed
with HMAC-SHA256 under a random key that lives only in this process and
rotates every `rotation` seconds. A rotated-out key is kept only while calls
that started under it last; a restart forgets every key, so no pseudonym can
ever be recomputed. A caller without a usable identity (anonymous From,
`Privacy: id` without P-Asserted-Identity, no user part) is `withheld` and
gets a fresh random pseudonym per call.

The identity itself never leaves `voiceline.sip`: what leaves is the
pseudonym, the number of the key it was made under and the withheld flag.
Nothing here logs or raises with an identity in it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from voiceline.sip.message import Headers, SipParseError, parse_name_addr, parse_uri

PSEUDONYM_BYTES = 8  # 16 hex digits: unique among a day's callers, useless without the key
_VISUAL_SEPARATORS = re.compile(r"[\s\-.()/]")  # RFC 3966 visual separators, and spaces
_DIGITS = re.compile(r"\+?[0-9]{3,20}")
_ANONYMOUS = ("anonymous", "unknown", "unavailable", "restricted", "withheld", "private")


@dataclass(frozen=True)
class Pseudonym:
    """What leaves sip of who is calling: never the identity."""

    value: str = field(repr=False)  # hex; "" for a call with none (outbound)
    key_epoch: int  # which key made it (withheld callers': the key current at the time)
    withheld: bool


def asserted_identity(headers: Headers, country_code: str = "") -> str | None:
    """The caller's normalised identity, or None when withheld or unusable."""
    privacy = {item.strip().lower() for value in headers.get_all("Privacy") for item in value.split(";")}
    asserted = headers.get("P-Asserted-Identity")
    if asserted:
        identity = _normalise(asserted.split(",")[0], country_code)
        if identity is not None:
            return identity
    if "id" in privacy:
        return None  # the caller asked that its identity be withheld, and nobody asserts it
    return _normalise(headers.get("From") or "", country_code)


def _normalise(name_addr: str, country_code: str) -> str | None:
    """`+4930123456` for numbers (E.164 where it can tell), `sip:user@host` for names; None: anonymous."""
    try:
        uri = parse_name_addr(name_addr).uri
    except SipParseError:
        return None
    scheme, _, rest = uri.partition(":")
    if scheme.lower() == "tel":
        user, host = rest.split(";")[0], ""
    else:
        try:
            parsed = parse_uri(uri)
        except SipParseError:
            return None
        if parsed.user is None:
            return None
        user, host = parsed.user.split(";")[0].split(":")[0], parsed.host.lower()
    if not user or user.lower() in _ANONYMOUS or host.endswith("anonymous.invalid"):
        return None
    number = _VISUAL_SEPARATORS.sub("", user)
    if _DIGITS.fullmatch(number):
        return e164(number, country_code)
    return f"sip:{user.lower()}@{host}"


def e164(number: str, country_code: str) -> str:
    """`+` and digits when the number says its country (`+`, `00`) or the line's country code is known.

    A national number with its trunk prefix (`0301234`) takes the country code in
    its place; one without (NANP's ten digits) is taken as national when it does
    not already start with the country code. Without a country code, digits stay
    as they came.
    """
    if number.startswith("+"):
        return number
    if number.startswith("00"):
        return "+" + number[2:]
    if not country_code:
        return number
    if number.startswith("0"):
        return f"+{country_code}{number[1:]}"
    if number.startswith(country_code) and len(number) > 10:
        return "+" + number
    return f"+{country_code}{number}"


@dataclass
class _Key:
    secret: bytes = field(repr=False)
    epoch: int
    started: float
    calls: int = 0  # live calls whose pseudonym it made


class Pseudonyms:
    """The in-memory keys: the current one, and rotated-out ones only while their calls last."""

    def __init__(self, rotation: float, new_secret: Callable[[], bytes] = lambda: secrets.token_bytes(32)) -> None:
        if rotation <= 0:
            raise ValueError("the key rotation must be positive")
        self.rotation = rotation
        self._new_secret = new_secret
        self._keys: dict[int, _Key] = {}
        self._current: _Key | None = None
        self._next_epoch = 0

    @property
    def keys_held(self) -> int:
        return len(self._keys)

    def for_call(self, identity: str | None, now: float) -> Pseudonym:
        """The pseudonym of a call starting `now`; `release(epoch)` when it ends."""
        key = self._key(now)
        key.calls += 1
        if identity is None:
            return Pseudonym(secrets.token_hex(PSEUDONYM_BYTES), key.epoch, withheld=True)
        digest = hmac.new(key.secret, identity.encode(), hashlib.sha256).digest()
        return Pseudonym(digest[:PSEUDONYM_BYTES].hex(), key.epoch, withheld=False)

    def release(self, epoch: int) -> None:
        """A call made under `epoch` ended: a rotated-out key goes with its last call."""
        key = self._keys.get(epoch)
        if key is None:
            return
        key.calls -= 1
        if key.calls <= 0 and key is not self._current:
            del self._keys[epoch]

    @property
    def expires_at(self) -> float | None:
        """When the current key stops making pseudonyms (`expire` is due then)."""
        return None if self._current is None else self._current.started + self.rotation

    def expire(self, now: float) -> None:
        """Retire the current key once its time is over (it goes now, or with its last call)."""
        current = self._current
        if current is not None and now >= current.started + self.rotation:
            self._current = None
            if current.calls <= 0:
                del self._keys[current.epoch]

    def _key(self, now: float) -> _Key:
        self.expire(now)
        if self._current is None:
            self._current = self._keys[self._next_epoch] = _Key(self._new_secret(), self._next_epoch, now)
            self._next_epoch += 1
        return self._current
