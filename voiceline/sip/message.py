"""SIP messages: parse and serialise (RFC 3261 sections 7, 19, 20 and 25).

Sans-I/O: bytes in, dataclasses out, and back again. Every malformed input
raises SipParseError with a fixed text, never a quote of the input: messages
carry caller identity and an exception text can end up in a log.

Header values are kept as text exactly as received (after unfolding);
URI components stay %-escaped. Odd bytes are decoded with "surrogateescape",
so they never crash the parser and serialise back unchanged.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache


class SipParseError(ValueError):
    """A malformed SIP message or header value. The text never quotes the input."""


class UnsupportedVersion(SipParseError):
    """The start line names a SIP version other than 2.0 (a request is answered 505)."""


COMPACT_FORMS: dict[str, str] = {
    "i": "Call-ID",
    "m": "Contact",
    "e": "Content-Encoding",
    "l": "Content-Length",
    "c": "Content-Type",
    "f": "From",
    "s": "Subject",
    "k": "Supported",
    "t": "To",
    "v": "Via",
    "o": "Event",
    "r": "Refer-To",
    "u": "Allow-Events",
    "x": "Session-Expires",
    "b": "Referred-By",
    "a": "Accept-Contact",
    "j": "Reject-Contact",
    "d": "Request-Disposition",
    "y": "Identity",
    "n": "Identity-Info",
}

REASONS: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    199: "Early Dialog Terminated",
    200: "OK",
    202: "Accepted",
    204: "No Notification",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    305: "Use Proxy",
    380: "Alternative Service",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    410: "Gone",
    412: "Conditional Request Failed",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    417: "Unknown Resource-Priority",
    420: "Bad Extension",
    421: "Extension Required",
    422: "Session Interval Too Small",
    423: "Interval Too Brief",
    428: "Use Identity Header",
    429: "Provide Referrer Identity",
    430: "Flow Failed",
    433: "Anonymity Disallowed",
    436: "Bad Identity-Info",
    437: "Unsupported Certificate",
    438: "Invalid Identity Header",
    439: "First Hop Lacks Outbound Support",
    440: "Max-Breadth Exceeded",
    469: "Bad Info Package",
    470: "Consent Needed",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    485: "Ambiguous",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    489: "Bad Event",
    491: "Request Pending",
    493: "Undecipherable",
    494: "Security Agreement Required",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    580: "Precondition Failure",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
    607: "Unwanted",
    608: "Rejected",
}

# Names whose usual spelling is not "Title-Case-Per-Part".
_IRREGULAR_NAMES = (
    "Call-ID",
    "CSeq",
    "WWW-Authenticate",
    "MIME-Version",
    "Min-SE",
    "RAck",
    "RSeq",
    "SIP-ETag",
    "SIP-If-Match",
    "Remote-Party-ID",
    "P-Called-Party-ID",
    "Session-ID",
)
_KNOWN_NAMES: dict[str, str] = {**COMPACT_FORMS, **{name.lower(): name for name in _IRREGULAR_NAMES}}

# Headers whose fields hold comma-separated lists (RFC 3261 section 7.3.1 and extensions).
# Authentication headers and Date contain commas that do not separate values.
_LIST_HEADERS = frozenset(
    {
        "Accept",
        "Accept-Contact",
        "Accept-Encoding",
        "Accept-Language",
        "Accept-Resource-Priority",
        "Alert-Info",
        "Allow",
        "Allow-Events",
        "Call-Info",
        "Contact",
        "Content-Encoding",
        "Content-Language",
        "Error-Info",
        "History-Info",
        "In-Reply-To",
        "P-Asserted-Identity",
        "P-Preferred-Identity",
        "Path",
        "Proxy-Require",
        "Reason",
        "Record-Route",
        "Reject-Contact",
        "Request-Disposition",
        "Require",
        "Resource-Priority",
        "Route",
        "Security-Client",
        "Security-Server",
        "Security-Verify",
        "Service-Route",
        "Supported",
        "Unsupported",
        "Via",
        "Warning",
    }
)

_DIGITS = frozenset("0123456789")
_ALPHA = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_ALNUM = _ALPHA | _DIGITS
_TOKEN_CHARS = _ALNUM | frozenset("-.!%*_+`'~")
# Header and Via parameter values: token, or a host (IPv6 references need [ ] :).
_HEADER_PARAM_CHARS = _TOKEN_CHARS | frozenset("[]:")
# URI parameter names and values: unreserved, escaped and param-unreserved characters.
_URI_PARAM_CHARS = _ALNUM | frozenset("-_.!~*'()%[]/:&+$")
# Printable ASCII a URI may hold; the rest (space, <, >, quotes ...) would be ambiguous in a header.
_URI_CHARS = frozenset(chr(code) for code in range(0x21, 0x7F)) - frozenset('<>"\\^`{|}#')
_SCHEME_CHARS = _ALNUM | frozenset("+-.")
_HOST_CHARS = _ALNUM | frozenset("-._")

_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_NEEDS_ESCAPE = re.compile(r'([\\"\x00-\x08\x0b\x0c\x0e-\x1f\x7f])')


@lru_cache(maxsize=1024)
def _canonical_name(name: str) -> str:
    known = _KNOWN_NAMES.get(name.lower())
    if known is not None:
        return known
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def _check_line(text: str) -> None:
    # A line break inside a value would let it inject headers when serialised.
    if "\r" in text or "\n" in text:
        raise ValueError("line break in a SIP header or start line")


def _is_token(text: str) -> bool:
    return bool(text) and _TOKEN_CHARS.issuperset(text)


def _parse_uint(text: str, max_digits: int) -> int | None:
    """A decimal of ASCII digits (str.isdigit also takes other scripts), or None."""
    if not text or not _DIGITS.issuperset(text):
        return None
    significant = text.lstrip("0") or "0"
    return int(significant) if len(significant) <= max_digits else None


def _split_top(text: str, separator: str) -> list[str]:
    """Split on a separator outside "quoted strings" and <...>; items are stripped."""
    if separator not in text:
        return [text.strip()]
    if '"' not in text and "<" not in text:
        return [item.strip() for item in text.split(separator)]
    items: list[str] = []
    start = 0
    quoted = angled = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted:
            escaped = char == "\\"
            quoted = char != '"'
        elif angled:
            angled = char != ">"
        elif char == '"':
            quoted = True
        elif char == "<":
            angled = True
        elif char == separator:
            items.append(text[start:index].strip())
            start = index + 1
    items.append(text[start:].strip())
    return items


def _quoted_end(text: str, start: int) -> int:
    """Index just past the quoted string opening at text[start], or -1 if it never closes."""
    index = start + 1
    while index < len(text):
        char = text[index]
        if char == '"':
            return index + 1
        index += 2 if char == "\\" else 1
    return -1


def _quote(text: str) -> str:
    # CR and LF cannot be escaped inside a quoted string: they would end the header line.
    text = text.replace("\r", " ").replace("\n", " ")
    return '"' + _NEEDS_ESCAPE.sub(r"\\\1", text) + '"'


def _parse_params(items: Iterable[str], chars: frozenset[str], error: str) -> dict[str, str | None]:
    """Parameters `name[=value]` (names lower-cased: they are case-insensitive)."""
    params: dict[str, str | None] = {}
    for item in items:
        name, equals, value = item.partition("=")
        name = name.strip().lower()
        value = value.strip()
        if not name or not chars.issuperset(name) or name in params:
            raise SipParseError(error)
        if equals and not _is_param_value(value, chars):
            raise SipParseError(error)
        params[name] = value if equals else None
    return params


def _is_param_value(value: str, chars: frozenset[str]) -> bool:
    if value.startswith('"'):
        return _quoted_end(value, 0) == len(value)
    return bool(value) and chars.issuperset(value)


def _format_params(params: dict[str, str | None]) -> str:
    return "".join(f";{name}" if value is None else f";{name}={value}" for name, value in params.items())


def _is_absolute_uri(text: str) -> bool:
    scheme, colon, rest = text.partition(":")
    return (
        bool(colon and scheme and rest)
        and scheme[0] in _ALPHA
        and _SCHEME_CHARS.issuperset(scheme)
        and _URI_CHARS.issuperset(rest)
    )


def _parse_hostport(text: str, error: str) -> tuple[str, int | None]:
    """`host[:port]` with IPv6 in brackets; the host is returned without them."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not _is_ipv6(host):
            raise SipParseError(error)
    else:
        host, colon, port_text = text.partition(":")
        rest = colon + port_text
        if not host or not _HOST_CHARS.issuperset(host):
            raise SipParseError(error)
    if not rest:
        return host, None
    port = _parse_uint(rest[1:], 5) if rest[0] == ":" else None
    if port is None or port > 65535:
        raise SipParseError(error)
    return host, port


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class Headers:
    """Ordered, case-insensitive multi-map of header fields.

    Names are canonicalised on insert: compact forms expanded, well-known
    names in their usual spelling, unknown names title-cased per dash-separated
    part. get() and get_all() split list-valued headers (Via, Contact, Route ...)
    on top-level commas, so get("Via") is the top Via value.
    """

    __slots__ = ("_fields",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._fields: list[tuple[str, str]] = []
        for name, value in items:
            self.add(name, value)

    def get(self, name: str) -> str | None:
        """The first value: the first list item for list-valued headers, else the first field."""
        key = _canonical_name(name)
        for field_name, value in self._fields:
            if field_name == key:
                values = _field_values(key, value)
                if values:
                    return values[0]
        return None

    def get_all(self, name: str) -> list[str]:
        key = _canonical_name(name)
        return [item for field_name, value in self._fields if field_name == key for item in _field_values(key, value)]

    def add(self, name: str, value: str) -> None:
        self._fields.append(_new_field(name, value))

    def set(self, name: str, value: str) -> None:
        """Replace every field of that name by one, where the first one was (else at the end)."""
        field = _new_field(name, value)
        position = next((i for i, (key, _) in enumerate(self._fields) if key == field[0]), len(self._fields))
        self.remove(name)
        self._fields.insert(position, field)

    def remove(self, name: str) -> None:
        key = _canonical_name(name)
        self._fields = [(field_name, value) for field_name, value in self._fields if field_name != key]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = _canonical_name(name)
        return any(field_name == key for field_name, _ in self._fields)

    def items(self) -> list[tuple[str, str]]:
        return list(self._fields)

    def copy(self) -> Headers:
        clone = Headers()
        clone._fields = list(self._fields)
        return clone

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._fields == other._fields

    def __repr__(self) -> str:
        return f"Headers({self._fields!r})"


def _new_field(name: str, value: str) -> tuple[str, str]:
    key = _canonical_name(name)
    if not _is_token(key):
        raise ValueError("invalid SIP header name")
    _check_line(value)
    return key, value


def _field_values(name: str, value: str) -> list[str]:
    if name not in _LIST_HEADERS:
        return [value]
    return _split_top(value, ",") if value else []


@dataclass
class SipRequest:
    method: str
    uri: str
    headers: Headers
    body: bytes = b""


@dataclass
class SipResponse:
    status: int
    reason: str
    headers: Headers
    body: bytes = b""


SipMessage = SipRequest | SipResponse


def parse_message(data: bytes, max_size: int = 65535) -> SipMessage:
    """Parse one SIP message from a datagram (or a framed stream message).

    Raises SipParseError (UnsupportedVersion for a version other than SIP/2.0)
    for anything malformed, and nothing else for any input.
    """
    if len(data) > max_size:
        raise SipParseError("message too large")
    data = data.lstrip(b"\r\n")  # keep-alive CRLFs may precede the start line
    head_end, body_start = _find_head_end(data)
    start, *lines = _logical_lines(data[:head_end].decode("utf-8", "surrogateescape"))
    if start[:4].upper() == "SIP/":
        status, reason = _parse_status_line(start)
        headers, body, _ = _parse_head_and_body(lines, data[body_start:])
        return SipResponse(status, reason, headers, body)
    method, uri = _parse_request_line(start)
    headers, body, cseq_method = _parse_head_and_body(lines, data[body_start:])
    if cseq_method != method:
        raise SipParseError("CSeq method does not match the request method")
    return SipRequest(method, uri, headers, body)


# What a response must echo (RFC 3261 8.2.6.2).
RESPONSE_ECHO_HEADERS = ("Via", "From", "To", "Call-ID", "CSeq")


def salvage_request_headers(data: bytes) -> Headers | None:
    """The headers a 400/505 must echo, read leniently from a request `parse_message` refused.

    None for responses, ACKs (never answered) and anything missing one of them.
    """
    try:
        head_end, _ = _find_head_end(data.lstrip(b"\r\n"))
        start, *lines = _logical_lines(data.lstrip(b"\r\n")[:head_end].decode("utf-8", "surrogateescape"))
    except SipParseError:
        return None
    if start[:4].upper() == "SIP/" or start[:4].upper() == "ACK ":
        return None
    found: list[tuple[str, str]] = []
    for line in lines:
        name, colon, value = line.partition(":")
        name = _canonical_name(name.strip(" \t"))
        if colon and name in RESPONSE_ECHO_HEADERS:
            found.append((name, value.strip(" \t")))
    if {name for name, _ in found} != set(RESPONSE_ECHO_HEADERS):
        return None
    try:
        return Headers(found)
    except ValueError:
        return None


def _find_head_end(data: bytes) -> tuple[int, int]:
    """Where the header section ends and the body starts (bare LF line ends tolerated)."""
    crlf = data.find(b"\r\n\r\n")
    lf = data.find(b"\n\n")
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, lf + 2
    if crlf >= 0:
        return crlf, crlf + 4
    raise SipParseError("missing end of headers")


def _logical_lines(head: str) -> list[str]:
    """Split the header section into lines, unfolding continuation lines into one SP."""
    lines: list[list[str]] = []  # pieces of each logical line, joined once (linear time)
    for raw in head.split("\n"):
        line = raw[:-1] if raw.endswith("\r") else raw
        if "\r" in line:
            raise SipParseError("malformed header line")
        if line[:1] in (" ", "\t"):
            if len(lines) < 2:  # the start line cannot continue
                raise SipParseError("malformed header line")
            lines[-1].append(line.strip(" \t"))
        else:
            lines.append([line])
    return [" ".join(pieces) for pieces in lines]


def _parse_request_line(line: str) -> tuple[str, str]:
    parts = line.split(" ")
    if len(parts) != 3:  # also rejects extra or trailing spaces (RFC 4475 lwsstart, trws)
        raise SipParseError("malformed request line")
    method, uri, version = parts
    if not _is_token(method):
        raise SipParseError("malformed request method")
    if not _is_absolute_uri(uri):
        raise SipParseError("malformed Request-URI")
    _check_version(version)
    return method, uri


def _parse_status_line(line: str) -> tuple[int, str]:
    version, _, rest = line.partition(" ")
    code, _, reason = rest.partition(" ")
    _check_version(version)
    status = _parse_uint(code, 3) if len(code) == 3 else None
    if status is None or not 100 <= status <= 699:
        raise SipParseError("malformed status code")
    return status, reason


def _check_version(version: str) -> None:
    version = version.upper()
    if version == "SIP/2.0":
        return
    major, dot, minor = version[4:].partition(".")
    if version.startswith("SIP/") and dot and _parse_uint(major, 9) is not None and _parse_uint(minor, 9) is not None:
        raise UnsupportedVersion("unsupported SIP version")
    raise SipParseError("malformed SIP version")


def _header_fields(lines: list[str]) -> Iterator[tuple[str, str]]:
    for line in lines:
        name, colon, value = line.partition(":")
        name = name.rstrip(" \t")
        if not colon or not _is_token(name):
            raise SipParseError("malformed header line")
        yield name, value.strip(" \t")


def _parse_head_and_body(lines: list[str], rest: bytes) -> tuple[Headers, bytes, str]:
    """Headers, body and CSeq method, after checking the headers every message needs."""
    headers = Headers(_header_fields(lines))
    vias = headers.get_all("Via")
    if not vias:
        raise SipParseError("missing Via header")
    for via in vias:
        parse_via(via)
    for name in ("From", "To"):
        value = _exactly_one(headers, name)
        try:
            parse_name_addr(value)
        except SipParseError:
            raise SipParseError(f"malformed {name} header") from None
    call_id = _exactly_one(headers, "Call-ID")
    if not call_id or len(call_id.split()) != 1:
        raise SipParseError("malformed Call-ID header")
    _, cseq_method = parse_cseq(_exactly_one(headers, "CSeq"))
    max_forwards = _at_most_one(headers, "Max-Forwards")
    if max_forwards is not None and _parse_uint(max_forwards, 9) is None:
        raise SipParseError("malformed Max-Forwards header")
    return headers, _frame_body(headers, rest), cseq_method


def _at_most_one(headers: Headers, name: str) -> str | None:
    values = headers.get_all(name)
    if len(values) > 1:
        raise SipParseError(f"duplicate {name} header")
    return values[0] if values else None


def _exactly_one(headers: Headers, name: str) -> str:
    value = _at_most_one(headers, name)
    if value is None:
        raise SipParseError(f"missing {name} header")
    return value


def _frame_body(headers: Headers, rest: bytes) -> bytes:
    """The body: Content-Length octets of the rest (a datagram's extra octets are dropped)."""
    declared = _at_most_one(headers, "Content-Length")
    if declared is None:
        return rest
    length = _parse_uint(declared, 9)
    if length is None:
        raise SipParseError("malformed Content-Length header")
    if length > len(rest):
        raise SipParseError("Content-Length larger than the body")
    return rest[:length]


def serialize(message: SipMessage) -> bytes:
    """Wire form: CRLF line ends, canonical names, Content-Length equal to len(body)."""
    if isinstance(message, SipRequest):
        start = f"{message.method} {message.uri} SIP/2.0"
    else:
        start = f"SIP/2.0 {message.status} {message.reason}"
    _check_line(start)
    lines = [start]
    lines.extend(f"{name}: {value}" for name, value in message.headers.items() if name != "Content-Length")
    lines.append(f"Content-Length: {len(message.body)}")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return head.encode("utf-8", "surrogateescape") + message.body


@dataclass
class SipUri:
    """A sip: or sips: URI. `user` is the whole userinfo (a password, if any, stays in it)."""

    scheme: str
    user: str | None
    host: str
    port: int | None
    params: dict[str, str | None]
    headers: dict[str, str]

    def __str__(self) -> str:
        text = f"{self.scheme}:"
        if self.user is not None:
            text += f"{self.user}@"
        text += _bracketed(self.host)
        if self.port is not None:
            text += f":{self.port}"
        text += _format_params(self.params)
        if self.headers:
            text += "?" + "&".join(f"{name}={value}" for name, value in self.headers.items())
        return text


def parse_uri(text: str) -> SipUri:
    text = text.strip()
    if not _is_absolute_uri(text):
        raise SipParseError("malformed URI")
    scheme, _, rest = text.partition(":")
    scheme = scheme.lower()
    if scheme not in ("sip", "sips"):
        raise SipParseError("unsupported URI scheme")
    user: str | None = None
    if "@" in rest:
        # "@" is legal only as the userinfo delimiter: everywhere else it must be escaped.
        user, _, rest = rest.partition("@")
        if not user or "@" in rest:
            raise SipParseError("malformed URI")
    rest, question, header_text = rest.partition("?")
    hostport, *param_items = rest.split(";")
    host, port = _parse_hostport(hostport, "malformed URI")
    params = _parse_params(param_items, _URI_PARAM_CHARS, "malformed URI")
    headers = _parse_uri_headers(header_text) if question else {}
    return SipUri(scheme, user, host, port, params, headers)


def _parse_uri_headers(text: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in text.split("&"):
        name, equals, value = item.partition("=")
        if not name or not equals:
            raise SipParseError("malformed URI")
        headers[name] = value
    return headers


@dataclass
class NameAddr:
    """A From/To/Contact/Route style value. `params` are the header parameters (tag ...)."""

    display: str | None
    uri: str
    params: dict[str, str | None]

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def __str__(self) -> str:
        display = f"{_quote(self.display)} " if self.display else ""
        return f"{display}<{self.uri}>{_format_params(self.params)}"


def parse_name_addr(text: str) -> NameAddr:
    """Both `"Name" <uri>;params` and `uri;params` (the params of a bare URI belong to the header)."""
    text = text.strip()
    display: str | None = None
    if text.startswith('"'):
        end = _quoted_end(text, 0)
        if end < 0:
            raise SipParseError("malformed name-addr")
        display = _QUOTED_PAIR.sub(r"\1", text[1 : end - 1])
        text = text[end:].lstrip()
        if not text.startswith("<"):
            raise SipParseError("malformed name-addr")
    elif "<" in text:
        words, _, bracketed = text.partition("<")
        tokens = words.split()
        if not all(_is_token(word) for word in tokens):
            raise SipParseError("malformed name-addr")
        display = " ".join(tokens)
        text = "<" + bracketed
    if text.startswith("<"):
        uri, closed, param_text = text[1:].partition(">")
        if not closed:
            raise SipParseError("malformed name-addr")
    else:
        uri, semicolon, param_text = text.partition(";")
        uri = uri.strip()
        param_text = semicolon + param_text
        if "?" in uri or "," in uri:  # such URIs must be enclosed in <> (RFC 3261 section 20)
            raise SipParseError("malformed name-addr")
    if not _is_absolute_uri(uri):
        raise SipParseError("malformed name-addr")
    return NameAddr(display or None, uri, _parse_header_params(param_text, "malformed name-addr"))


def _parse_header_params(text: str, error: str) -> dict[str, str | None]:
    text = text.strip()
    if not text:
        return {}
    if not text.startswith(";"):
        raise SipParseError(error)
    return _parse_params(_split_top(text[1:], ";"), _HEADER_PARAM_CHARS, error)


@dataclass
class Via:
    transport: str
    host: str
    port: int | None
    params: dict[str, str | None]

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    def __str__(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"SIP/2.0/{self.transport} {_bracketed(self.host)}{port}{_format_params(self.params)}"


def parse_via(text: str) -> Via:
    """One Via value: `SIP / 2.0 / UDP host[:port];params` (LWS around the slashes allowed)."""
    head, *param_items = _split_top(text, ";")
    parts = head.split("/", 2)
    if len(parts) != 3:
        raise SipParseError("malformed Via header")
    protocol, version = parts[0].strip(), parts[1].strip()
    words = parts[2].split()
    if protocol.upper() != "SIP" or not _is_token(version) or len(words) != 2 or not _is_token(words[0]):
        raise SipParseError("malformed Via header")
    host, port = _parse_hostport(words[1], "malformed Via header")
    params = _parse_params(param_items, _HEADER_PARAM_CHARS, "malformed Via header")
    return Via(words[0].upper(), host, port, params)


def parse_cseq(text: str) -> tuple[int, str]:
    parts = text.split()
    number = _parse_uint(parts[0], 10) if len(parts) == 2 else None
    if number is None or number >= 2**31 or not _is_token(parts[1]):
        raise SipParseError("malformed CSeq header")
    return number, parts[1]


def response_to(
    request: SipRequest,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> SipResponse:
    """A response echoing Via (all, in order), From, To (+ tag), Call-ID and CSeq, then `headers`."""
    response = Headers(("Via", via) for via in request.headers.get_all("Via"))
    for name in ("From", "To", "Call-ID", "CSeq"):
        value = request.headers.get(name)
        if value is None:
            continue
        if name == "To" and to_tag and parse_name_addr(value).tag is None:
            value += f";tag={to_tag}"
        response.add(name, value)
    for name, value in headers:
        response.add(name, value)
    return SipResponse(status, REASONS.get(status, "") if reason is None else reason, response, body)
