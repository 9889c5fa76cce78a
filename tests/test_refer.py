"""Our REFER inside a call (RFC 3515), on the call core's fake clock against raw SIP from the peer.

REFER with Refer-To and nothing of the caller; 202; NOTIFYs with message/sipfrag
progress; a 2xx reported -> Transferred, a refusal, a final error reported, a
subscription ended without a final word, or silence -> TransferFailed.
"""

from __future__ import annotations

from rawsip import Dialer
from test_call_core import CorePeer, Harness, answered_call
from voiceline.sip.events import CallEnded, TransferFailed, TransferProgress, Transferred
from voiceline.sip.message import SipRequest, response_to, serialize

HELP = "sip:help@198.51.100.7"


def refer(harness: Harness, peer: CorePeer, call: str, timeout: float = 30.0) -> SipRequest:
    assert harness.core.refer(call, HELP, harness.now, timeout=timeout)
    harness.collect()
    [request] = peer.requests()
    assert request.method == "REFER"
    return request


def answer(harness: Harness, peer: CorePeer, request: SipRequest, status: int) -> None:
    harness.core.receive(serialize(response_to(request, status)), peer.address, "UDP", harness.now)
    harness.collect()


def notify(dialer: Dialer, frag: str, state: str = "active;expires=60") -> None:
    dialer.in_dialog(
        "NOTIFY", body=f"{frag}\r\n", content_type="message/sipfrag",
        extra=f"Event: refer\r\nSubscription-State: {state}\r\n",
    )  # fmt: skip


def test_the_refer_names_the_target_and_nothing_of_the_caller_and_a_reported_200_transfers() -> None:
    harness = Harness.make()
    peer, dialer, call = answered_call(harness, extra="P-Asserted-Identity: <tel:+4930555012345>\r\n")
    request = refer(harness, peer, call)
    assert request.headers.get("Refer-To") == f"<{HELP}>"
    assert request.headers.get("Referred-By") is None and b"+4930555012345" not in serialize(request)
    answer(harness, peer, request, 202)
    assert harness.take_events() == [TransferProgress(call, 202)]
    notify(dialer, "SIP/2.0 100 Trying")
    notify(dialer, "SIP/2.0 180 Ringing")
    assert peer.statuses() == [200, 200]
    assert harness.take_events() == [TransferProgress(call, 100), TransferProgress(call, 180)]
    notify(dialer, "SIP/2.0 200 OK", "terminated;reason=noresource")
    assert peer.statuses() == [200]
    assert harness.take_events() == [Transferred(call)]
    harness.advance(31.0)
    assert harness.take_events() == []  # the transfer's timer went with it
    harness.core.hangup(call, "transferred", harness.now)  # the app ends our leg
    harness.collect()
    assert [r.method for r in peer.requests()] == ["BYE"]


def test_a_refused_refer_and_a_failed_transfer_are_failures() -> None:
    harness = Harness.make()
    peer, dialer, call = answered_call(harness)
    answer(harness, peer, refer(harness, peer, call), 603)
    assert harness.take_events() == [TransferFailed(call, 603)]
    answer(harness, peer, refer(harness, peer, call), 202)  # a second try is allowed once the first is over
    harness.take_events()
    notify(dialer, "SIP/2.0 486 Busy Here", "terminated;reason=noresource")
    assert harness.take_events() == [TransferFailed(call, 486)]


def test_a_subscription_ended_without_a_final_status_or_silence_is_a_failure() -> None:
    harness = Harness.make()
    peer, dialer, call = answered_call(harness)
    answer(harness, peer, refer(harness, peer, call), 202)
    notify(dialer, "SIP/2.0 180 Ringing", "terminated;reason=timeout")
    assert harness.take_events() == [TransferProgress(call, 202), TransferFailed(call, 487)]
    answer(harness, peer, refer(harness, peer, call, timeout=20.0), 202)
    harness.take_events()
    harness.advance(19.9)
    assert harness.take_events() == []
    harness.advance(0.1)
    assert harness.take_events() == [TransferFailed(call, 408)]
    notify(dialer, "SIP/2.0 200 OK")  # too late: no subscription any more
    assert peer.statuses() == [481] and harness.take_events() == []


def test_bad_notifies_are_refused_and_change_nothing() -> None:
    harness = Harness.make()
    peer, dialer, call = answered_call(harness)
    notify(dialer, "SIP/2.0 200 OK")  # no REFER of ours
    assert peer.statuses() == [481]
    answer(harness, peer, refer(harness, peer, call), 202)
    harness.take_events()
    dialer.in_dialog("NOTIFY", body="SIP/2.0 200 OK\r\n", content_type="message/sipfrag", extra="Event: presence\r\n")
    notify(dialer, "garbage")
    dialer.in_dialog("NOTIFY", body="hello", content_type="text/plain", extra="Event: refer\r\n")
    assert peer.statuses() == [481, 400, 400] and harness.take_events() == []
    assert not harness.core.refer(call, HELP, harness.now)  # one transfer at a time


def test_a_call_ending_during_the_transfer_fails_it_first() -> None:
    harness = Harness.make()
    peer, dialer, call = answered_call(harness)
    answer(harness, peer, refer(harness, peer, call), 202)
    harness.take_events()
    dialer.in_dialog("BYE")
    assert [type(e) for e in harness.take_events()] == [TransferFailed, CallEnded]


def test_only_a_confirmed_call_is_referred() -> None:
    harness = Harness.make()
    assert not harness.core.refer("no-such-call", HELP, harness.now)
    harness.collect()
    assert harness.sent == {}
