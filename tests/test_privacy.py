import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voiceline.privacy import REDACTED, new_call_id, redact

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
        "rtp ports 20000-29999",
        "call c-bcdfghjkmnpq ended",
        "Call-ID a84b4c76e66710@pc33.example.com",
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


@given(st.text())
def test_redact_never_leaves_six_digits(text: str) -> None:
    assert not SIX_DIGITS.search(redact(text))


@given(st.text(alphabet="0123456789+-.() :@;<>sipteSIPTEL,\"'\n", max_size=200))
def test_redact_on_phone_like_noise(text: str) -> None:
    assert not SIX_DIGITS.search(redact(text))


def test_redact_is_linear_on_hostile_input() -> None:
    # Quadratic scanning would take minutes on these; linear takes milliseconds.
    for hostile in ("sip:" * 50_000, "1 " * 100_000 + "x", "1-" * 100_000, "(" * 100_000 + "1"):
        assert re.search(r"\d(?:[ -]?\d){5}", redact(hostile)) is None  # no phone-like run survives
