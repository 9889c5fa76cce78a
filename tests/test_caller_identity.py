"""Pseudonyms: a returning caller recognised by an in-memory keyed HMAC, never by its identity.

The normalisation and the key ring alone, then through the call core on a fake
clock: what an INVITE's caller becomes in `CallInfo`, and what our own INVITE
says of a caller (nothing, unless asked to assert its identity).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from rawsip import Dialer
from test_call_core import SERVER, CorePeer, Harness, answered_call, outbound
from voiceline.routing import Line, Trunk, TrunkDirectory, TrunkError, TrunkPolicy
from voiceline.sip.admission import Admit
from voiceline.sip.events import CallEnded, CallOffered
from voiceline.sip.identity import Pseudonyms, asserted_identity, e164
from voiceline.sip.message import Headers, SipRequest

NUMBER = "+4930555012345"


def headers(*pairs: tuple[str, str]) -> Headers:
    return Headers(list(pairs))


@pytest.mark.parametrize(
    ("pairs", "country_code", "identity"),
    [
        ((("From", "<sip:+4930555012345@carrier.example>;tag=1"),), "", NUMBER),
        ((("From", "<sip:030555012345@carrier.example;user=phone>;tag=1"),), "49", NUMBER),
        ((("From", "<sip:004930555012345@carrier.example>;tag=1"),), "", NUMBER),
        ((("From", '"Caller" <tel:+49-30-555-012345>;tag=1'),), "", NUMBER),
        ((("From", "<sip:2025550123@carrier.example>;tag=1"),), "1", "+12025550123"),
        ((("From", "<sip:12025550123@carrier.example>;tag=1"),), "1", "+12025550123"),
        ((("From", "<sip:030555012345@carrier.example>;tag=1"),), "", "030555012345"),
        ((("From", "<sip:Alice@Carrier.Example>;tag=1"),), "", "sip:alice@carrier.example"),
        # P-Asserted-Identity wins over From, even when the caller asked for privacy
        ((("From", '"Anonymous" <sip:anonymous@anonymous.invalid>;tag=1'), ("Privacy", "id"),
          ("P-Asserted-Identity", "<sip:030555012345@carrier.example>")), "49", NUMBER),  # fmt: skip
        ((("From", "<sip:other@carrier.example>;tag=1"), ("P-Asserted-Identity", "<tel:+4930555012345>, <sip:x@y>")),
         "", NUMBER),  # fmt: skip
    ],
)
def test_the_asserted_identity_is_normalised(pairs: tuple[tuple[str, str], ...], country_code: str, identity: str) -> None:
    assert asserted_identity(headers(*pairs), country_code) == identity


@pytest.mark.parametrize(
    "pairs",
    [
        (("From", '"Anonymous" <sip:anonymous@anonymous.invalid>;tag=1'),),
        (("From", "<sip:anonymous@carrier.example>;tag=1"),),
        (("From", "<sip:Restricted@carrier.example>;tag=1"),),
        (("From", "<sip:carrier.example>;tag=1"),),  # no user part
        (("From", "<sip:+4930555012345@carrier.example>;tag=1"), ("Privacy", "id")),  # withheld, nobody asserts it
        (("From", "<sip:+4930555012345@carrier.example>;tag=1"), ("Privacy", "header; id")),
        (("From", "not a name-addr <"),),
        (),
    ],
)
def test_withheld_and_unusable_identities_are_none(pairs: tuple[tuple[str, str], ...]) -> None:
    assert asserted_identity(headers(*pairs), "49") is None


@given(st.from_regex(r"[1-9][0-9]{6,11}", fullmatch=True))
def test_a_number_in_any_of_its_forms_is_one_identity(national: str) -> None:
    forms = [f"+49{national}", f"0049{national}", f"0{national}"]
    assert {e164(form, "49") for form in forms} == {f"+49{national}"}


def test_one_identity_one_pseudonym_per_key_and_none_across_keys() -> None:
    secrets = itertools.count()
    keys = Pseudonyms(100.0, new_secret=lambda: bytes([next(secrets)]) * 32)
    first = keys.for_call(NUMBER, 0.0)
    again = keys.for_call(NUMBER, 99.0)
    other = keys.for_call("+4930555099999", 50.0)
    assert first.value == again.value != other.value and not first.withheld
    # the HMAC-SHA256 of the identity under the key, shortened: not a plain hash of the number
    assert first.value == hmac.new(bytes([0]) * 32, NUMBER.encode(), hashlib.sha256).digest()[:8].hex()
    assert first.value not in (hashlib.sha256(NUMBER.encode()).hexdigest()[:16], hashlib.md5(NUMBER.encode()).hexdigest()[:16])
    rotated = keys.for_call(NUMBER, 100.0)
    assert rotated.value != first.value and rotated.key_epoch == first.key_epoch + 1


def test_withheld_callers_get_a_fresh_pseudonym_each_call() -> None:
    keys = Pseudonyms(100.0)
    a, b = keys.for_call(None, 0.0), keys.for_call(None, 0.0)
    assert a.withheld and b.withheld and a.value != b.value


def test_a_rotated_key_is_kept_only_while_its_calls_last() -> None:
    keys = Pseudonyms(100.0)
    old = keys.for_call(NUMBER, 10.0)
    keys.expire(150.0)
    assert keys.keys_held == 1  # its call goes on
    new = keys.for_call(NUMBER, 160.0)
    assert keys.keys_held == 2 and new.key_epoch == old.key_epoch + 1
    keys.release(old.key_epoch)
    assert keys.keys_held == 1
    keys.release(new.key_epoch)
    assert keys.keys_held == 1  # the current key stays for the next caller ...
    keys.expire(260.0)
    assert keys.keys_held == 0  # ... until its time is over


def test_the_pseudonym_is_not_in_the_call_info_repr() -> None:
    harness = Harness.make()
    dialer = Dialer(CorePeer(harness, 4000), SERVER, from_user="+4930555012345")  # type: ignore[arg-type]
    dialer.invite(rtp_port=8000)
    [offered] = harness.take_events()
    assert isinstance(offered, CallOffered) and len(offered.call.pseudonym) == 16
    assert offered.call.pseudonym not in repr(offered.call) and NUMBER not in repr(offered.call)


def offered_pseudonym(harness: Harness, port: int, from_user: str, extra: str = "") -> tuple[str, bool]:
    dialer = Dialer(CorePeer(harness, port), SERVER, from_user=from_user)  # type: ignore[arg-type]
    dialer.invite(rtp_port=8000, extra=extra)
    [offered] = [event for event in harness.take_events() if isinstance(event, CallOffered)]
    return offered.call.pseudonym, offered.call.withheld


def test_the_core_recognises_a_returning_caller_in_another_form_and_not_a_withheld_one() -> None:
    harness = Harness.make()
    first = offered_pseudonym(harness, 4000, "+4930555012345")
    again = offered_pseudonym(harness, 4002, "004930555012345")
    asserted = offered_pseudonym(harness, 4004, "anonymous", "P-Asserted-Identity: <tel:+4930555012345>\r\n")
    withheld = offered_pseudonym(harness, 4006, "+4930555012345", "Privacy: id\r\n")
    assert first == again == asserted and first[1] is False
    assert withheld[1] is True and withheld[0] != first[0]


def test_a_rotated_key_no_longer_recognises_the_caller() -> None:
    harness = Harness.make(key_rotation=60.0)
    first, _ = offered_pseudonym(harness, 4000, "+4930555012345")
    harness.advance(61.0)
    again, _ = offered_pseudonym(harness, 4002, "+4930555012345")
    assert again != first


def test_our_invite_carries_no_caller_identity_unless_asked() -> None:
    harness = Harness.make()
    _, _, caller = answered_call(harness, extra="P-Asserted-Identity: <tel:+4930555012345>\r\n")
    _, plain = outbound(harness)
    assert "+4930555012345" not in str(plain.headers) and plain.headers.get("P-Asserted-Identity") is None
    _, asserting = outbound(harness, assert_identity_of=caller)
    assert asserting.headers.get("P-Asserted-Identity") == "<tel:+4930555012345>"
    assert asserting.headers.get("Privacy") == "id" and "anonymous.invalid" in (asserting.headers.get("From") or "")


def test_no_log_event_carries_the_identity_or_the_pseudonym() -> None:
    """Before any redaction: what the core logs of an identified call, its REFER and a help call asserting it."""
    harness = Harness.make()
    with structlog.testing.capture_logs() as events:
        _, _, caller = answered_call(harness, extra="P-Asserted-Identity: <tel:+4930555012345>\r\n")
        harness.core.refer(caller, "sip:help@127.0.0.1:7000", harness.now)
        harness.collect()
        outbound(harness, assert_identity_of=caller)
        harness.core.hangup(caller, "done", harness.now)
        harness.collect()
    [ended] = [event for event in harness.take_events() if isinstance(event, CallEnded)]
    assert ended.call.pseudonym and not ended.call.withheld
    text = repr(events)
    assert "5550123" not in text and "555012345" not in text and ended.call.pseudonym not in text
    assert {event["event"] for event in events} >= {"call.offered", "call.refer", "call.placed", "call.ended"}


def test_a_line_s_country_code_reaches_the_core_through_admission() -> None:
    line = Line("national", ("100",), country_code="49")
    assert Line.from_settings("national", line.settings()) == line
    assert "country_code" not in Line("plain", ("100",)).settings()  # stored settings of other lines stay as they were
    for bad in ("049", "1234", "4a", "\u0664\u0669"):  # a leading zero, too long, not digits, non-ASCII digits
        with pytest.raises(TrunkError):
            Line("bad", ("100",), country_code=bad)
    policy = TrunkPolicy(TrunkDirectory([Trunk("carrier", sources=("192.0.2.0/24",))], [line]), lambda: 0.0, lambda trunk: 0)
    invite = SipRequest("INVITE", "sip:100@10.0.0.1", headers(
        ("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKx"), ("From", "<sip:030555012345@192.0.2.1>;tag=a"),
        ("To", "<sip:100@10.0.0.1>"), ("Call-ID", "c"), ("CSeq", "1 INVITE"),
    ))  # fmt: skip
    admitted = policy.check(invite, ("192.0.2.1", 5060), "UDP")
    assert isinstance(admitted, Admit) and admitted.country_code == "49"
    assert asserted_identity(invite.headers, admitted.country_code) == NUMBER


def test_our_invite_may_carry_our_own_from_and_still_ask_for_privacy() -> None:
    harness = Harness.make()
    _, invite = outbound(harness, from_uri="sip:account@carrier.example")
    assert (invite.headers.get("From") or "").startswith("<sip:account@carrier.example>;tag=")
    assert invite.headers.get("Privacy") == "id" and invite.headers.get("P-Asserted-Identity") is None


def test_the_key_is_dropped_on_time_even_when_nobody_calls() -> None:
    harness = Harness.make(key_rotation=60.0)
    _, dialer, call = answered_call(harness)
    dialer.in_dialog("BYE")
    assert harness.core.pseudonyms.keys_held == 1 and harness.core.next_deadline() is not None
    harness.advance(60.0)
    assert harness.core.pseudonyms.keys_held == 0
