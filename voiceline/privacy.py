"""Privacy helpers: the identity-redacting safety net and random call ids.

Code never hands caller identity to a logger, an exception or storage; `redact`
is the net under that rule, run by the log pipeline over every line. Every
regex here is linear-time: bounded or possessive quantifiers only.
"""

from __future__ import annotations

import re
import secrets

REDACTED = "[redacted]"

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


# Consonants only: no digit runs for `redact` to eat, and no accidental words.
_CALL_ID_ALPHABET = "bcdfghjkmnpqrstvwxz"
_CALL_ID_CHARS = 12  # 19**12 ~ 2**51


def new_call_id() -> str:
    """A random opaque id naming a call in logs and events; it has no digits, so it survives `redact`."""
    return "c-" + "".join(secrets.choice(_CALL_ID_ALPHABET) for _ in range(_CALL_ID_CHARS))
