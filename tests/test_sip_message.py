"""SIP message parsing and serialisation, including the RFC 4475 torture messages."""

from __future__ import annotations

import contextlib
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voiceline.sip.message import (
    COMPACT_FORMS,
    REASONS,
    Headers,
    NameAddr,
    SipParseError,
    SipRequest,
    SipResponse,
    UnsupportedVersion,
    parse_cseq,
    parse_message,
    parse_name_addr,
    parse_uri,
    parse_via,
    response_to,
    serialize,
)

TORTURE_DIR = Path(__file__).parent / "data" / "torture"
TORTURE = tomllib.loads((TORTURE_DIR / "manifest.toml").read_text(encoding="utf-8"))

# A number that must never show up in an exception text.
CANARY = "+15550199321"


def torture(name: str) -> bytes:
    return (TORTURE_DIR / f"{name}.sip").read_bytes()


def message(*lines: str, body: str = "") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


INVITE_LINES = (
    "INVITE sip:line@127.0.0.1 SIP/2.0",
    "Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKabc;rport",
    "Max-Forwards: 70",
    'From: "Anon" <sip:anon@127.0.0.1>;tag=f1',
    "To: <sip:line@127.0.0.1>",
    "Call-ID: call-1@127.0.0.1",
    "CSeq: 1 INVITE",
    "Contact: <sip:anon@127.0.0.1:5062>",
)
INVITE = message(*INVITE_LINES, "Content-Length: 0")


def invite() -> SipRequest:
    request = parse_message(INVITE)
    assert isinstance(request, SipRequest)
    return request


def replace_line(prefix: str, new: str | None) -> bytes:
    """INVITE with the line starting with `prefix` replaced (or dropped for None)."""
    lines = [line for line in INVITE_LINES if not line.startswith(prefix)]
    index = next(i for i, line in enumerate(INVITE_LINES) if line.startswith(prefix))
    if new is not None:
        lines.insert(index, new)
    return message(*lines, "Content-Length: 0")


# --- torture messages -----------------------------------------------------------------


def test_every_torture_file_is_in_the_manifest() -> None:
    assert {path.stem for path in TORTURE_DIR.glob("*.sip")} == set(TORTURE)


@pytest.mark.parametrize("name", sorted(TORTURE))
def test_torture_message_outcome(name: str) -> None:
    data = torture(name)
    expected = TORTURE[name]["parse"]
    if expected == "version":
        with pytest.raises(UnsupportedVersion):
            parse_message(data)
    elif expected == "error":
        with pytest.raises(SipParseError) as error:
            parse_message(data)
        assert not isinstance(error.value, UnsupportedVersion)
    else:
        assert expected == "ok"
        assert_round_trips(parse_message(data))


def assert_round_trips(parsed: SipRequest | SipResponse) -> None:
    again = parse_message(serialize(parsed))
    assert type(again) is type(parsed)
    assert again.body == parsed.body
    without_length = [item for item in parsed.headers.items() if item[0] != "Content-Length"]
    assert [item for item in again.headers.items() if item[0] != "Content-Length"] == without_length
    if isinstance(parsed, SipRequest):
        assert isinstance(again, SipRequest)
        assert (again.method, again.uri) == (parsed.method, parsed.uri)
    else:
        assert isinstance(again, SipResponse)
        assert (again.status, again.reason) == (parsed.status, parsed.reason)


def test_wsinv_short_tortuous_invite() -> None:
    parsed = parse_message(torture("wsinv"))
    assert isinstance(parsed, SipRequest)
    assert parsed.method == "INVITE"
    assert parse_uri(parsed.uri).params == {"unknownparam": None}
    headers = parsed.headers
    to = parse_name_addr(headers.get("To") or "")
    assert (to.uri, to.tag) == ("sip:vivekg@chair-dnrc.example.com", "1918181833n")
    sender = parse_name_addr(headers.get("From") or "")
    assert sender.display == 'J Rosenberg \\"'
    assert sender.tag == "98asjd8"
    assert headers.get("Max-Forwards") == "0068"
    assert parse_cseq(headers.get("CSeq") or "") == (9, "INVITE")
    assert headers.get("Subject") == ""
    assert headers.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert headers.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    vias = [parse_via(value) for value in headers.get_all("Via")]
    assert [(via.transport, via.host, via.branch) for via in vias] == [
        ("UDP", "127.0.0.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    contact = parse_name_addr(headers.get("Contact") or "")
    assert contact.display == 'Quoted string ""'
    assert contact.params == {"newparam": "newvalue", "secondparam": None, "q": "0.33"}
    assert len(parsed.body) == 150


def test_intmeth_wide_range_of_characters() -> None:
    parsed = parse_message(torture("intmeth"))
    assert isinstance(parsed, SipRequest)
    assert parsed.method == "!interesting-Method0123456789_*+`.%indeed'~"
    uri = parse_uri(parsed.uri)
    assert uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert uri.host == "example.com"
    to = parse_name_addr(parsed.headers.get("To") or "")
    assert to.display == "BEL:\x07 NUL:\x00 DEL:\x7f"
    sender = parse_name_addr(parsed.headers.get("From") or "")
    assert sender.display == "token1~` token2'+_ token3*%!.-"
    assert sender.params == {"fromparam''~+*_!.-%": '"работающий"', "tag": "_token~1'+`*%!-."}
    assert parsed.headers.get("Call-ID") == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert parsed.headers.get("extensionHeader-!.%*+_`'~") == "\ufeff大停電"
    assert serialize(parsed).startswith(torture("intmeth").split(b"\r\n")[0])


def test_escaped_uris_stay_escaped() -> None:
    parsed = parse_message(torture("escnull"))
    assert parse_uri(parsed.headers.get("To") or "").user == "null-%00-null"
    assert [parse_name_addr(value).uri for value in parsed.headers.get_all("Contact")] == [
        "sip:%00@host5.example.com",
        "sip:%00%00@host5.example.com",
    ]
    esc01 = parse_message(torture("esc01"))
    assert isinstance(esc01, SipRequest)
    assert parse_uri(esc01.uri).user == "sips%3Auser%40example.com"
    contact_uri = parse_uri(parse_name_addr(esc01.headers.get("Contact") or "").uri)
    assert contact_uri.params == {"%6c%72": None, "n%61me": "v%61lue%25%34%31"}


def test_esc02_percent_is_not_an_escape_in_names() -> None:
    parsed = parse_message(torture("esc02"))
    assert isinstance(parsed, SipRequest)
    assert parsed.method == "RE%47IST%45R"
    assert len(parsed.headers.get_all("Contact")) == 2
    assert parsed.headers.get("C%6Fntact") == "<sip:alias2@host2.example.com>"


def test_longreq_keeps_every_via_in_order() -> None:
    parsed = parse_message(torture("longreq"))
    hosts = [parse_via(value).host for value in parsed.headers.get_all("Via")]
    assert hosts == [f"sip{n}.example.com" for n in range(33, 0, -1)] + ["host.example.com"]
    assert parse_name_addr(parsed.headers.get("From") or "").tag == "12" + "982" * 50 + "424"


def test_dblreq_drops_octets_after_content_length() -> None:
    parsed = parse_message(torture("dblreq"))
    assert isinstance(parsed, SipRequest)
    assert parsed.method == "REGISTER"
    assert parsed.body == b""


def test_semiuri_and_multi_line_accept() -> None:
    parsed = parse_message(torture("semiuri"))
    assert isinstance(parsed, SipRequest)
    uri = parse_uri(parsed.uri)
    assert (uri.user, uri.host, uri.params) == ("user;par=u%40example.net", "example.com", {})
    assert parsed.headers.get_all("Accept") == [
        "application/sdp",
        "application/pkcs7-mime",
        "multipart/mixed",
        "multipart/signed",
        "message/sip",
        "message/sipfrag",
    ]


def test_transports() -> None:
    parsed = parse_message(torture("transports"))
    assert [parse_via(value).transport for value in parsed.headers.get_all("Via")] == [
        "UDP",
        "SCTP",
        "TLS",
        "UNKNOWN",
        "TCP",
    ]


def test_mpart01_binary_body_is_framed_by_content_length() -> None:
    parsed = parse_message(torture("mpart01"))
    assert len(parsed.body) == 553
    assert b"\x00" in parsed.body
    assert parsed.body.endswith(b"--7a9cbec02ceef655--\r\n")


def test_reason_phrases() -> None:
    unusual = parse_message(torture("unreason"))
    assert isinstance(unusual, SipResponse)
    assert (unusual.status, unusual.reason) == (200, "= 2**3 * 5**2 но сто девяносто девять - простое")
    empty = parse_message(torture("noreason"))
    assert isinstance(empty, SipResponse)
    assert (empty.status, empty.reason) == (100, "")


def test_semantic_problems_are_left_to_the_layers_above() -> None:
    # Well-formed messages the parser accepts; the user agent rejects them (400/416).
    unknown_scheme = parse_message(torture("unkscm"))
    assert isinstance(unknown_scheme, SipRequest)
    with pytest.raises(SipParseError, match="unsupported URI scheme"):
        parse_uri(unknown_scheme.uri)
    bad_contact = parse_message(torture("regbadct"))
    with pytest.raises(SipParseError):
        parse_name_addr(bad_contact.headers.get("Contact") or "")
    escaped_headers = parse_message(torture("escruri"))
    assert isinstance(escaped_headers, SipRequest)
    assert parse_uri(escaped_headers.uri).headers == {"Route": "%3Csip:example.com%3E"}


def test_cparam01_contact_params_belong_to_the_header() -> None:
    contact = parse_name_addr(parse_message(torture("cparam01")).headers.get("Contact") or "")
    assert contact.uri == "sip:+19725552222@gw1.example.net"
    assert contact.params == {"unknownparam": None}


def test_bcast_second_via_is_kept_as_sent() -> None:
    parsed = parse_message(torture("bcast"))
    assert [parse_via(value).host for value in parsed.headers.get_all("Via")] == ["127.0.0.198", "255.255.255.255"]


# --- parse_message --------------------------------------------------------------------


def test_parse_request() -> None:
    parsed = invite()
    assert (parsed.method, parsed.uri, parsed.body) == ("INVITE", "sip:line@127.0.0.1", b"")
    assert parsed.headers.get("call-id") == "call-1@127.0.0.1"
    assert parsed.headers.items()[0] == ("Via", "SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKabc;rport")


def test_parse_response() -> None:
    parsed = parse_message(
        message(
            "SIP/2.0 486 Busy Here",
            "Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKx",
            "From: <sip:a@127.0.0.1>;tag=1",
            "To: <sip:b@127.0.0.1>;tag=2",
            "Call-ID: c",
            "CSeq: 7 INVITE",
            "Content-Length: 0",
        )
    )
    assert isinstance(parsed, SipResponse)
    assert (parsed.status, parsed.reason) == (486, "Busy Here")


def test_leading_crlfs_and_bare_lf_line_ends() -> None:
    parsed = parse_message(b"\r\n\r\n" + INVITE.replace(b"\r\n", b"\n"))
    assert isinstance(parsed, SipRequest)
    assert parsed.headers.get("CSeq") == "1 INVITE"


def test_folding_and_whitespace_around_colons() -> None:
    parsed = parse_message(replace_line("Contact", "Contact   :\r\n\t<sip:anon@127.0.0.1:5062>\r\n  ;expires=60"))
    assert parsed.headers.get("Contact") == "<sip:anon@127.0.0.1:5062> ;expires=60"


def test_compact_forms_are_expanded() -> None:
    parsed = parse_message(
        message(
            "OPTIONS sip:line@127.0.0.1 SIP/2.0",
            "v: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKc",
            "f: <sip:a@127.0.0.1>;tag=1",
            "t: <sip:line@127.0.0.1>",
            "i: compact",
            "CSeq: 2 OPTIONS",
            "m: <sip:a@127.0.0.1>",
            "k: timer",
            "s: hello",
            "c: text/plain",
            "l: 2",
            body="hi",
        )
    )
    assert [name for name, _ in parsed.headers.items()] == [
        "Via",
        "From",
        "To",
        "Call-ID",
        "CSeq",
        "Contact",
        "Supported",
        "Subject",
        "Content-Type",
        "Content-Length",
    ]
    assert parsed.body == b"hi"


def test_body_framing() -> None:
    longer = INVITE.replace(b"Content-Length: 0", b"Content-Length: 3") + b"abcdef"
    assert parse_message(longer).body == b"abc"
    without_length = INVITE.replace(b"Content-Length: 0\r\n", b"") + b"rest"
    assert parse_message(without_length).body == b"rest"


def test_ack_and_cancel_cseq_name_their_own_method() -> None:
    for method in ("ACK", "CANCEL"):
        renamed = INVITE.replace(b"INVITE sip:", method.encode() + b" sip:")
        assert isinstance(parse_message(renamed.replace(b"1 INVITE", b"1 " + method.encode())), SipRequest)
        with pytest.raises(SipParseError):
            parse_message(renamed)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(replace_line("Via", None), id="missing Via"),
        pytest.param(replace_line("From", None), id="missing From"),
        pytest.param(replace_line("To", None), id="missing To"),
        pytest.param(replace_line("Call-ID", None), id="missing Call-ID"),
        pytest.param(replace_line("CSeq", None), id="missing CSeq"),
        pytest.param(replace_line("Via", "Via: SIP/2.0/UDP"), id="Via without host"),
        pytest.param(replace_line("Via", "Via: SIP/2.0/UDP 127.0.0.1,"), id="Via with empty item"),
        pytest.param(replace_line("From", "From: not a uri"), id="From not a name-addr"),
        pytest.param(replace_line("To", 'To: "open <sip:a@127.0.0.1>'), id="To unterminated quote"),
        pytest.param(replace_line("To", "To: <sip:a@127.0.0.1>\r\nTo: <sip:b@127.0.0.1>"), id="two To"),
        pytest.param(replace_line("Call-ID", "Call-ID:"), id="empty Call-ID"),
        pytest.param(replace_line("Call-ID", "Call-ID: a b"), id="Call-ID with space"),
        pytest.param(replace_line("CSeq", "CSeq: 2147483648 INVITE"), id="CSeq too large"),
        pytest.param(replace_line("CSeq", "CSeq: one INVITE"), id="CSeq not a number"),
        pytest.param(replace_line("CSeq", "CSeq: 1 BYE"), id="CSeq method mismatch"),
        pytest.param(replace_line("Max-Forwards", "Max-Forwards: seventy"), id="Max-Forwards not a number"),
        pytest.param(INVITE.replace(b"Content-Length: 0", b"Content-Length: -1"), id="negative Content-Length"),
        pytest.param(INVITE.replace(b"Content-Length: 0", b"Content-Length: five"), id="Content-Length word"),
        pytest.param(INVITE.replace(b"Content-Length: 0", "Content-Length: \uff15".encode()), id="Content-Length wide"),
        pytest.param(INVITE.replace(b"Content-Length: 0", b"Content-Length: 10"), id="Content-Length too long"),
        pytest.param(INVITE.replace(b"INVITE sip:", b"INV(ITE sip:", 1), id="method not a token"),
        pytest.param(INVITE.replace(b"INVITE sip:", b"INVITE  sip:", 1), id="two spaces in request line"),
        pytest.param(INVITE.replace(b"sip:line@127.0.0.1 SIP", b"line SIP", 1), id="Request-URI without scheme"),
        pytest.param(INVITE.replace(b"SIP/2.0\r\n", b"HTTP/1.1\r\n", 1), id="not SIP"),
        pytest.param(INVITE.replace(b"\r\n\r\n", b"\r\n"), id="no end of headers"),
        pytest.param(INVITE.replace(b"Max-Forwards: 70", b"Max-Forwards 70"), id="header without colon"),
        pytest.param(INVITE.replace(b"Max-Forwards: 70", b"Max Forwards: 70"), id="header name with space"),
        pytest.param(INVITE.replace(b"Max-Forwards: 70", b"Max-Forwards: 7\r0"), id="bare CR in header"),
        pytest.param(INVITE.replace(b"\r\nVia", b"\r\n Via", 1), id="folded start line"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\r\n\r\n", id="only CRLFs"),
    ],
)
def test_malformed_messages(data: bytes) -> None:
    with pytest.raises(SipParseError):
        parse_message(data)


@pytest.mark.parametrize(
    "status_line", ["SIP/2.0 99 Low", "SIP/2.0 700 High", "SIP/2.0 2OO OK", "SIP/2.0 2000 OK", "SIP/2.0"]
)
def test_malformed_status_lines(status_line: str) -> None:
    data = message(
        status_line,
        "Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKx",
        "From: <sip:a@127.0.0.1>;tag=1",
        "To: <sip:b@127.0.0.1>",
        "Call-ID: c",
        "CSeq: 1 INVITE",
    )
    with pytest.raises(SipParseError):
        parse_message(data)


def test_other_sip_versions_are_unsupported() -> None:
    with pytest.raises(UnsupportedVersion):
        parse_message(INVITE.replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1))
    response = serialize(response_to(invite(), 200)).replace(b"SIP/2.0 200", b"SIP/1.0 200", 1)
    with pytest.raises(UnsupportedVersion):
        parse_message(response)


def test_size_limit() -> None:
    padded = INVITE.replace(b"Content-Length: 0", b"Content-Length: 100") + b"x" * 100
    assert parse_message(padded, max_size=len(padded)).body == b"x" * 100
    with pytest.raises(SipParseError, match="too large"):
        parse_message(padded, max_size=len(padded) - 1)


@pytest.mark.parametrize(
    "data",
    [
        replace_line("From", f"From: <tel:{CANARY}>;tag=;"),
        replace_line("To", f'To: "{CANARY} <sip:{CANARY}@127.0.0.1>'),
        replace_line("CSeq", f"CSeq: {CANARY} INVITE"),
        replace_line("Call-ID", f"Call-ID: {CANARY} x"),
        replace_line("Via", f"Via: SIP/2.0/UDP {CANARY}:99999"),
        INVITE.replace(b"sip:line@127.0.0.1", f"<sip:{CANARY}@127.0.0.1>".encode(), 1),
        INVITE.replace(b"Content-Length: 0", f"Content-Length: {CANARY}".encode()),
    ],
)
def test_errors_never_quote_the_input(data: bytes) -> None:
    with pytest.raises(SipParseError) as error:
        parse_message(data)
    assert CANARY not in str(error.value)
    assert CANARY not in repr(error.value.args)


def test_uri_errors_never_quote_the_input() -> None:
    for parse in (parse_uri, parse_name_addr, parse_via, parse_cseq):
        with pytest.raises(SipParseError) as error:
            parse(f"tel:{CANARY};<>")
        assert CANARY not in str(error.value)


# --- serialize and response_to --------------------------------------------------------


def test_serialize_writes_crlf_canonical_names_and_true_content_length() -> None:
    request = SipRequest(
        "MESSAGE",
        "sip:line@127.0.0.1",
        Headers([("v", "SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKs"), ("content-length", "99"), ("call-id", "x")]),
        b"hello",
    )
    assert serialize(request) == (
        b"MESSAGE sip:line@127.0.0.1 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKs\r\n"
        b"Call-ID: x\r\n"
        b"Content-Length: 5\r\n"
        b"\r\n"
        b"hello"
    )


def test_serialize_round_trip() -> None:
    assert parse_message(serialize(invite())) == invite()


def test_serialize_refuses_line_breaks() -> None:
    with pytest.raises(ValueError):
        serialize(SipResponse(200, "OK\r\nX-Injected: 1", Headers()))


def test_response_to_copies_the_dialog_headers() -> None:
    request = parse_message(
        message(
            *INVITE_LINES[:1],
            "Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKa, SIP/2.0/UDP 127.0.0.2;branch=z9hG4bKb",
            "Via: SIP/2.0/UDP 127.0.0.3;branch=z9hG4bKc",
            *INVITE_LINES[2:],
            "Record-Route: <sip:127.0.0.9;lr>",
            "Content-Length: 0",
        )
    )
    assert isinstance(request, SipRequest)
    response = response_to(request, 180, to_tag="t1", headers=[("Contact", "<sip:line@127.0.0.1>")], body=b"x")
    assert (response.status, response.reason, response.body) == (180, "Ringing", b"x")
    assert response.headers.items() == [
        ("Via", "SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKa"),
        ("Via", "SIP/2.0/UDP 127.0.0.2;branch=z9hG4bKb"),
        ("Via", "SIP/2.0/UDP 127.0.0.3;branch=z9hG4bKc"),
        ("From", '"Anon" <sip:anon@127.0.0.1>;tag=f1'),
        ("To", "<sip:line@127.0.0.1>;tag=t1"),
        ("Call-ID", "call-1@127.0.0.1"),
        ("CSeq", "1 INVITE"),
        ("Contact", "<sip:line@127.0.0.1>"),
    ]
    assert b"\r\nContent-Length: 1\r\n" in serialize(response)


def test_response_to_keeps_an_existing_to_tag_and_picks_reasons() -> None:
    request = parse_message(replace_line("To", "To: sip:line@127.0.0.1;tag=old"))
    assert isinstance(request, SipRequest)
    assert response_to(request, 200, to_tag="new").headers.get("To") == "sip:line@127.0.0.1;tag=old"
    assert response_to(request, 200).reason == "OK"
    assert response_to(request, 488, "Codecs Please").reason == "Codecs Please"
    assert response_to(request, 299).reason == ""


def test_reasons_cover_the_codes_we_send() -> None:
    for status in (100, 180, 183, 200, 400, 401, 403, 404, 405, 407, 408, 415, 420, 422, 480, 481, 482, 483):
        assert REASONS[status]
    for status in (486, 487, 488, 491, 500, 501, 503, 504, 505, 513):
        assert REASONS[status]
    assert REASONS[481] == "Call/Transaction Does Not Exist"


# --- Headers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("call-id", "Call-ID"),
        ("CSEQ", "CSeq"),
        ("www-authenticate", "WWW-Authenticate"),
        ("max-forwards", "Max-Forwards"),
        ("RECORD-ROUTE", "Record-Route"),
        ("p-asserted-identity", "P-Asserted-Identity"),
        ("remote-party-id", "Remote-Party-ID"),
        ("x-custom-thing", "X-Custom-Thing"),
        ("NewFangledHeader", "Newfangledheader"),
    ],
)
def test_header_names_are_canonical(name: str, canonical: str) -> None:
    assert Headers([(name, "v")]).items() == [(canonical, "v")]


def test_every_compact_form_expands() -> None:
    for letter, name in COMPACT_FORMS.items():
        headers = Headers([(letter.upper(), "v")])
        assert headers.items() == [(name, "v")]
        assert letter in headers and name.lower() in headers


def test_get_all_splits_list_headers_outside_quotes_and_brackets() -> None:
    headers = Headers(
        [
            ("Contact", '"Doe, John \\"Jr, II\\"" <sip:a@127.0.0.1;x=1,2>;q=0.5, <sip:b@127.0.0.1>'),
            ("Contact", "sip:c@127.0.0.1"),
            ("Allow", "INVITE, ACK,BYE"),
            ("WWW-Authenticate", 'Digest realm="voiceline", nonce="a,b", qop="auth"'),
            ("Date", "Sat, 15 Oct 2005 04:44:56 GMT"),
            ("X-Unknown", "a, b"),
            ("Supported", ""),
        ]
    )
    assert headers.get_all("contact") == [
        '"Doe, John \\"Jr, II\\"" <sip:a@127.0.0.1;x=1,2>;q=0.5',
        "<sip:b@127.0.0.1>",
        "sip:c@127.0.0.1",
    ]
    assert headers.get("m") == '"Doe, John \\"Jr, II\\"" <sip:a@127.0.0.1;x=1,2>;q=0.5'
    assert headers.get_all("Allow") == ["INVITE", "ACK", "BYE"]
    assert headers.get_all("WWW-Authenticate") == ['Digest realm="voiceline", nonce="a,b", qop="auth"']
    assert headers.get_all("Date") == ["Sat, 15 Oct 2005 04:44:56 GMT"]
    assert headers.get_all("X-Unknown") == ["a, b"]
    assert headers.get_all("Supported") == []
    assert headers.get("Supported") is None
    assert headers.get("Route") is None


def test_headers_set_remove_contains_copy() -> None:
    headers = Headers([("Via", "a"), ("To", "t"), ("Via", "b"), ("X-Last", "z")])
    copy = headers.copy()
    headers.set("v", "c")
    assert headers.items() == [("Via", "c"), ("To", "t"), ("X-Last", "z")]
    headers.set("Subject", "new")
    assert headers.items()[-1] == ("Subject", "new")
    headers.remove("to")
    assert "To" not in headers and "t" not in headers and 42 not in headers
    assert copy.items() == [("Via", "a"), ("To", "t"), ("Via", "b"), ("X-Last", "z")]
    copy.items().clear()
    assert len(copy.items()) == 4


def test_headers_refuse_line_breaks_and_bad_names() -> None:
    with pytest.raises(ValueError):
        Headers([("Subject", "a\r\nVia: injected")])
    with pytest.raises(ValueError):
        Headers().set("Subject", "a\nb")
    with pytest.raises(ValueError):
        Headers().add("Bad Name", "x")


# --- URIs, name-addr, Via, CSeq -------------------------------------------------------


def test_parse_uri() -> None:
    uri = parse_uri("SIPS:Alice@[2001:db8::1]:5061;Transport=tcp;lr?Subject=hi&Priority=urgent")
    assert (uri.scheme, uri.user, uri.host, uri.port) == ("sips", "Alice", "2001:db8::1", 5061)
    assert uri.params == {"transport": "tcp", "lr": None}
    assert uri.headers == {"Subject": "hi", "Priority": "urgent"}
    assert str(uri) == "sips:Alice@[2001:db8::1]:5061;transport=tcp;lr?Subject=hi&Priority=urgent"
    bare = parse_uri("sip:127.0.0.1")
    assert (bare.user, bare.host, bare.port, bare.params, bare.headers) == (None, "127.0.0.1", None, {}, {})
    assert str(bare) == "sip:127.0.0.1"
    phone = parse_uri("sip:+15550100;phone-context=example.com@gw.example.net;user=phone")
    assert (phone.user, phone.params) == ("+15550100;phone-context=example.com", {"user": "phone"})


@pytest.mark.parametrize(
    "text",
    [
        "tel:+15550100",
        "http://example.com/",
        "sip:",
        "sip:@127.0.0.1",
        "sip:a@b@127.0.0.1",
        "sip:127.0.0.1:99999",
        "sip:127.0.0.1:port",
        "sip:127.0.0.1:",
        "sip:[::1",
        "sip:[not-ipv6]",
        "sip:::1",
        "sip:host name",
        "sip:host;=x",
        "sip:host;a;a",
        "sip:host?novalue",
        "<sip:a@127.0.0.1>",
        "1sip:a@127.0.0.1",
    ],
)
def test_parse_uri_errors(text: str) -> None:
    with pytest.raises(SipParseError):
        parse_uri(text)


def test_parse_name_addr_forms() -> None:
    quoted = parse_name_addr('"Alice Smith" <sip:alice@127.0.0.1>;tag=abc;X=1')
    assert (quoted.display, quoted.uri, quoted.params, quoted.tag) == (
        "Alice Smith",
        "sip:alice@127.0.0.1",
        {"tag": "abc", "x": "1"},
        "abc",
    )
    tokens = parse_name_addr("Bob  Jones<sip:bob@127.0.0.1>")
    assert (tokens.display, tokens.uri) == ("Bob Jones", "sip:bob@127.0.0.1")
    bracketed = parse_name_addr("<sip:carol@127.0.0.1;transport=udp>;expires=60")
    assert bracketed.display is None
    assert (bracketed.uri, bracketed.params) == ("sip:carol@127.0.0.1;transport=udp", {"expires": "60"})
    addr_spec = parse_name_addr("sip:dave@127.0.0.1;user=phone;tag=x")
    assert (addr_spec.uri, addr_spec.params) == ("sip:dave@127.0.0.1", {"user": "phone", "tag": "x"})
    assert parse_name_addr("<tel:+15550100>").uri == "tel:+15550100"
    assert parse_name_addr('"" <sip:e@127.0.0.1>').display is None


def test_name_addr_str_always_uses_brackets_and_escapes() -> None:
    assert str(parse_name_addr("sip:a@127.0.0.1;tag=1")) == "<sip:a@127.0.0.1>;tag=1"
    tricky = parse_name_addr('"say \\"hi\\" \\\\ bye" <sip:a@127.0.0.1>;rport')
    assert tricky.display == 'say "hi" \\ bye'
    assert str(tricky) == '"say \\"hi\\" \\\\ bye" <sip:a@127.0.0.1>;rport'
    assert parse_name_addr(str(tricky)) == tricky
    injected = NameAddr("a\r\nVia: x", "sip:a@127.0.0.1", {})
    assert "\r" not in str(injected) and "\n" not in str(injected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<>",
        '"open <sip:a@127.0.0.1>',
        '"x" sip:a@127.0.0.1',
        "Bell, Alexander <sip:a@127.0.0.1>",
        "< sip:a@127.0.0.1 >",
        "<sip:a@127.0.0.1",
        "<sip:a@127.0.0.1> junk",
        "<sip:a@127.0.0.1>;;",
        "<sip:a@127.0.0.1>;tag=",
        "<sip:a@127.0.0.1>;tag=a;tag=b",
        '<sip:a@127.0.0.1>;tag="open',
        "sip:a@127.0.0.1?Route=x",
        "sip:a@127.0.0.1,sip:b@127.0.0.1",
        "*",
    ],
)
def test_parse_name_addr_errors(text: str) -> None:
    with pytest.raises(SipParseError):
        parse_name_addr(text)


def test_parse_via() -> None:
    via = parse_via("SIP/2.0/udp 127.0.0.1:5060;branch=z9hG4bK776;rport;received=[::1]")
    assert (via.transport, via.host, via.port, via.branch) == ("UDP", "127.0.0.1", 5060, "z9hG4bK776")
    assert via.params == {"branch": "z9hG4bK776", "rport": None, "received": "[::1]"}
    spaced = parse_via("SIP / 2.0 / TCP\t[::1]:5061 ; BRANCH = z9hG4bKx")
    assert (spaced.transport, spaced.host, spaced.port, spaced.branch) == ("TCP", "::1", 5061, "z9hG4bKx")
    assert str(spaced) == "SIP/2.0/TCP [::1]:5061;branch=z9hG4bKx"
    assert parse_via("SIP/2.0/UDP 127.0.0.1").branch is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SIP/2.0 UDP 127.0.0.1",
        "SIP/2.0/UDP",
        "SIP/2.0/UDP 127.0.0.1 extra",
        "SIP/2.0/UDP 127.0.0.1;;",
        "SIP/2.0/UDP 127.0.0.1:0x",
        "HTTP/1.1/TCP 127.0.0.1",
        "SIP/2.0/UDP 127.0.0.1;branch=",
        "SIP/2.0/UDP 127.0.0.1;branch=a;branch=b",
        "SIP/2.0/U(P 127.0.0.1",
    ],
)
def test_parse_via_errors(text: str) -> None:
    with pytest.raises(SipParseError):
        parse_via(text)


def test_parse_cseq() -> None:
    assert parse_cseq("1 INVITE") == (1, "INVITE")
    assert parse_cseq(" 0009 \t ACK ") == (9, "ACK")
    assert parse_cseq("2147483647 BYE") == (2**31 - 1, "BYE")


@pytest.mark.parametrize(
    "text", ["", "1", "INVITE", "2147483648 INVITE", "-1 INVITE", "1 INV ITE", "\uff11 INVITE", "1 IN/VITE"]
)
def test_parse_cseq_errors(text: str) -> None:
    with pytest.raises(SipParseError):
        parse_cseq(text)


# --- robustness: nothing but SipParseError, whatever the input --------------------------

SEEDS = [INVITE] + [torture(name) for name in ("wsinv", "intmeth", "mpart01", "unreason", "longreq")]
# Octets that steer the parser: separators, quoting, line ends, odd bytes.
SNIPPETS = [
    *(bytes([octet]) for octet in b'"\\<>;,:=?@[]/ \t\n\x00\xff'),
    b"\r\n",
    b"\r\n ",
    b"\r\n\r\n",
    b"%00",
    b"SIP/2.0",
]


def parse_or_reject(data: bytes) -> None:
    with contextlib.suppress(SipParseError):
        parse_message(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_only_raise_sip_parse_error(data: bytes) -> None:
    parse_or_reject(data)


@settings(max_examples=600, deadline=None)
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=8), st.sampled_from(SNIPPETS)),
        max_size=6,
    ),
)
def test_mutated_messages_only_raise_sip_parse_error(seed: bytes, edits: list[tuple[int, int, bytes]]) -> None:
    data = seed
    for position, deleted, inserted in edits:
        at = position % (len(data) + 1)
        data = data[:at] + inserted + data[at + deleted :]
    parse_or_reject(data)


@pytest.mark.parametrize("name", ["wsinv", "intmeth", "unreason"])
def test_every_truncation_only_raises_sip_parse_error(name: str) -> None:
    data = torture(name)
    for end in range(len(data)):
        parse_or_reject(data[:end])


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_header_value_parsers_only_raise_sip_parse_error(text: str) -> None:
    for parse in (parse_uri, parse_name_addr, parse_via, parse_cseq):
        with contextlib.suppress(SipParseError):
            parse(text)


def test_salvage_reads_echo_headers_from_a_refused_request() -> None:
    from voiceline.sip.message import salvage_request_headers

    text = (
        b"INVITE sip:a@127.0.0.1 SIP/2.0\r\nv: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bKx\r\n"
        b"f: <sip:b@127.0.0.1>;tag=1\r\nt: <sip:a@127.0.0.1>\r\ni: abc\r\nCSeq: nonsense INVITE\r\n\r\n"
    )
    with pytest.raises(SipParseError):
        parse_message(text)
    headers = salvage_request_headers(text)
    assert headers is not None and headers.get("Call-ID") == "abc" and headers.get("CSeq") == "nonsense INVITE"
    assert salvage_request_headers(text.replace(b"i: abc\r\n", b"")) is None  # no Call-ID: nothing to echo
    assert salvage_request_headers(b"SIP/2.0 200 OK\r\n" + text.split(b"\r\n", 1)[1]) is None
    assert salvage_request_headers(b"ACK" + text[6:]) is None
    assert salvage_request_headers(b"\xff\x00garbage") is None
