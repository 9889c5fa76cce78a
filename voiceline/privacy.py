"""Privacy helpers: the identity-redacting safety net, keyed pseudonyms, call ids.

Code never hands caller identity to a logger, an exception or storage; `redact`
is the net under that rule, run by the log pipeline over every line. Every
regex here is linear-time: bounded or possessive quantifiers only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from typing import NoReturn

REDACTED = "[redacted]"

# Headers that carry caller identity: the SIP layer never logs their values.
IDENTITY_HEADERS: tuple[str, ...] = (
    "From",
    "To",
    "Contact",
    "P-Asserted-Identity",
    "P-Preferred-Identity",
    "Remote-Party-ID",
    "Privacy",
    "Referred-By",
    "Diversion",
    "History-Info",
)

# A URI scheme and everything up to the end of the token. The token is consumed
# whether or not an '@' follows, so the scan never revisits it (linear time).
_URI = re.compile(r"\b(?P<scheme>sips?|tel):(?P<user>[^\s@<>\"',]*+)(?P<at>@?)", re.IGNORECASE)

# Digit shapes logs need, tried before a phone-like run at the same position:
# ISO dates/timestamps (fraction of at most 5 digits), IPv4 addresses, and a
# pair of short groups (port range "20000-29999", float "0.02"). None contains
# 6 digits in a row, and none may continue into another group.
_KEEP = (
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d{1,5})?)?)?"
    r"|\d{1,3}(?:\.\d{1,3}){3}"
    r"|\d{1,5}[.\-]\d{1,5}"
)
# A phone-like run: optional '+', digits with at most two separators
# (space, dash, dot, parentheses) between consecutive digits.
_RUN = r"\+?\(?\d(?:[ .\-()]{0,2}\d)*+"
_DIGITS = re.compile(rf"(?P<keep>(?:{_KEEP})(?![.\-]?\d))|(?P<run>{_RUN})")
_MIN_DIGITS = 6


def _redact_uri(match: re.Match[str]) -> str:
    scheme, user, at = match["scheme"], match["user"], match["at"]
    if scheme.lower() == "tel":
        return f"{scheme}:{REDACTED}" if user else match[0]
    return f"{scheme}:{REDACTED}@" if user and at else match[0]


def _redact_digits(match: re.Match[str]) -> str:
    run = match["run"]
    if run is None or sum(c.isdigit() for c in run) < _MIN_DIGITS:
        return match[0]
    return REDACTED


def redact(text: str) -> str:
    """Remove caller identity from `text`: URI user parts and runs of 6+ digits.

    IP addresses with ports, ISO timestamps (up to 5 fraction digits), short
    floats and port ranges survive. Any other 6 digits in a row do not, even
    inside a word: ids meant to survive must avoid them (see `new_call_id`).
    """
    return _DIGITS.sub(_redact_digits, _URI.sub(_redact_uri, text))


class Pseudonymizer:
    """Recognises a returning caller for a while without storing who they are.

    Pseudonyms are HMAC-SHA256 under a random in-memory key that is replaced
    every `rotate_after` seconds, after which old pseudonyms no longer match.
    The key never leaves the object: no repr, no pickling.
    """

    __slots__ = ("_clock", "_key", "_rotate_after", "_rotated_at")
    _HEX_CHARS = 32

    def __init__(self, rotate_after: float = 24 * 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        if rotate_after <= 0:
            raise ValueError("rotate_after must be positive")
        self._clock = clock
        self._rotate_after = rotate_after
        self._rotate()

    def _rotate(self) -> None:
        self._key = secrets.token_bytes(32)
        self._rotated_at = self._clock()

    def pseudonym(self, identity: str) -> str:
        if self._clock() - self._rotated_at >= self._rotate_after:
            self._rotate()
        digest = hmac.new(self._key, identity.encode(), hashlib.sha256).hexdigest()
        return digest[: self._HEX_CHARS]

    def __repr__(self) -> str:
        return "<Pseudonymizer>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("Pseudonymizer keys are never serialised")


# Consonants only: no digit runs for `redact` to eat, and no accidental words.
_CALL_ID_ALPHABET = "bcdfghjkmnpqrstvwxz"
_CALL_ID_CHARS = 12  # 19**12 ~ 2**51


def new_call_id() -> str:
    """A random opaque id naming a call in logs and events; it has no digits, so it survives `redact`."""
    return "c-" + "".join(secrets.choice(_CALL_ID_ALPHABET) for _ in range(_CALL_ID_CHARS))
