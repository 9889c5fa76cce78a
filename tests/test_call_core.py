"""The sans-I/O call core on a fake clock: every timer in milliseconds of test time, no sockets.

The peer's requests are written by `rawsip.Dialer`; what the core sends is read
back from `take_sends()`, its events from `take_events()`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from rawsip import OFFER, Dialer, to_tag
from voiceline.sip.auth import OFFERED, DigestClient, DigestServer, Verdict, digest_ha1
from voiceline.sip.call_state import (
    EXCHANGES,
    PHASES,
    CallEvent,
    CallState,
    Exchange,
    ExchangeEvent,
    Refusal,
    next_exchange,
    next_phase,
)
from voiceline.sip.core import CallCore, CoreSettings, Entropy
from voiceline.sip.events import (
    Answered,
    CallConfirmed,
    CallEnded,
    CallOffered,
    Cancelled,
    Event,
    MediaChanged,
    Refused,
    Ringing,
    TimedOut,
)
from voiceline.sip.message import SipMessage, SipRequest, SipResponse, parse_message, parse_name_addr, response_to, serialize
from voiceline.sip.session_timer import SessionTimerPolicy
from voiceline.sip.transaction import Timers
from voiceline.sip.transport import Address

SERVER: Address = ("127.0.0.1", 5060)
T1 = 0.5


class LoopbackTransport:
    """What the core asks of a transport: its name, port and kind. The core itself never sends."""

    name = "UDP"
    reliable = False

    @property
    def local_address(self) -> Address:
        return SERVER

    def has_connection(self, dest: Address) -> bool:
        return False

    def set_reply_address(self, source: Address, address: Address) -> None:
        raise AssertionError("UDP has no connections")

    def send(self, data: bytes, dest: Address) -> None:
        raise AssertionError("the core returns what to send")

    def close(self) -> None: ...


@dataclass
class Harness:
    """A core, its fake clock, and what it sent (by destination) and reported."""

    core: CallCore
    now: float = 0.0
    sent: dict[Address, list[SipMessage]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)

    @classmethod
    def make(cls, **settings: object) -> Harness:
        serial = itertools.count(1)
        entropy = Entropy(
            tag=lambda: f"tag{next(serial)}",
            branch=lambda: f"z9hG4bKbranch{next(serial)}",
            call_id=lambda: f"c-{next(serial)}",
            sip_call_id=lambda: f"sipcall{next(serial)}",
            uniform=lambda low, high: (low + high) / 2,
        )
        defaults: dict[str, object] = {"answer_delay": 0.5, "timers": Timers(t1=T1)}
        core = CallCore(CoreSettings("127.0.0.1", **{**defaults, **settings}), entropy=entropy)  # type: ignore[arg-type]
        core.transports["UDP"] = LoopbackTransport()
        return cls(core)

    def collect(self) -> None:
        for send in self.core.take_sends():
            self.sent.setdefault(send.dest, []).append(parse_message(send.data))
        self.events.extend(self.core.take_events())

    def advance(self, seconds: float) -> None:
        """Let `seconds` of test time pass, firing each timer at its own deadline."""
        self.advance_to(self.now + seconds)

    def advance_to(self, end: float) -> None:
        while (deadline := self.core.next_deadline()) is not None and deadline <= end:
            self.now = max(self.now, deadline)
            self.core.poll(self.now)
            self.collect()
        self.now = end

    def take(self, peer: Address) -> list[SipMessage]:
        messages, self.sent[peer] = self.sent.get(peer, []), []
        return messages

    def take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events


class CorePeer:
    """A SIP peer whose messages go straight into the core, at the harness's time."""

    def __init__(self, harness: Harness, port: int) -> None:
        self.harness = harness
        self.port = port

    @property
    def address(self) -> Address:
        return ("127.0.0.1", self.port)

    def send(self, data: bytes | str, dest: Address) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self.harness.core.receive(raw, self.address, "UDP", self.harness.now)
        self.harness.collect()

    def received(self) -> list[SipMessage]:
        return self.harness.take(self.address)

    def statuses(self) -> list[int]:
        return [m.status for m in self.received() if isinstance(m, SipResponse)]

    def requests(self) -> list[SipRequest]:
        return [m for m in self.received() if isinstance(m, SipRequest)]


def answered_call(
    harness: Harness, port: int = 4000, extra: str = "", offer: bool = True
) -> tuple[CorePeer, Dialer, str]:
    """A confirmed inbound call: INVITE, the app accepts, 200 after the answer delay, ACK."""
    peer = CorePeer(harness, port)
    dialer = Dialer(peer, SERVER)  # type: ignore[arg-type]
    dialer.invite(rtp_port=8000 if offer else None, extra=extra)
    [offered] = harness.take_events()
    assert isinstance(offered, CallOffered)
    harness.core.accept(offered.call.id, 20000, harness.now)
    harness.collect()
    harness.advance(harness.core.settings.answer_delay)
    ok = [m for m in peer.received() if isinstance(m, SipResponse) and m.status == 200]
    tag = parse_name_addr(ok[0].headers.get("To") or "").tag or ""
    dialer.ack(tag, sdp_port=None if offer else 8000)
    assert [type(e) for e in harness.take_events()] == [CallConfirmed]
    return peer, dialer, offered.call.id


# -- the state tables ------------------------------------------------------------------


def test_every_state_names_what_every_event_does() -> None:
    assert set(PHASES) == set(itertools.product(CallState, CallEvent))
    assert set(EXCHANGES) == set(itertools.product(Exchange, ExchangeEvent))


def test_the_glare_rule_is_the_exchange_table() -> None:
    # An INVITE of either side under way: the peer's re-INVITE waits (RFC 3261 14.2) ...
    for busy in (Exchange.AWAITING_ACK, Exchange.AWAITING_ANSWER, Exchange.OUR_INVITE):
        assert next_exchange(busy, ExchangeEvent.INVITE_OFFER) == Refusal(491)
        assert next_exchange(busy, ExchangeEvent.SEND_INVITE) == Refusal(491)
        assert next_exchange(busy, ExchangeEvent.UPDATE) == busy  # a refresh without an offer collides with nothing
    # ... an UPDATE's offer only while an offer of ours waits for its answer (RFC 3311 5.2).
    assert next_exchange(Exchange.AWAITING_ACK, ExchangeEvent.UPDATE_OFFER) == Exchange.AWAITING_ACK
    assert next_exchange(Exchange.OUR_INVITE, ExchangeEvent.UPDATE_OFFER) == Refusal(491)
    assert next_phase(CallState.ENDED, CallEvent.BYE) == Refusal(481)


# -- an inbound call -----------------------------------------------------------------------


def test_the_answer_comes_after_the_answer_delay_on_the_clock() -> None:
    harness = Harness.make(answer_delay=0.5)
    peer = CorePeer(harness, 4000)
    Dialer(peer, SERVER).invite(rtp_port=8000)  # type: ignore[arg-type]
    assert peer.statuses() == [100]
    [offered] = harness.take_events()
    assert isinstance(offered, CallOffered) and offered.call.media is not None
    harness.advance(10.0)
    assert peer.statuses() == []  # nothing until the app decides
    harness.core.accept(offered.call.id, 20000, harness.now)
    harness.collect()
    assert peer.statuses() == [180]
    harness.advance(0.499)
    assert peer.statuses() == []
    harness.advance(0.001)
    assert peer.statuses() == [200]


def test_the_app_refuses_with_its_status() -> None:
    harness = Harness.make()
    peer = CorePeer(harness, 4000)
    Dialer(peer, SERVER).invite(rtp_port=8000)  # type: ignore[arg-type]
    [offered] = harness.take_events()
    assert isinstance(offered, CallOffered)
    harness.core.reject(offered.call.id, 486, 60, harness.now)
    harness.collect()
    assert peer.statuses() == [100, 486] and harness.core.calls == []
    assert harness.take_events() == []  # the app never owned it: no CallEnded


def test_too_short_a_session_interval_gets_422_with_our_min_se() -> None:
    harness = Harness.make(session_timers=SessionTimerPolicy(1800, 120))
    peer = CorePeer(harness, 4000)
    Dialer(peer, SERVER).invite(rtp_port=8000, extra="Session-Expires: 90\r\nSupported: timer\r\n")  # type: ignore[arg-type]
    [refusal] = [m for m in peer.received() if isinstance(m, SipResponse)]
    assert refusal.status == 422 and refusal.headers.get("Min-SE") == "120"
    assert harness.core.calls == [] and harness.take_events() == []


def test_a_cancel_before_the_200_ends_the_call_with_487() -> None:
    harness = Harness.make()
    peer = CorePeer(harness, 4000)
    dialer = Dialer(peer, SERVER)  # type: ignore[arg-type]
    dialer.invite(rtp_port=8000)
    [offered] = harness.take_events()
    harness.core.accept(offered.call.id, 20000, harness.now)  # type: ignore[union-attr]
    harness.collect()
    harness.advance(0.2)
    dialer.cancel()
    assert peer.statuses() == [100, 180, 200, 487]  # 200 for the CANCEL, 487 for the INVITE
    [ended] = harness.take_events()
    assert isinstance(ended, CallEnded) and ended.reason == "cancelled"
    harness.advance(1.0)  # the answer delay passes: nothing is answered
    assert all(m.status != 200 for m in peer.received() if isinstance(m, SipResponse) and "INVITE" in (m.headers.get("CSeq") or ""))


def test_a_cancel_while_the_app_decides_ends_the_call_when_it_accepts() -> None:
    harness = Harness.make()
    peer = CorePeer(harness, 4000)
    dialer = Dialer(peer, SERVER)  # type: ignore[arg-type]
    dialer.invite(rtp_port=8000)
    [offered] = harness.take_events()
    dialer.cancel()
    assert peer.statuses() == [100, 200, 487]
    assert harness.take_events() == []
    harness.core.accept(offered.call.id, 20000, harness.now)  # type: ignore[union-attr]
    harness.collect()
    [ended] = harness.take_events()  # the media it opened is released
    assert isinstance(ended, CallEnded) and ended.reason == "cancelled"
    assert peer.statuses() == []  # no 180 for a cancelled call


def test_a_cancel_after_the_200_changes_nothing() -> None:
    harness = Harness.make()
    peer, dialer, _ = answered_call(harness)
    peer.received()
    dialer.cancel()
    assert peer.statuses() == [200]  # the CANCEL is answered, the INVITE is not
    assert [c.state for c in harness.core.calls] == [CallState.CONFIRMED]


def test_a_lost_ack_ends_the_call_at_timer_h() -> None:
    harness = Harness.make()
    peer = CorePeer(harness, 4000)
    Dialer(peer, SERVER).invite(rtp_port=8000)  # type: ignore[arg-type]
    [offered] = harness.take_events()
    harness.core.accept(offered.call.id, 20000, harness.now)  # type: ignore[union-attr]
    harness.advance(0.5)
    answered_at = harness.now
    harness.advance_to(answered_at + 64 * T1 - 0.001)
    assert not [r for r in peer.requests() if r.method == "BYE"]
    harness.advance_to(answered_at + 64 * T1)
    assert [r.method for r in peer.requests()] == ["BYE"]
    [ended] = harness.take_events()
    assert isinstance(ended, CallEnded) and ended.reason == "no ACK"


def test_the_maximum_duration_ends_the_call_on_time() -> None:
    harness = Harness.make(max_call_duration=600.0)
    peer, _, call_id = answered_call(harness)
    peer.received()
    harness.advance_to(0.5 + 600.0 - 0.001)  # counted from the answer, half a second after the INVITE
    assert peer.requests() == []
    harness.advance_to(0.5 + 600.0)
    assert [r.method for r in peer.requests()] == ["BYE"]
    [ended] = harness.take_events()
    assert isinstance(ended, CallEnded) and ended.call.id == call_id and ended.reason == "maximum duration"


def test_a_forged_in_dialog_request_is_refused_and_changes_nothing() -> None:
    harness = Harness.make()
    peer, dialer, _ = answered_call(harness)
    peer.received()
    dialer.from_tag = "forged"  # Call-ID and our tag known, the caller's tag guessed wrong
    dialer.in_dialog("INVITE", sdp_port=6666)
    dialer.in_dialog("BYE")
    assert peer.statuses() == [481, 481]
    [call] = harness.core.calls
    assert call.state is CallState.CONFIRMED and call.audio is not None and call.audio.remote_port == 8000
    assert harness.take_events() == []
    assert harness.core.counters.orphans == 0  # our dialog, a stranger's tag: refused, not an orphan


def test_requests_in_a_dialog_this_process_never_held_get_481_and_count_as_orphans() -> None:
    """What a restarted process hears from the calls its killed predecessor answered (RFC 3261 12.2.2)."""
    harness = Harness.make()
    peer, dialer, _ = answered_call(harness)
    peer.received()
    elsewhere = CorePeer(harness, 4100)
    stranger = Dialer(elsewhere, SERVER)  # type: ignore[arg-type]
    stranger.to_tag = "tag-of-a-process-gone"
    for method, body, kind in (("BYE", "", ""), ("INFO", "Signal=5\r\nDuration=160\r\n", "application/dtmf-relay"),
                               ("UPDATE", "", "")):  # fmt: skip
        stranger.in_dialog(method, body=body, content_type=kind)
    stranger.in_dialog("INVITE", sdp_port=6000)
    assert elsewhere.statuses() == [481, 481, 481, 481]
    assert harness.core.counters.orphans == 4
    stranger.to_tag = ""
    stranger.in_dialog("BYE")  # no To tag: not inside any dialog, refused all the same
    assert elsewhere.statuses() == [481]
    assert harness.core.counters.orphans == 4
    dialer.in_dialog("BYE")  # the call this process holds ends as ever
    assert peer.statuses() == [200] and harness.core.counters.orphans == 4


# -- session timers and glare ------------------------------------------------------------------

TIMER_POLICY = SessionTimerPolicy(session_expires=90, min_se=90)


def test_we_refresh_at_half_the_interval_and_the_session_goes_on() -> None:
    harness = Harness.make(session_timers=TIMER_POLICY)
    peer, _, _ = answered_call(harness, extra="Supported: timer\r\nAllow: INVITE, ACK, BYE, UPDATE\r\nSession-Expires: 90;refresher=uas\r\n")
    peer.received()
    harness.advance_to(0.5 + 45.0 - 0.001)  # half the interval after the answer
    assert peer.requests() == []
    harness.advance_to(0.5 + 45.0)
    [update] = peer.requests()
    assert update.method == "UPDATE" and update.headers.get("Session-Expires") == "90;refresher=uac"
    peer.send(serialize(response_to(update, 200, headers=[("Session-Expires", "90;refresher=uac")])), SERVER)
    harness.advance(45.0)  # the next refresh, 45 s after the first was answered
    assert [r.method for r in peer.requests()] == ["UPDATE"]
    assert [c.state for c in harness.core.calls] == [CallState.CONFIRMED]


def test_a_session_the_peer_stops_refreshing_expires() -> None:
    harness = Harness.make(session_timers=TIMER_POLICY)
    peer, dialer, _ = answered_call(harness, extra="Supported: timer\r\nSession-Expires: 90;refresher=uac\r\n")
    peer.received()
    harness.advance_to(40.0)
    dialer.in_dialog("UPDATE", extra="Supported: timer\r\nSession-Expires: 90;refresher=uac\r\n")  # its refresh
    assert peer.statuses() == [200]
    harness.advance_to(40.0 + 90.0 - 30.0 - 0.001)  # expiry: interval - min(32, interval / 3) after that refresh
    assert peer.requests() == [] and harness.take_events() == []
    harness.advance_to(40.0 + 90.0 - 30.0)
    assert [r.method for r in peer.requests()] == ["BYE"]
    [ended] = harness.take_events()
    assert isinstance(ended, CallEnded) and ended.reason == "session expired"


def test_glare_both_ways_491_and_our_retry_after_the_backoff() -> None:
    harness = Harness.make(session_timers=TIMER_POLICY)
    peer, dialer, _ = answered_call(harness, extra="Supported: timer\r\nSession-Expires: 90;refresher=uas\r\n")
    peer.received()
    harness.advance_to(45.5)  # half the interval after the answer
    [reinvite] = peer.requests()  # our refresh: a re-INVITE (the peer did not Allow UPDATE)
    assert reinvite.method == "INVITE" and reinvite.body
    dialer.in_dialog("INVITE", sdp_port=6000)  # the peer's re-INVITE crosses ours
    assert peer.statuses() == [491]
    peer.send(serialize(response_to(reinvite, 491, to_tag=dialer.from_tag)), SERVER)  # and it refuses ours
    [ack] = peer.requests()  # the transaction ACKs the 491
    assert ack.method == "ACK"
    refused_at = harness.now
    harness.advance_to(refused_at + 0.999)  # the backoff: uniform(0, 2 s), fixed at 1 s here
    assert peer.requests() == []
    harness.advance_to(refused_at + 1.0)
    [retry] = peer.requests()
    assert retry.method == "INVITE"
    assert [c.state for c in harness.core.calls] == [CallState.CONFIRMED]


def test_our_refresh_refused_422_goes_again_with_the_peers_min_se() -> None:
    harness = Harness.make(session_timers=TIMER_POLICY)
    peer, dialer, _ = answered_call(harness, extra="Allow: UPDATE\r\nSupported: timer\r\nSession-Expires: 90;refresher=uas\r\n")
    peer.received()
    harness.advance_to(45.5)  # half the interval after the answer
    [update] = peer.requests()
    peer.send(serialize(response_to(update, 422, to_tag=dialer.from_tag, headers=[("Min-SE", "300")])), SERVER)
    harness.advance(0.0)  # due at once
    [again] = peer.requests()
    assert again.method == "UPDATE" and again.headers.get("Session-Expires") == "300;refresher=uac"


def test_a_reoffer_reports_the_media_change() -> None:
    harness = Harness.make()
    peer, dialer, call_id = answered_call(harness)
    peer.received()
    dialer.in_dialog("INVITE", sdp_port=8000, direction="sendonly")
    assert peer.statuses() == [200]
    [changed] = harness.take_events()
    assert isinstance(changed, MediaChanged) and changed.call.id == call_id
    assert changed.call.media is not None and changed.call.media.on_hold


# -- an outbound call ---------------------------------------------------------------------------

UAS: Address = ("127.0.0.1", 7000)


def answer_sdp() -> bytes:
    return OFFER.format(port=9000, formats="0 101", direction="sendrecv").encode()


def outbound(harness: Harness, **options: object) -> tuple[str, SipRequest]:
    call_id = harness.core.invite("sip:help@127.0.0.1:7000", UAS, "UDP", 20000, harness.now, **options)  # type: ignore[arg-type]
    harness.collect()
    [invite] = harness.take(UAS)
    assert isinstance(invite, SipRequest) and invite.method == "INVITE"
    return call_id, invite


def reply(harness: Harness, request: SipRequest, status: int, tag: str = "uas1", **extra: object) -> SipResponse:
    headers = [("Contact", "<sip:help@127.0.0.1:7000>")] if status < 300 else []
    body = answer_sdp() if 200 <= status < 300 else b""
    if body:
        headers.append(("Content-Type", "application/sdp"))
    headers += list(extra.get("headers", []))  # type: ignore[call-overload]
    response = response_to(request, status, to_tag=tag if status > 100 else None, headers=headers, body=body)
    harness.core.receive(serialize(response), UAS, "UDP", harness.now)
    harness.collect()
    return response


def test_our_invite_is_anonymous_and_offers_our_codecs() -> None:
    harness = Harness.make()
    _, invite = outbound(harness)
    assert "anonymous.invalid" in (invite.headers.get("From") or "") and invite.headers.get("Privacy") == "id"
    assert b"m=audio 20000 RTP/AVP" in invite.body


def test_answered_then_acked_once_per_2xx_and_ended_by_the_peer() -> None:
    harness = Harness.make()
    call_id, invite = outbound(harness)
    reply(harness, invite, 180)
    assert harness.take_events() == [Ringing(call_id, 180)]
    ok = reply(harness, invite, 200)
    [ack] = harness.take(UAS)
    assert isinstance(ack, SipRequest) and ack.method == "ACK" and (ack.headers.get("CSeq") or "").endswith(" ACK")
    [answered] = harness.take_events()
    assert isinstance(answered, Answered) and answered.call.media is not None
    assert answered.call.media.remote == ("127.0.0.1", 9000) and answered.call.outbound
    harness.core.receive(serialize(ok), UAS, "UDP", harness.now)  # the 2xx again: our ACK was lost
    harness.collect()
    assert [m for m in harness.take(UAS)] == [ack]  # the same ACK, not a second call
    assert harness.take_events() == []
    peer = CorePeer(harness, 7000)
    bye = (
        f"BYE sip:voiceline@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:7000;branch=z9hG4bKbye1\r\n"
        f"From: <sip:help@127.0.0.1:7000>;tag=uas1\r\nTo: {invite.headers.get('From')}\r\n"
        f"Call-ID: {invite.headers.get('Call-ID')}\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n"
    )
    peer.send(bye, SERVER)
    assert peer.statuses() == [200]
    [ended] = harness.take_events()
    assert isinstance(ended, CallEnded) and ended.reason == "peer hung up" and harness.core.calls == []


def test_we_end_the_answered_call_with_bye() -> None:
    harness = Harness.make()
    call_id, invite = outbound(harness)
    reply(harness, invite, 200)
    harness.take(UAS)
    harness.take_events()
    harness.core.hangup(call_id, "done", harness.now)
    harness.collect()
    [bye] = harness.take(UAS)
    assert isinstance(bye, SipRequest) and bye.method == "BYE" and bye.uri == "sip:help@127.0.0.1:7000"
    assert [type(e) for e in harness.take_events()] == [CallEnded]


def test_refused_486() -> None:
    harness = Harness.make()
    call_id, invite = outbound(harness)
    reply(harness, invite, 486)
    [ack] = harness.take(UAS)  # the transaction ACKs an error itself
    assert isinstance(ack, SipRequest) and ack.method == "ACK"
    assert harness.take_events() == [Refused(call_id, 486)] and harness.core.calls == []


def test_a_challenge_is_answered_once_with_our_credentials() -> None:
    harness = Harness.make()
    server = DigestServer("voiceline.test")
    call_id, invite = outbound(harness, credentials=DigestClient("alice", "secret"))
    reply(harness, invite, 401, headers=[("WWW-Authenticate", v) for v in server.challenges(0.0, "")])
    ack, again = harness.take(UAS)
    assert isinstance(ack, SipRequest) and ack.method == "ACK"
    assert isinstance(again, SipRequest) and again.method == "INVITE"
    assert again.headers.get("Call-ID") == invite.headers.get("Call-ID")
    assert int((again.headers.get("CSeq") or "").split()[0]) == int((invite.headers.get("CSeq") or "").split()[0]) + 1
    authorization = again.headers.get("Authorization") or ""
    ha1 = {algorithm: digest_ha1(algorithm, "alice", "voiceline.test", "secret") for algorithm in OFFERED}
    verdict = server.check(authorization, "INVITE", invite.uri, "alice", ha1, 0.0, "")
    assert verdict is Verdict.OK
    reply(harness, again, 401, headers=[("WWW-Authenticate", v) for v in server.challenges(0.0, "")])
    assert harness.take_events() == [Refused(call_id, 401)]  # refused credentials: not tried forever


def test_cancel_waits_for_a_provisional_then_487() -> None:
    harness = Harness.make()
    call_id, invite = outbound(harness)
    harness.core.hangup(call_id, "changed my mind", harness.now)
    harness.collect()
    assert harness.take(UAS) == []  # nothing heard yet: no CANCEL (RFC 3261 9.1)
    reply(harness, invite, 180)
    [cancel] = harness.take(UAS)
    assert isinstance(cancel, SipRequest) and cancel.method == "CANCEL"
    assert cancel.headers.get("Via") == invite.headers.get("Via")
    reply(harness, invite, 487)
    assert Cancelled(call_id) in harness.take_events() and harness.core.calls == []


def test_a_200_crossing_our_cancel_is_acked_and_ended_with_bye() -> None:
    harness = Harness.make()
    call_id, invite = outbound(harness)
    reply(harness, invite, 180)
    harness.core.hangup(call_id, "changed my mind", harness.now)
    harness.collect()
    harness.take(UAS)  # the CANCEL
    reply(harness, invite, 200)
    methods = [m.method for m in harness.take(UAS) if isinstance(m, SipRequest)]
    assert methods == ["ACK", "BYE"]
    assert harness.take_events()[-1] == Cancelled(call_id) and harness.core.calls == []


def test_no_response_times_out_at_timer_b_and_ringing_forever_at_the_ring_timeout() -> None:
    harness = Harness.make()
    call_id, _ = outbound(harness)
    harness.advance(64 * T1)
    assert harness.take_events() == [TimedOut(call_id)]
    assert len(harness.take(UAS)) == 6  # Timer A's retransmissions at 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s
    call_id, invite = outbound(harness, ring_timeout=30.0)
    reply(harness, invite, 180)
    harness.take_events()
    placed_at = harness.now
    harness.advance_to(placed_at + 30.0 - 0.001)
    assert [m for m in harness.take(UAS) if isinstance(m, SipRequest) and m.method == "CANCEL"] == []
    harness.advance_to(placed_at + 30.0)
    assert [m.method for m in harness.take(UAS) if isinstance(m, SipRequest)] == ["CANCEL"]
    reply(harness, invite, 487)
    assert harness.take_events() == [TimedOut(call_id)]


def test_requests_for_an_unanswered_outbound_call_get_481() -> None:
    """No dialog before the 2xx (the phase table): a BYE for it is refused and the call rings on."""
    harness = Harness.make()
    _, invite = outbound(harness)
    peer = CorePeer(harness, 7000)
    bye = (
        f"BYE sip:voiceline@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:7000;branch=z9hG4bKearly\r\n"
        f"From: <sip:help@127.0.0.1:7000>;tag=uas1\r\nTo: {invite.headers.get('From')}\r\n"
        f"Call-ID: {invite.headers.get('Call-ID')}\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n"
    )
    peer.send(bye, SERVER)
    assert peer.statuses() == [481]
    assert [c.state for c in harness.core.calls] == [CallState.CALLING]


def test_no_event_carries_the_callers_identity() -> None:
    harness = Harness.make()
    peer = CorePeer(harness, 4000)
    dialer = Dialer(peer, SERVER, from_user="+15551234567", to_user="+15559876543")  # type: ignore[arg-type]
    dialer.contact_uri = "sip:+15551234567@127.0.0.1:4000"
    dialer.invite(rtp_port=8000)
    [offered] = harness.take_events()
    assert isinstance(offered, CallOffered)
    harness.core.accept(offered.call.id, 20000, harness.now)
    harness.advance(0.5)
    tag = to_tag([m for m in peer.received() if isinstance(m, SipResponse) and m.status == 200][0])
    dialer.ack(tag)
    dialer.in_dialog("INFO", body="Signal=5\r\nDuration=160\r\n", content_type="application/dtmf-relay")
    dialer.in_dialog("BYE")
    events = [offered, *harness.take_events()]
    assert [type(e).__name__ for e in events] == ["CallOffered", "CallConfirmed", "Dtmf", "CallEnded"]
    for event in events:
        assert "5551234567" not in repr(event) and "5559876543" not in repr(event)
