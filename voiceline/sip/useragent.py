"""The SIP user agent core: answers inbound calls, keeps their dialogs and ends them (RFC 3261 as a UAS).

Timers and retransmissions live in the sans-I/O transaction layer, SDP
exchanges in `offer_answer`, session timers in `session_timer`; this module is
the asyncio edge that feeds them messages and the loop clock and tells the
call handler (the app) when a call is offered, confirmed, changed and ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from voiceline import __version__
from voiceline.privacy import new_call_id
from voiceline.sip.dialog import DEFAULT_SIP_PORT, Dialog, contact_target, is_ip_address, new_tag
from voiceline.sip.message import (
    Headers,
    SipParseError,
    SipRequest,
    SipResponse,
    UnsupportedVersion,
    parse_message,
    parse_name_addr,
    parse_uri,
    parse_via,
    response_to,
    salvage_request_headers,
    serialize,
)
from voiceline.sip.offer_answer import OfferAnswer
from voiceline.sip.overload import OverloadGuard, OverloadLimits, Verdict
from voiceline.sip.sdp import NegotiatedAudio, NoCommonCodec, SdpError, SessionDescription, parse_sdp
from voiceline.sip.session_timer import (
    Action,
    Agreement,
    SessionTimer,
    SessionTimerPolicy,
    TooSmall,
    answer_request,
    answer_response,
    request_headers,
)
from voiceline.sip.transaction import (
    ClientTransaction,
    Incoming,
    Send,
    ServerTransaction,
    Timers,
    TransactionLayer,
)
from voiceline.sip.transport import Address, SipTransport, StreamTransport
from voiceline.sip.trunks import Admission, Admit, Drop, Refuse, RequestPolicy

log = structlog.get_logger("voiceline.sip")

ALLOWED_METHODS = "INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE, INFO"
SUPPORTED_EXTENSIONS = ("timer",)
USER_AGENT = f"voiceline/{__version__}"
DTMF_CONTENT_TYPES = ("application/dtmf-relay", "application/dtmf")
DTMF_DIGITS = frozenset("0123456789*#ABCD")
GLARE_RETRY_SECONDS = 2.0  # our refused refresh goes again after a random 0-2 s (RFC 3261 14.1)


# What to do with the final response to one of our requests (None: Timer F or B fired).
FinalHandler = Callable[[ClientTransaction, SipResponse | None], None]


class CallState(enum.Enum):
    OFFERED = "offered"  # INVITE received, ringing
    ANSWERED = "answered"  # 200 OK sent, waiting for the ACK
    CONFIRMED = "confirmed"  # ACK received: media flows
    ENDED = "ended"


class _Refused(Exception):
    """Raised while handling a request: answer it with this status, nothing else changes."""

    def __init__(self, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(status)
        self.status = status
        self.headers = list(headers)


class CallRejected(Exception):
    """Raised by the call handler to refuse a call with a SIP status."""

    def __init__(self, status: int, retry_after: int | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.retry_after = retry_after


@dataclass(eq=False)
class Call:
    """One inbound call leg. `id` is random and is what logs and records use."""

    id: str
    dialog: Dialog
    media: OfferAnswer  # SDP state: the negotiated audio, our last SDP, a pending offer
    offer: SessionDescription | None  # the INVITE's offer; None when it came without one
    invite: ServerTransaction
    state: CallState = CallState.OFFERED
    media_ready: bool = False  # the handler accepted the call and owns media for it
    awaiting_ack: ServerTransaction | None = None  # an INVITE whose 2xx is retransmitted until ACKed
    peer_allows_update: bool = False
    session_agreement: Agreement | None = None  # what the INVITE's 200 says about session timers
    session_timer: SessionTimer | None = None
    refresh: ClientTransaction | None = None  # our session refresh in progress
    ends_at: float = 0.0  # maximum call duration; 0: none
    trunk: str = ""  # the trunk it came in on (admission policy), "" without a policy
    line: str = ""  # the line its dialled number reaches
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def audio(self) -> NegotiatedAudio | None:
        """The negotiated audio; None until an offerless INVITE's ACK brought the answer."""
        return self.media.audio

    @property
    def on_hold(self) -> bool:
        """The caller put us on hold (sendonly/inactive): we must not send to it."""
        return self.media.on_hold

    @property
    def local_rtp_port(self) -> int:
        return self.media.local_port


class CallHandler(Protocol):
    async def call_offered(self, call: Call) -> int:
        """Prepare media; return the local RTP port for the SDP, or raise CallRejected.

        `call.audio` is None when the INVITE had no offer: it is set by the time of call_confirmed.
        """
        ...

    def call_confirmed(self, call: Call) -> None: ...

    def call_media_changed(self, call: Call) -> None:
        """A re-INVITE or UPDATE changed the direction (`call.on_hold`) or the remote address."""
        ...

    def call_dtmf(self, call: Call, digit: str) -> None:
        """A digit sent by SIP INFO (application/dtmf-relay or application/dtmf)."""
        ...

    def call_ended(self, call: Call) -> None: ...


@dataclass
class UserAgentSettings:
    advertised_host: str
    answer_delay: float = 0.5
    timers: Timers = Timers()
    max_message_size: int = 65535
    codecs: tuple[str, ...] = ("PCMU", "PCMA")
    session_timers: SessionTimerPolicy = SessionTimerPolicy()
    max_call_duration: float = 0.0  # seconds from the answer; 0: unlimited
    overload: OverloadLimits = field(default_factory=OverloadLimits)


@dataclass
class SipCounters:
    received: int = 0
    malformed: int = 0
    oversized: int = 0
    calls: int = 0


class UserAgent:
    def __init__(self, settings: UserAgentSettings, handler: CallHandler, policy: RequestPolicy | None = None) -> None:
        self.settings = settings
        self.handler = handler
        self.policy = policy
        self.transactions = TransactionLayer(settings.timers)
        self.counters = SipCounters()
        self.overload = OverloadGuard(settings.overload)
        self.transports: dict[str, SipTransport] = {}  # by name: "UDP", "TCP", "TLS"
        self._calls: dict[tuple[str, str], Call] = {}  # (Call-ID, our tag) -> call
        self._calls_by_invite: dict[ServerTransaction, Call] = {}
        # Our pending requests and what to do with their final response (None: Timer F/B fired).
        self._pending: dict[ClientTransaction, FinalHandler] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = False
        self._loop = asyncio.get_running_loop()

    # -- lifecycle -----------------------------------------------------------

    def attach(self, transport: SipTransport) -> None:
        """Add a listening transport; its messages come in through `message_received`."""
        self.transports[transport.name] = transport
        if isinstance(transport, StreamTransport):
            transport.busy_peers = functools.partial(self._call_peers, transport.name)

    def _call_peers(self, transport_name: str) -> set[Address]:
        """Remote addresses of the connections that live calls came in on."""
        return {call.invite.source for call in self._calls.values() if call.invite.transport == transport_name}

    @property
    def transport(self) -> SipTransport | None:
        """The first transport attached (UDP unless it is off)."""
        return next(iter(self.transports.values()), None)

    def contact_for(self, tx: ServerTransaction) -> str:
        """Our Contact for a dialog set up by `tx`: reachable over the transport it came on."""
        port = self.transports[tx.transport].local_address[1]
        host = self.settings.advertised_host
        if tx.transport == "UDP":
            return f"<sip:voiceline@{host}:{port}>"
        if tx.transport == "TLS" and tx.request.uri[:5].lower() == "sips:":
            return f"<sips:voiceline@{host}:{port}>"  # 8.1.1.8: a sips Request-URI needs a sips Contact
        return f"<sip:voiceline@{host}:{port};transport={tx.transport.lower()}>"

    @property
    def calls(self) -> list[Call]:
        return list(self._calls.values())

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        """Refuse new calls (503 with Retry-After); calls in progress go on."""
        if not self._draining:
            self._draining = True
            log.info("sip.draining", calls=len(self._calls))

    async def shutdown(self, timeout: float = 4.0) -> None:
        """Refuse new calls, send BYE on every call, wait (bounded) for the answers."""
        self._draining = True
        for call in list(self._calls.values()):
            self.hangup(call, "service stopping")  # never raises: one call's failure stops no other BYE
        deadline = self._loop.time() + timeout
        while self._pending and self._loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self._tasks):
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()

    # -- inbound -------------------------------------------------------------

    def message_received(self, data: bytes, source: Address, transport: SipTransport) -> None:
        """One datagram, or one framed stream message; `source` names the sender or the connection."""
        try:
            self._on_message(data, source, transport)
        except Exception as exc:  # no input may stop the server; the message text is not logged
            log.error("sip.internal_error", error=type(exc).__name__, exc_info=exc)

    def _on_message(self, data: bytes, source: Address, transport: SipTransport) -> None:
        self.counters.received += 1
        if len(data) > self.settings.max_message_size:
            self.counters.oversized += 1
            return
        if not data.strip(b"\r\n"):
            return  # keep-alive
        try:
            message = parse_message(data, self.settings.max_message_size)
        except SipParseError as error:
            self._on_unparsed(data, source, transport, error)
            return
        reply_to = source
        try:
            if isinstance(message, SipRequest):
                admission = self._source_admission(source, transport, count=message.method != "ACK")
                if isinstance(admission, Drop) or not self._admitted(message, source, transport):
                    return
                if isinstance(admission, Refuse):  # after the rate limit: a flood of 403s is limited too
                    self._refuse_stateless(message, source, transport, admission)
                    return
                reply_to = _stamp_via(message, source, transport)
                self._on_request(message, reply_to, transport.name, admission.trunk)
            else:
                self._on_response(message)  # matched by our own random branch, whoever sends it
        except SipParseError:
            # A header the parser accepted but transaction matching could not use.
            self.counters.malformed += 1
            if isinstance(message, SipRequest) and message.method != "ACK":
                self._send(Send(_serialize_response(response_to(message, 400)), reply_to, transport.name))
        self._reschedule()  # an ACK or a response may have cancelled timers

    def _on_unparsed(self, data: bytes, source: Address, transport: SipTransport, error: SipParseError) -> None:
        """Answer a message the parser refused (400, 505): when its headers can be read back and its source admitted."""
        if not isinstance(error, UnsupportedVersion):
            self.counters.malformed += 1
            log.debug("sip.malformed", size=len(data))
        headers = salvage_request_headers(data)
        if headers is None:
            return  # a response, an ACK or unreadable: never answered
        request = SipRequest("INVITE", "sip:invalid", headers)
        admission = self._source_admission(source, transport)
        if isinstance(admission, Admit):
            admission = Refuse(505 if isinstance(error, UnsupportedVersion) else 400)
        try:
            self._refuse_stateless(request, source, transport, admission)
        except SipParseError:
            pass  # not even the salvaged headers make a response

    def _source_admission(self, source: Address, transport: SipTransport, count: bool = True) -> Admission:
        """Every request's first check: a source no trunk matches gets 403 or nothing, before any other answer."""
        return Admit("") if self.policy is None else self.policy.check_source(source, transport.name, count)

    def _refuse_stateless(
        self, request: SipRequest, source: Address, transport: SipTransport, refusal: Refuse | Drop
    ) -> None:
        """Answer without a transaction (nothing is kept for the sender); an ACK or a Drop gets no answer."""
        if isinstance(refusal, Drop) or request.method == "ACK":
            return
        try:
            reply_to = _stamp_via(request, source, transport)
        except SipParseError:
            reply_to = source
        response = response_to(request, refusal.status, to_tag=new_tag(), headers=refusal.headers)
        self._send(Send(_serialize_response(response), reply_to, transport.name))

    def _admitted(self, request: SipRequest, source: Address, transport: SipTransport) -> bool:
        """The overload guard at the entry: scanners and over-limit sources never reach a transaction."""
        now = self._loop.time()
        verdict = self.overload.check(request.method, request.headers.get("User-Agent"), source[0], now)
        if verdict is Verdict.ACCEPT:
            return True
        if verdict is Verdict.REJECT:
            retry = (("Retry-After", str(self.settings.overload.retry_after)),)
            self._refuse_stateless(request, source, transport, Refuse(503, retry))
        report = self.overload.report(now)
        if report is not None:
            log.warning("sip.overload", **report)  # aggregate counts only, never a source
        return False

    def _on_request(self, request: SipRequest, source: Address, transport: str, trunk: str) -> None:
        """A request from an admitted source; `trunk` is the one its source belongs to ("" without a policy)."""
        log.debug("sip.request", method=request.method)
        now = self._loop.time()
        kind, tx, sends = self.transactions.on_request(request, source, now, transport)
        self._send_all(sends)
        if kind is Incoming.ABSORBED:
            return
        if kind is Incoming.ACK:
            self._on_ack(request, trunk)
            return
        assert tx is not None
        if kind is Incoming.LOOP:
            self._respond(tx, 482)
            return
        try:
            self._dispatch(tx, request, trunk)
        except _Refused as refused:
            self._respond(tx, refused.status, refused.headers)
        except SipParseError:
            # A header the parser accepted but this request's handling needs in a stricter form
            # (e.g. an INVITE without a usable Contact): 400 through its transaction.
            self.counters.malformed += 1
            self._respond(tx, 400)

    def _dispatch(self, tx: ServerTransaction, request: SipRequest, trunk: str) -> None:
        max_forwards = request.headers.get("Max-Forwards")  # the parser checked it is numeric
        if max_forwards is not None and int(max_forwards) == 0 and request.method != "OPTIONS":
            self._respond(tx, 483)
            return
        to_tag = parse_name_addr(request.headers.get("To") or "").tag
        admission = Admit("")
        if self.policy is not None and to_tag is None and request.method != "CANCEL":
            verdict = self.policy.check(request, tx.source, tx.transport)
            if isinstance(verdict, Drop):
                self.transactions.discard(tx)
                return
            if isinstance(verdict, Refuse):
                self._respond(tx, verdict.status, verdict.headers)
                return
            admission = verdict
        if request.method == "INVITE" and to_tag is None:
            self._on_invite(tx, request, admission)
        elif request.method == "CANCEL":
            self._on_cancel(tx, request)
        elif request.method == "OPTIONS":
            self._respond(tx, 200, [*self._capabilities(), ("Accept", "application/sdp")])
        elif request.method in ("BYE", "INVITE", "UPDATE", "INFO"):
            self._on_in_dialog(tx, request, trunk)
        else:
            self._respond_and_forget(tx, 405, [("Allow", ALLOWED_METHODS)])

    def _on_invite(self, tx: ServerTransaction, request: SipRequest, admission: Admit) -> None:
        if self._draining:
            self._respond(tx, 503, [("Retry-After", "60")])
            return
        if not self.overload.admit_call(len(self._calls)):
            self._respond(tx, 503, [("Retry-After", str(self.settings.overload.retry_after))])
            return
        if not request.uri.lower().startswith(("sip:", "sips:")):
            self._respond(tx, 416)
            return
        _check_required(request)
        offer = _read_offer(request)
        timers = self._session_timers(request)
        codecs = tuple(c for c in self.settings.codecs if c in admission.codecs or not admission.codecs)
        media = OfferAnswer(self.settings.advertised_host, codecs)
        audio = None
        if offer is not None:
            try:
                audio = media.negotiate_offer(offer)
            except NoCommonCodec:
                raise _Refused(488) from None
            except SdpError:
                raise _Refused(400) from None
        dialog = Dialog.from_invite(request, new_tag())
        call = Call(
            new_call_id(), dialog, media, offer, tx, session_agreement=timers, trunk=admission.trunk, line=admission.line
        )
        call.peer_allows_update = _lists(request.headers, "Allow", "UPDATE")
        if audio is not None:
            media.audio = audio  # answered in the 200 once the local port is known
        self._calls[(dialog.call_id, dialog.local_tag)] = call
        self._calls_by_invite[tx] = call
        self.counters.calls += 1
        self._respond(tx, 100)
        log.info("call.offered", call=call.id, codec=audio.codec if audio else None, trunk=call.trunk, line=call.line)
        self._spawn(self._answer(call))

    def _session_timers(self, request: SipRequest) -> Agreement | None:
        timers = answer_request(request.headers, self.settings.session_timers)
        if isinstance(timers, TooSmall):
            raise _Refused(422, [("Min-SE", str(timers.min_se))])
        return timers

    async def _answer(self, call: Call) -> None:
        try:
            await self._ring_and_answer(call)
        except Exception as exc:  # a bug in one call ends that call, with its trace in the log
            log.error("call.answer_failed", call=call.id, error=type(exc).__name__, exc_info=exc)
            self.hangup(call, "internal error")

    async def _ring_and_answer(self, call: Call) -> None:
        try:
            call.media.local_port = await self.handler.call_offered(call)
        except CallRejected as exc:
            extra = [("Retry-After", str(exc.retry_after))] if exc.retry_after else []
            self._final_without_dialog(call, exc.status, extra)
            return
        call.media_ready = True
        if call.state is CallState.ENDED:  # cancelled while media was being prepared
            self.handler.call_ended(call)
            return
        record_routes = [("Record-Route", route) for route in call.dialog.route_set]  # 12.1.1
        self._respond(call.invite, 180, [*record_routes, *self._call_headers(call)])
        await asyncio.sleep(self.settings.answer_delay)
        if call.state is not CallState.OFFERED:
            return
        if call.offer is not None and call.audio is not None:
            sdp = call.media.answer(call.offer, call.audio)
        else:
            sdp = call.media.offer()  # the answer comes in the ACK
        call.state = CallState.ANSWERED
        call.awaiting_ack = call.invite
        agreement = call.session_agreement
        timer_headers = list(agreement.response_headers) if agreement else []
        self._respond(call.invite, 200, [*record_routes, *self._call_headers(call), *timer_headers], sdp)
        now = self._loop.time()
        if agreement is not None:
            call.session_timer = SessionTimer(agreement.interval, agreement.we_refresh, now)
        if self.settings.max_call_duration:
            call.ends_at = now + self.settings.max_call_duration
        self._arm_call_timer(call)
        log.info("call.answered", call=call.id, offered=call.offer is not None)

    def _on_ack(self, request: SipRequest, trunk: str) -> None:
        call = self._dialog_of(request, trunk)
        if call is None or call.awaiting_ack is None:
            return  # a stray, repeated or forged ACK
        self._stop_awaiting_ack(call)
        if call.media.offer_pending:  # we offered in the 200: the ACK carries the answer (13.2.1)
            before = call.audio
            try:
                call.media.take_answer(request.body)
            except SdpError:
                log.warning("call.no_answer_in_ack", call=call.id)
                self.hangup(call, "no usable answer in the ACK")
                return
            if call.state is CallState.CONFIRMED:
                self._media_maybe_changed(call, before)
        if call.state is CallState.ANSWERED:
            call.state = CallState.CONFIRMED
            log.info("call.confirmed", call=call.id, on_hold=call.on_hold)
            self.handler.call_confirmed(call)

    def _on_cancel(self, tx: ServerTransaction, request: SipRequest) -> None:
        invite = self.transactions.find_invite(request)
        # Only the INVITE's own sender may cancel it (same host and transport): a copied branch is not enough.
        if invite is None or (invite.source[0], invite.transport) != (tx.source[0], tx.transport):
            self._respond_and_forget(tx, 481)  # keeps no transaction under the INVITE's branch for the real CANCEL
            return
        call = self._calls_by_invite.get(invite)
        self._respond(tx, 200)
        if call is not None and call.state is CallState.OFFERED:
            self._respond(invite, 487)
            self._end(call, "cancelled")

    def _dialog_of(self, request: SipRequest, trunk: str) -> Call | None:
        """The live call whose dialog the request belongs to: Call-ID and both tags (12.2.2), from the call's trunk.

        Anything else is answered as an unknown dialog, so a stranger learns nothing and changes nothing.
        """
        to_tag = parse_name_addr(request.headers.get("To") or "").tag
        call = self._calls.get((request.headers.get("Call-ID") or "", to_tag or ""))
        if call is None or call.state is CallState.ENDED or call.trunk != trunk or not call.dialog.matches(request):
            return None
        return call

    def _on_in_dialog(self, tx: ServerTransaction, request: SipRequest, trunk: str) -> None:
        call = self._dialog_of(request, trunk)
        if call is None:
            self._respond_and_forget(tx, 481)
            return
        if not call.dialog.accepts_remote_seq(request):
            self._respond(tx, 500)
            return
        if request.method == "BYE":
            self._respond(tx, 200)
            self._end(call, "caller hung up")
        elif request.method == "INFO":
            self._on_info(tx, request, call)
        else:
            self._on_session_change(tx, request, call)

    def _on_session_change(self, tx: ServerTransaction, request: SipRequest, call: Call) -> None:
        """A re-INVITE or an UPDATE: maybe an offer (hold, resume, new address), maybe a session refresh."""
        is_invite = request.method == "INVITE"
        _check_required(request)
        offer = _read_offer(request)
        target = contact_target(request.headers)  # checked before anything changes: 400 when unusable
        # Glare (RFC 3261 14.2, RFC 3311 5.2): an offer of ours, or an INVITE of either side, is unfinished.
        # An UPDATE without an offer (a session refresh) does not collide with anything.
        invite_pending = call.awaiting_ack is not None or (call.refresh is not None and call.refresh.is_invite)
        if (is_invite or offer is not None) and (call.media.offer_pending or (is_invite and invite_pending)):
            raise _Refused(491)
        if call.state is CallState.OFFERED:
            raise _Refused(491)
        timers = self._session_timers(request)
        before = call.audio
        if offer is not None:
            try:
                audio = call.media.negotiate_offer(offer)
            except SdpError:  # NoCommonCodec too: the session goes on unchanged (14.2)
                raise _Refused(488) from None
            sdp = call.media.answer(offer, audio)
        elif is_invite:
            sdp = call.media.offer()  # a re-INVITE without SDP: we offer, the ACK answers
        else:
            sdp = b""  # an UPDATE without SDP only refreshes the session
        if target is not None:
            call.dialog.remote_target = target
        if "Allow" in request.headers:
            call.peer_allows_update = _lists(request.headers, "Allow", "UPDATE")
        headers = [*self._call_headers(call), *(timers.response_headers if timers else ())]
        self._respond(tx, 200, headers, sdp)
        if is_invite:
            call.awaiting_ack = tx
        self._restart_session_timer(call, timers)
        if offer is not None:
            self._media_maybe_changed(call, before)

    def _on_info(self, tx: ServerTransaction, request: SipRequest, call: Call) -> None:
        """INFO carrying a DTMF digit (the de-facto application/dtmf-relay and application/dtmf)."""
        if not request.body:
            self._respond(tx, 200)  # an empty INFO is a keep-alive
            return
        content_type = _content_type(request)
        if content_type not in DTMF_CONTENT_TYPES:
            self._respond(tx, 415, [("Accept", ", ".join(DTMF_CONTENT_TYPES))])
            return
        digit = _dtmf_digit(content_type, request.body)
        if digit is None:
            self._respond(tx, 400)
            return
        self._respond(tx, 200)
        if call.state is CallState.CONFIRMED:
            self.handler.call_dtmf(call, digit)

    def _media_maybe_changed(self, call: Call, before: NegotiatedAudio | None) -> None:
        audio = call.audio
        if audio is None or before is None:
            return
        moved = (audio.remote_host, audio.remote_port) != (before.remote_host, before.remote_port)
        if moved or audio.direction != before.direction:
            log.info("call.media_changed", call=call.id, on_hold=call.on_hold, moved=moved)
            if call.state is CallState.CONFIRMED:
                self.handler.call_media_changed(call)

    def _stop_awaiting_ack(self, call: Call) -> None:
        if call.awaiting_ack is not None:
            self.transactions.acknowledged(call.awaiting_ack, self._loop.time())
            call.awaiting_ack = None

    # -- call timers: session refresh and expiry, maximum duration ------------

    def _restart_session_timer(self, call: Call, agreement: Agreement | None) -> None:
        if agreement is None:
            return
        now = self._loop.time()
        if call.session_timer is None:
            call.session_timer = SessionTimer(agreement.interval, agreement.we_refresh, now)
        else:
            call.session_timer.restart(agreement, now)
        self._arm_call_timer(call)

    def _arm_call_timer(self, call: Call) -> None:
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        deadlines = [call.ends_at] if call.ends_at else []
        if call.session_timer is not None:
            deadlines.append(call.session_timer.next_deadline())
        if deadlines and call.state is not CallState.ENDED:
            call.timer = self._loop.call_at(min(deadlines), self._on_call_timer, call)

    def _on_call_timer(self, call: Call) -> None:
        call.timer = None
        try:
            self._call_timer_fired(call)
        except Exception as exc:  # this call ends; no other call's timers are touched
            log.error("call.timer_failed", call=call.id, error=type(exc).__name__, exc_info=exc)
            self.hangup(call, "internal error")

    def _call_timer_fired(self, call: Call) -> None:
        if call.state is CallState.ENDED:
            return
        now = self._loop.time()
        if call.ends_at and now >= call.ends_at:
            log.info("call.max_duration", call=call.id)
            self.hangup(call, "maximum duration")
            return
        action = call.session_timer.poll(now) if call.session_timer is not None else None
        if action is Action.EXPIRE:
            log.warning("call.session_expired", call=call.id)
            self.hangup(call, "session expired")
            return
        if action is Action.REFRESH:
            self._send_refresh(call)
        self._arm_call_timer(call)

    def _send_refresh(self, call: Call) -> None:
        """Refresh the session as its refresher: UPDATE without SDP, else a re-INVITE with our SDP."""
        timer = call.session_timer
        assert timer is not None
        if call.refresh is not None or call.awaiting_ack is not None or call.media.offer_pending:
            timer.retry(self._loop.time() + GLARE_RETRY_SECONDS)  # an exchange is under way: try again soon
            return
        method = "UPDATE" if call.peer_allows_update else "INVITE"
        request = self._in_dialog_request(call, method)
        for name, value in [*self._call_headers(call), *request_headers(timer.ask, self.settings.session_timers)]:
            request.headers.add(name, value)
        if method == "INVITE":
            request.headers.add("Content-Type", "application/sdp")
            request.body = call.media.offer()
        log.info("call.refresh", call=call.id, method=method)
        call.refresh = self._send_in_dialog(call, request, lambda tx, response: self._refresh_done(call, tx, response))

    def _refresh_done(self, call: Call, tx: ClientTransaction, response: SipResponse | None) -> None:
        call.refresh = None
        is_invite = tx.is_invite
        if call.state is CallState.ENDED:
            return
        timer = call.session_timer
        assert timer is not None
        status = response.status if response is not None else 408
        if is_invite and status >= 300:
            call.media.offer_pending = False  # the offer was refused: the session stays as it was
        if 200 <= status < 300:
            assert response is not None
            self._on_refresh_accepted(call, tx, response, timer)
        elif status in (408, 481):
            self.hangup(call, "refresh failed")  # the peer lost the dialog (RFC 4028 10)
            return
        elif status == 422:
            min_se = (response.headers.get("Min-SE") if response else None) or ""
            timer.retry(self._loop.time(), int(min_se) if min_se.isdigit() else None)
        elif status == 491:
            timer.retry(self._loop.time() + random.uniform(0, GLARE_RETRY_SECONDS))
        elif status in (405, 501) and not is_invite:
            call.peer_allows_update = False
            timer.retry(self._loop.time())
        self._arm_call_timer(call)

    def _on_refresh_accepted(self, call: Call, tx: ClientTransaction, response: SipResponse, timer: SessionTimer) -> None:
        if tx.is_invite:
            # The ACK for a 2xx is ours to send (13.2.2.4); kept on the transaction for repeated 2xx.
            cseq = int((tx.request.headers.get("CSeq") or "0").split()[0])
            tx.ack = serialize(self._in_dialog_request(call, "ACK", cseq))
            self._send(Send(tx.ack, tx.dest, tx.transport))
            before = call.audio
            try:
                call.media.take_answer(response.body)
            except SdpError:
                self.hangup(call, "unusable answer to our re-INVITE")
                return
            self._media_maybe_changed(call, before)
        with contextlib.suppress(SipParseError):  # an unusable Contact in their 2xx: keep the target we have
            call.dialog.refresh_target(response.headers)
        timer.restart(answer_response(response.headers, timer.ask), self._loop.time())

    # -- outbound ------------------------------------------------------------

    def hangup(self, call: Call, reason: str) -> None:
        """End a call from our side: a final error before the answer, BYE after it.

        The call ends even when its answer or BYE cannot be sent (logged): nothing stays behind.
        """
        if call.state is CallState.ENDED:
            return
        try:
            if call.state is CallState.OFFERED:
                self._respond(call.invite, 480, [("Retry-After", "60")])
            else:
                bye = self._in_dialog_request(call, "BYE")
                bye.headers.add("User-Agent", USER_AGENT)
                self._send_in_dialog(call, bye, lambda tx, response: None)
        except Exception as exc:
            log.error("call.hangup_failed", call=call.id, error=type(exc).__name__, exc_info=exc)
        self._end(call, reason)

    def _dialog_destination(self, call: Call) -> tuple[SipTransport, Address]:
        """Where our in-dialog requests go (RFC 3261 18.1.1), never resolving a name the caller chose.

        Over the caller's connection while it is open; else to the next hop (the
        first route, else the remote target) over the transport its URI asks for,
        when that hop is an IP address or a host name of the call's own trunk (at
        its last resolved address); else back to where the INVITE came from.
        """
        invite = call.invite
        arrived_on = self.transports[invite.transport]
        if arrived_on.reliable and arrived_on.has_connection(invite.source):
            return arrived_on, invite.source
        host, port = call.dialog.next_hop()
        if not is_ip_address(host):
            resolved = self.policy.trunk_address(call.trunk, host) if self.policy is not None else None
            if resolved is None:
                return arrived_on, invite.source
            host = resolved
        name = _next_hop_transport(call.dialog.route_set, call.dialog.remote_target)
        return self.transports.get(name, arrived_on), (host, port)

    def _in_dialog_request(self, call: Call, method: str, cseq: int | None = None) -> SipRequest:
        transport, _ = self._dialog_destination(call)
        port = transport.local_address[1]
        return call.dialog.new_request(method, self.settings.advertised_host, port, transport.name, cseq)

    def _send_in_dialog(self, call: Call, request: SipRequest, on_final: FinalHandler) -> ClientTransaction:
        transport, dest = self._dialog_destination(call)
        return self._start_client(request, dest, transport, on_final)

    async def request(self, request: SipRequest, dest: Address) -> SipResponse | None:
        """Send a non-INVITE request (REGISTER, OPTIONS ...) in a client transaction.

        Returns its final response, or None when none came in time (Timer F).
        The caller builds the request, with a Via carrying a fresh branch and
        the transport it goes on (one we listen on).
        """
        waiter: asyncio.Future[SipResponse | None] = self._loop.create_future()

        def finished(tx: ClientTransaction, response: SipResponse | None) -> None:
            if not waiter.done():  # the caller may have stopped waiting
                waiter.set_result(response)

        transport = self.transports[parse_via(request.headers.get("Via") or "").transport.upper()]
        self._start_client(request, dest, transport, finished)
        return await waiter

    def _start_client(
        self, request: SipRequest, dest: Address, transport: SipTransport, on_final: FinalHandler
    ) -> ClientTransaction:
        tx, sends = self.transactions.send_request(request, dest, self._loop.time(), transport.name)
        self._pending[tx] = on_final
        self._send_all(sends)
        self._reschedule()
        return tx

    def _on_response(self, response: SipResponse) -> None:
        tx = self.transactions.on_response(response, self._loop.time())
        self._send_all(self.transactions.take_sends())
        if tx is None:
            return
        on_final = self._pending.pop(tx, None)
        if on_final is not None:
            on_final(tx, response)
        elif tx.ack is not None and response.status < 300:
            self._send(Send(tx.ack, tx.dest, tx.transport))  # a repeated 2xx to our re-INVITE: our ACK was lost

    # -- helpers ---------------------------------------------------------------

    def _end(self, call: Call, reason: str) -> None:
        if call.state is CallState.ENDED:
            return
        call.state = CallState.ENDED
        self._stop_awaiting_ack(call)  # a BYE before the ACK ends the 2xx retransmissions too
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        self._calls.pop((call.dialog.call_id, call.dialog.local_tag), None)
        self._calls_by_invite.pop(call.invite, None)
        log.info("call.ended", call=call.id, reason=reason)
        if call.media_ready:
            try:
                self.handler.call_ended(call)
            except Exception as exc:  # the call is gone from the table either way; the next one is not affected
                log.error("call.end_failed", call=call.id, error=type(exc).__name__, exc_info=exc)

    def _final_without_dialog(self, call: Call, status: int, extra: list[tuple[str, str]]) -> None:
        if call.state is CallState.OFFERED:
            self._respond(call.invite, status, extra)
        self._end(call, f"refused {status}")

    def _capabilities(self) -> list[tuple[str, str]]:
        return [("Allow", ALLOWED_METHODS), ("Supported", ", ".join(SUPPORTED_EXTENSIONS))]

    def _call_headers(self, call: Call) -> list[tuple[str, str]]:
        return [("Contact", self.contact_for(call.invite)), *self._capabilities()]

    def _respond(
        self,
        tx: ServerTransaction,
        status: int,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        response = self._response(tx, status, headers, body)
        self._send_all(self.transactions.respond(tx, response, self._loop.time()))
        self._reschedule()  # a final response arms retransmission and cleanup timers

    def _respond_and_forget(self, tx: ServerTransaction, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        """A final answer that keeps no state for its sender (a retransmission gets the same answer again)."""
        self._send(tx.send(serialize(self._response(tx, status, headers))))
        self.transactions.discard(tx)

    def _response(
        self, tx: ServerTransaction, status: int, headers: Iterable[tuple[str, str]], body: bytes = b""
    ) -> SipResponse:
        extra = list(headers)
        if body:
            extra.append(("Content-Type", "application/sdp"))
        to_tag = None
        if status > 100 and not parse_name_addr(tx.request.headers.get("To") or "").tag:
            # Responses beyond 100 need a To tag (8.2.6.2); a call's INVITE uses its dialog's.
            call = self._calls_by_invite.get(tx)
            to_tag = call.dialog.local_tag if call is not None else new_tag()
        return _with_server(response_to(tx.request, status, to_tag=to_tag, headers=extra, body=body))

    def _send_all(self, sends: Iterable[Send]) -> None:
        for send in sends:
            self._send(send)

    def _send(self, send: Send) -> None:
        transport = self.transports.get(send.transport)
        if transport is not None:
            transport.send(send.data, send.dest)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("sip.task_failed", error=type(exc).__name__, exc_info=exc)

    def _reschedule(self) -> None:
        deadline = self.transactions.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = None if deadline is None else self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        try:
            self._poll_transactions()
        except Exception as exc:  # logged; the timers stay armed for every other transaction
            log.error("sip.internal_error", error=type(exc).__name__, exc_info=exc)
        self._reschedule()

    def _poll_transactions(self) -> None:
        result = self.transactions.poll(self._loop.time())
        self._send_all(result.sends)
        for tx in result.unacknowledged:
            # Our 2xx to an INVITE or re-INVITE was never ACKed: end the session (13.3.1.4).
            call = next((c for c in self._calls.values() if c.awaiting_ack is tx), None)
            if call is not None:
                log.warning("call.ack_timeout", call=call.id)
                self.hangup(call, "no ACK")
        for client_tx in result.timed_out:
            on_final = self._pending.pop(client_tx, None)
            if on_final is not None:
                on_final(client_tx, None)


def _check_required(request: SipRequest) -> None:
    """420 for a Require we do not support (8.2.2.3)."""
    unsupported = [
        option.strip()
        for value in request.headers.get_all("Require")
        for option in value.split(",")
        if option.strip() and option.strip().lower() not in SUPPORTED_EXTENSIONS
    ]
    if unsupported:
        raise _Refused(420, [("Unsupported", ", ".join(unsupported))])


def _read_offer(request: SipRequest) -> SessionDescription | None:
    """The request's SDP offer; None without a body."""
    if not request.body:
        return None
    if _content_type(request) != "application/sdp":
        raise _Refused(415, [("Accept", "application/sdp")])
    try:
        return parse_sdp(request.body)
    except SdpError:
        raise _Refused(400) from None


def _content_type(request: SipRequest) -> str:
    return (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()


def _lists(headers: Headers, name: str, option: str) -> bool:
    """Whether a comma-separated header (Allow, Supported) names `option`."""
    return any(item.strip().upper() == option for value in headers.get_all(name) for item in value.split(","))


def _dtmf_digit(content_type: str, body: bytes) -> str | None:
    """The digit of an application/dtmf-relay (`Signal=5`) or application/dtmf (`5`) body."""
    text = body.decode("ascii", "replace")
    value = text
    if content_type == "application/dtmf-relay":
        fields = (line.partition("=") for line in text.splitlines())
        value = next((v for k, _, v in fields if k.strip().lower() == "signal"), "")
    value = value.strip().upper()
    return value if len(value) == 1 and value in DTMF_DIGITS else None


def _stamp_via(request: SipRequest, source: Address, transport: SipTransport) -> Address:
    """Add received/rport to the top Via (RFC 3261 18.2.1, RFC 3581); return where responses go (18.2.2).

    Over TCP and TLS that is the connection the request came on (once it has
    closed, a new connection to the source host and the sent-by port). Over UDP it is
    the source address when the client asked for rport, else the source host
    and the sent-by port.
    """
    vias = request.headers.get_all("Via")
    if not vias:
        raise SipParseError("missing Via header")
    top = parse_via(vias[0])
    if top.host != source[0]:
        top.params["received"] = source[0]
    if "rport" in top.params:
        top.params["rport"] = str(source[1])
    request.headers.set("Via", ", ".join([str(top), *vias[1:]]))
    sent_by = source[0], top.port or (5061 if top.transport == "TLS" else DEFAULT_SIP_PORT)
    if transport.reliable:
        transport.set_reply_address(source, sent_by)  # should the connection close before we answer
        return source
    return source if "rport" in top.params else sent_by


def _next_hop_transport(route_set: list[str], remote_target: str) -> str:
    """The transport a URI asks for (sips: means TLS; else its transport parameter, UDP by default)."""
    uri = parse_uri(parse_name_addr(route_set[0]).uri if route_set else remote_target)
    if uri.scheme == "sips":
        return "TLS"
    return (uri.params.get("transport") or "udp").upper()


def _with_server(response: SipResponse) -> SipResponse:
    response.headers.add("Server", USER_AGENT)
    return response


def _serialize_response(response: SipResponse) -> bytes:
    return serialize(_with_server(response))
