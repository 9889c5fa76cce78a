import re
from datetime import datetime

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from voiceline.privacy import MAX_SEPARATORS, MIN_DIGITS, REDACTED, new_call_id, redact

CANARY = "+15550001234"
CANARY_DIGITS = "15550001234"
SIX_DIGITS = re.compile(r"\d{6}")

CANARY_SHAPES = [
    "sip:+15550001234@trunk.example.net;user=phone",
    "<sips:+15550001234;npdi;rn=+15550009999@10.0.0.1:5061;transport=tls>",
    "sip:15550001234:secret@10.0.0.1",
    "tel:+15550001234",
    "tel:+1-555-000-1234;phone-context=example.net",
    '"+1 555 000 1234" <sip:anonymous@anonymous.invalid>',
    "P-Asserted-Identity: <sip:+15550001234@10.0.0.1>",
    "Remote-Party-ID: <SIP:+15550001234@10.0.0.1>;party=calling",
    "+1 (555) 000-1234",
    "+1.555.000.1234",
    "(555) 000-1234 / 1-555-000-1234",
    "ValueError: unexpected caller +15550001234 in From",
    "id15550001234x",
    "0015550001234",
    # Spellings an attacker found slipping through: wide separators, odd groups, IPv4 look-alikes.
    "+1 555 - 000 - 1234",
    "1 55500-01234",
    "15.550.001.234",
    "+1 (555) - 000 - 1234",
    "1/555/000/1234",
    "1_555_000_1234",
    "+1\u00a0555\u00a0000\u00a01234",  # no-break spaces
    "+1\u202f555\u2009000\u20071234",  # narrow no-break, thin and figure spaces
    "+1\u2011555\u2013000\u22121234",  # non-breaking hyphen, en dash, minus sign
    "1\u200b555\u200b000\u200b1234",  # zero-width spaces
    repr("+1\u00a0555\u00a0000\u00a01234"),  # as repr() and str(KeyError) write it
    str(KeyError("+1\u202f555\u202f000\u202f1234")),
    "2024-01-02 0001234",  # a date-shaped start does not shelter what follows
    "sms:+15550001234",
    "mailto:+15550001234@example.org",
]


@pytest.mark.parametrize("text", CANARY_SHAPES)
def test_canary_is_gone(text: str) -> None:
    out = redact(text)
    assert REDACTED in out
    assert "0001234" not in out
    assert "000 1234" not in out and "000-1234" not in out and "000.1234" not in out
    assert not SIX_DIGITS.search(out)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sip:+15550001234@10.0.0.1:5060;transport=udp", "sip:[redacted]@10.0.0.1:5060;transport=udp"),
        ("tel:+15550001234;phone-context=x", "tel:[redacted]"),
        ('"+1 555 000 1234" <sip:alice@example.net>', '"[redacted]" <sip:[redacted]@example.net>'),
        ('"Alice Smith" <sips:alice@example.net>', '"[redacted]" <sips:[redacted]@example.net>'),
        # Every scheme that carries a user, and plain e-mail addresses.
        ("mailto:alice.smith@example.org", "mailto:[redacted]@example.org"),
        ("<im:alice@example.org>", "<im:[redacted]@example.org>"),
        ("pres:alice@example.org", "pres:[redacted]@example.org"),
        ("xmpp:alice@example.org/phone", "xmpp:[redacted]@example.org/phone"),
        ("h323:alice@gw.example.net", "h323:[redacted]@gw.example.net"),
        ("h323:alice", "h323:[redacted]"),
        ("callto:alice.smith", "callto:[redacted]"),
        ("skype:alice.smith?call", "skype:[redacted]"),
        ("newscheme:alice@example.net", "[redacted]@example.net"),  # unknown schemes go with the user
        ("write to alice.smith+voice@example.com today", "write to [redacted]@example.com today"),
        ("sip:alice:secret@10.0.0.1", "sip:[redacted]@10.0.0.1"),
        ("alice:secret@10.0.0.1", "[redacted]@10.0.0.1"),
        # A SIP Call-ID names the call in the carrier's records too.
        ("Call-ID a84b4c76e66710@pc33.example.com", "Call-ID [redacted]@pc33.example.com"),
        # Ten digits, whatever they mean: a port range is spelled like a number.
        ("rtp ports 20000-29999", "rtp ports [redacted]"),
    ],
)
def test_redaction_keeps_the_shape(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "listening on 127.0.0.1:5060",
        "peer 192.168.100.200:65535 latched",
        "at 2024-01-02T03:04:05.123Z",
        "at 2024-01-02 03:04:05,123",
        "waited 0.02 s, jitter 12.345",
        "at 2026-11-29T17:45:54Z and 2024-01-02T03:04:05.123",
        "network 198.51.100.0/24 refused",
        'File "/usr/lib/python3.11/asyncio/events.py", line 80, in _run',
        "call c-bcdfghjkmnpq ended",
        "sip:127.0.0.1:5060;lr",
        "<sip:proxy.example.net;transport=tcp>",
        "SIP/2.0 200 OK, CSeq 31415 INVITE",
        "hotel:12345",
    ],
)
def test_what_logs_need_survives(text: str) -> None:
    assert redact(text) == text


def test_generated_call_ids_survive_redaction() -> None:
    ids = {new_call_id() for _ in range(1000)}
    assert len(ids) == 1000
    for call_id in ids:
        assert re.fullmatch(r"c-[a-z]{12}", call_id)
        assert redact(f"call {call_id} ended") == f"call {call_id} ended"


@given(
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2099, 12, 31)),
    st.sampled_from(["seconds", "milliseconds"]),
    st.sampled_from(["T", " "]),
)
def test_iso_times_survive(moment: datetime, timespec: str, sep: str) -> None:
    stamp = moment.isoformat(sep=sep, timespec=timespec)
    for text in (stamp, stamp + "Z", f"call {new_call_id()} at {stamp}Z ended", stamp.replace(".", ",")):
        assert redact(text) == text


@given(st.text())
def test_redact_never_leaves_six_digits(text: str) -> None:
    assert not SIX_DIGITS.search(redact(text))


@given(st.text(alphabet="0123456789+-.() :@;<>sipteSIPTEL,\"'\n", max_size=200))
def test_redact_on_phone_like_noise(text: str) -> None:
    assert not SIX_DIGITS.search(redact(text))


def test_redact_is_linear_on_hostile_input() -> None:
    # Quadratic scanning would take minutes on these; linear takes milliseconds.
    for hostile in ("sip:" * 50_000, "1 " * 100_000 + "x", "1-" * 100_000, "(" * 100_000 + "1", "1\\xa0" * 50_000):
        assert re.search(r"\d(?:[ -]?\d){5}", redact(hostile)) is None  # no phone-like run survives
    assert redact("a@" * 100_000) == "[redacted]@" * 100_000
    assert redact("tel:" * 50_000) == "tel:[redacted]"
    for harmless in ("a" * 200_000, '"a' * 100_000 + "<", "\\xa0" * 100_000 + "1"):
        assert redact(harmless) == harmless


# Digits of other scripts are decimal digits too.
DIGIT_SCRIPTS = ["0123456789", "٠١٢٣٤٥٦٧٨٩", "۰۱۲۳۴۵۶۷۸۹", "०१२३४५६७८९", "０１２３４５６７８９"]
SEPARATORS = [
    " ", "-", ".", "/", "(", ")", "_", "\t",
    "\u00a0", "\u202f", "\u2007", "\u2009", "\u3000",  # no-break, narrow, figure, thin, ideographic spaces
    "\u2011", "\u2013", "\u2014", "\u2212", "\uff0d",  # hyphens, dashes, minus signs
    "\u200b", "\u2060", "\u00b7", "\uff0e",  # zero-width space and joiner, middle dot, full-width stop
    "\\xa0", "\\u202f",  # what repr() writes for them
]  # fmt: skip
# Shapes deliberately kept (the same digits written as a date, a time or an IPv4 address/network).
KEPT_SHAPE = re.compile(r"\d{4}-\d\d-\d\d(?: \d\d:\d\d(?::\d\d(?:[.,]\d+)?)?)?|\d{1,3}(?:\.\d{1,3}){3}(?:/\d{1,2})?")


@st.composite
def spelled_numbers(draw: st.DrawFn) -> tuple[str, str]:
    """A number of 6-15 digits in one script, spelled with random separators; and its digits."""
    script = draw(st.sampled_from(DIGIT_SCRIPTS))
    digits = draw(st.text(alphabet=script, min_size=MIN_DIGITS, max_size=15))
    gaps = [draw(st.lists(st.sampled_from(SEPARATORS), max_size=MAX_SEPARATORS)) for _ in digits[1:]]
    spelled = digits[0] + "".join("".join(gap) + digit for gap, digit in zip(gaps, digits[1:], strict=True))
    prefix = draw(st.sampled_from(["", "+", "(", "+("]))
    return prefix + spelled, script


@given(spelled_numbers(), st.sampled_from([("caller ", " rang"), ("id", "x"), ("<sip:", ">"), ("", "")]))
def test_every_spelling_of_a_number_is_redacted(number: tuple[str, str], context: tuple[str, str]) -> None:
    spelled, script = number
    assume(not KEPT_SHAPE.fullmatch(spelled))
    out = redact(context[0] + spelled + context[1])
    assert REDACTED in out
    assert not any(c in script for c in out), out
