"""Privacy helpers: the identity-redacting safety net and random call ids.

Code never hands caller identity to a logger, an exception or storage; `redact`
is the net under that rule, run by the log pipeline over every line. Every
regex here is linear-time: each scan either consumes what it looked at or
fails after a bounded look, so no position is scanned more than a few times.
"""

from __future__ import annotations

import re
import secrets

REDACTED = "[redacted]"

# A quoted display name before an <addr-spec>: `"Alice" <sip:...>`.
_DISPLAY_NAME = re.compile(r'"(?:[^"\\\n]|\\.)*+"(?=\s*<)')

# Schemes whose whole body is a user (number or account) even without an '@':
# tel:+15550001234, sms:..., callto:alice, h323:alice. Hosts never follow bare.
_BARE_USER = re.compile(
    r"\b(?P<scheme>tel|fax|modem|sms|mms|callto|skype|h323|facetime|facetime-audio):"
    r"(?P<user>[^\s@<>\"',]++)",
    re.IGNORECASE,
)

# Anything at all before an '@': the user part of a URI of any scheme (sip,
# sips, mailto, im, pres, xmpp, h323, ...), `user:password@` and e-mail
# addresses. A known scheme prefix is kept for readability; an unknown one goes
# with the user. The match starts only where a token starts, so a token without
# an '@' is scanned once, not once per character.
_TOKEN_CHARS = r"[^\s@<>\"'(),\[\]{}]"
_USER_AT = re.compile(
    rf"(?<!{_TOKEN_CHARS})"
    r"(?P<scheme>(?:sips?|mailto|im|pres|xmpp|h323|iax2?):)?+"
    rf"{_TOKEN_CHARS}++@",
    re.IGNORECASE,
)

# What may stand between the digits of a spelled-out number: spaces (any
# Unicode space, incl. no-break and zero-width), dashes, dots, slashes,
# parentheses, underscores, and the escapes repr() writes for those (\xa0).
_SEPARATOR_CHARS = (
    r"\s\-./()_"
    "\u00ad\u2010-\u2015\u2212\ufe58\ufe63\uff0d"  # soft hyphen, Unicode dashes and minus signs
    "\u00b7\u2022\u2027\u2219\uff0e\u3002"  # middle dots, bullets, full-width and ideographic stops
    "\u2044\u2215\uff0f\uff08\uff09"  # fraction and division slashes, full-width slash and parentheses
    "\u200b-\u200d\u2060\ufeff"  # zero-width spaces and joiners
)
_ESCAPE = r"\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})"
_SEPARATOR = rf"(?:[{_SEPARATOR_CHARS}]|{_ESCAPE})"
MAX_SEPARATORS = 4  # "(555) - 000": at most this many separators between two digits
_ESCAPES = re.compile(_ESCAPE)

# Digit shapes logs need, tried before a number at the same position: ISO dates
# and times (a fraction of at most 3 digits: milliseconds) and IPv4 addresses or networks
# (octets 0-255 without leading zeros, so "15.550.001.234" is a number). Either
# is kept only when no further digits follow it: "2024-01-02 1234" is a number.
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_ISO_TIME = (
    r"(?:19|20)\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])"
    r"(?:[T ](?:[01]\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:[.,]\d{1,3})?)?)?"
    rf"(?!{_SEPARATOR}{{0,{MAX_SEPARATORS}}}\d)"
)
_IPV4 = (
    rf"{_OCTET}(?:\.{_OCTET}){{3}}(?:/(?:3[0-2]|[12]?\d))?"
    rf"(?!{_SEPARATOR}{{0,{MAX_SEPARATORS}}}\d)"
)
# A number: optional '+' and '(', then digits with up to MAX_SEPARATORS
# separators between consecutive digits. `\d` is any Unicode decimal digit.
_NUMBER = rf"\+?\(?\d(?:{_SEPARATOR}{{0,{MAX_SEPARATORS}}}\d)*+"
_DIGITS = re.compile(rf"(?P<keep>{_ISO_TIME}|{_IPV4})|(?P<number>{_NUMBER})")
MIN_DIGITS = 6


def _redact_bare_user(match: re.Match[str]) -> str:
    return f"{match['scheme']}:{REDACTED}"


def _redact_user_at(match: re.Match[str]) -> str:
    return f"{match['scheme'] or ''}{REDACTED}@"


def _redact_number(match: re.Match[str]) -> str:
    number = match["number"]
    if number is None:
        return match[0]
    if "\\" in number:
        number = _ESCAPES.sub("", number)  # hex digits of an escape are not the caller's digits
    return REDACTED if sum(c.isdigit() for c in number) >= MIN_DIGITS else match[0]


def redact(text: str) -> str:
    """Remove caller identity from `text`.

    Gone: quoted display names before `<uri>`, the user of tel:-like URIs, anything
    before an '@' (URI user parts of every scheme, e-mail addresses), and numbers of
    6 or more digits however they are spelled (spaces, dashes, dots, slashes,
    parentheses, Unicode spaces and digits). IPv4 addresses, ISO timestamps and
    short numbers survive; ids meant to survive must avoid digit runs (see
    `new_call_id`).
    """
    text = _DISPLAY_NAME.sub(f'"{REDACTED}"', text)
    text = _BARE_USER.sub(_redact_bare_user, text)
    text = _USER_AT.sub(_redact_user_at, text)
    return _DIGITS.sub(_redact_number, text)


# Consonants only: no digit runs for `redact` to eat, and no accidental words.
_CALL_ID_ALPHABET = "bcdfghjkmnpqrstvwxz"
_CALL_ID_CHARS = 12  # 19**12 ~ 2**51


def new_call_id() -> str:
    """A random opaque id naming a call in logs and events; it has no digits, so it survives `redact`."""
    return "c-" + "".join(secrets.choice(_CALL_ID_ALPHABET) for _ in range(_CALL_ID_CHARS))
