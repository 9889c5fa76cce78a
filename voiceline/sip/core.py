"""The sans-I/O call core: SIP calls in both directions, fed bytes and the time, returning what to send.

`CallCore` is fed each message with its source and transport (`receive`), the
current time (`poll` when `next_deadline()` is due) and the app's decisions
(`accept`, `reject`, `hangup`, `invite`); it never touches a socket, a clock, a
resolver or the random module. What it decides comes out of `take_sends()` and
`take_events()`: frozen events carrying a `CallInfo`, an id and media facts,
never the dialog, so the caller's URI cannot leave `sip` by way of an event.
One `TimerHeap` holds every deadline: transaction retransmissions and timeouts,
the answer delay, session refreshes and expiry, the maximum duration and how
long an outbound call may ring. What a call does with each event in each state
is the table in `call_state`; the asyncio edge is `useragent.UserAgent`.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from voiceline import __version__
from voiceline.codec_table import PCMA, PCMU, Codec
from voiceline.privacy import new_call_id
from voiceline.sip.auth import DigestClient, pick_challenge
from voiceline.sip.call_state import (
    CallEvent,
    CallState,
    Exchange,
    ExchangeEvent,
    Refusal,
    next_exchange,
    next_phase,
)
from voiceline.sip.identity import Pseudonym, Pseudonyms, asserted_identity
from voiceline.sip.dialog import DEFAULT_SIP_PORT, Dialog, contact_target, is_ip_address, new_tag
from voiceline.sip.events import (
    Answered,
    CallConfirmed,
    CallEnded,
    CallInfo,
    CallMedia,
    CallOffered,
    Cancelled,
    Dtmf,
    Event,
    MediaChanged,
    Refused,
    RequestDone,
    Ringing,
    SdesKeys,
    TimedOut,
    TransferFailed,
    TransferProgress,
    Transferred,
)
from voiceline.sip.message import (
    Headers,
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
from voiceline.sip.timer_heap import TimerHeap
from voiceline.sip.transaction import (
    ClientTransaction,
    Incoming,
    PollResult,
    Send,
    ServerTransaction,
    Timers,
    TransactionLayer,
    new_branch,
)
from voiceline.sip.transport import Address, SipTransport
from voiceline.sip.admission import Admission, Admit, Drop, Refuse, RequestPolicy

log = structlog.get_logger("voiceline.sip")

ALLOWED_METHODS = "INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE, INFO, NOTIFY"
SUPPORTED_EXTENSIONS = ("timer",)
USER_AGENT = f"voiceline/{__version__}"
DTMF_CONTENT_TYPES = ("application/dtmf-relay", "application/dtmf")
DTMF_DIGITS = frozenset("0123456789*#ABCD")
GLARE_RETRY_SECONDS = 2.0  # our refused refresh goes again after a random 0-2 s (RFC 3261 14.1)
RING_TIMEOUT_SECONDS = 60.0  # how long an outbound call may ring before we cancel it
ANONYMOUS_FROM = '"Anonymous" <sip:anonymous@anonymous.invalid>'  # RFC 3323 4.1.1.3


# -- what comes in from outside ------------------------------------------------------


@dataclass(frozen=True)
class Entropy:
    """The signalling's random values; tests pass fixed ones. (SRTP keys and SDP session ids stay `secrets`'.)"""

    tag: Callable[[], str] = new_tag
    branch: Callable[[], str] = new_branch
    call_id: Callable[[], str] = new_call_id  # the opaque id logs and the app use
    sip_call_id: Callable[[], str] = lambda: secrets.token_hex(16)  # the Call-ID header of our INVITEs
    first_cseq: Callable[[], int] = lambda: secrets.randbelow(1 << 16) + 1  # our INVITE's CSeq
    uniform: Callable[[float, float], float] = random.uniform  # glare backoff


@dataclass
class CoreSettings:
    advertised_host: str
    answer_delay: float = 0.5
    timers: Timers = Timers()
    max_message_size: int = 65535
    codecs: tuple[Codec, ...] = (PCMU, PCMA)
    session_timers: SessionTimerPolicy = SessionTimerPolicy()
    max_call_duration: float = 0.0  # seconds from the answer; 0: unlimited
    overload: OverloadLimits = field(default_factory=OverloadLimits)
    key_rotation: float = 86400.0  # seconds a pseudonym key makes new pseudonyms (sip.identity)


# -- inside sip ----------------------------------------------------------------------


class _Refused(Exception):
    """Raised while handling a request: answer it with this status, nothing else changes."""

    def __init__(self, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(status)
        self.status = status
        self.headers = list(headers)


@dataclass(eq=False)
class Call:
    """One call, inbound or outbound; private to sip. `id` is random and is what logs and records use."""

    id: str
    dialog: Dialog
    media: OfferAnswer  # SDP state: the negotiated audio, our last SDP, a pending offer
    peer: Address  # the source of its INVITE, or where ours went
    transport: str  # the transport its INVITE came or went on
    invite: ServerTransaction | None = None  # inbound: the INVITE we answer
    outgoing: ClientTransaction | None = None  # outbound: our INVITE (the last one, after a challenge)
    offer: SessionDescription | None = None  # an inbound INVITE's offer; None when it came without one
    state: CallState = CallState.OFFERED
    exchange: Exchange = Exchange.IDLE
    media_ready: bool = False  # the app accepted the call (or it was answered) and owns media for it
    awaiting_ack: ServerTransaction | None = None  # an INVITE whose 2xx is retransmitted until ACKed
    peer_allows_update: bool = False
    session_agreement: Agreement | None = None  # what the INVITE's 200 says about session timers
    session_timer: SessionTimer | None = None
    refresh: ClientTransaction | None = None  # our session refresh in progress
    trunk: str = ""  # the trunk it came in on (admission policy), "" without a policy
    line: str = ""  # the line its dialled number reaches
    deadlines: dict[str, float] = field(default_factory=dict)  # its timers in the core's heap
    credentials: DigestClient | None = None  # outbound: for a challenged INVITE
    challenged: bool = False  # outbound: our INVITE was answered with credentials once already
    provisional_seen: bool = False  # outbound: a CANCEL may be sent (RFC 3261 9.1)
    cancel_sent: bool = False
    end_reason: str = ""  # outbound: why we cancel
    identity: str | None = field(default=None, repr=False)  # inbound: the normalised asserted identity, memory only
    pseudonym: Pseudonym | None = None  # inbound
    transferring: bool = False  # our REFER is out or its NOTIFYs are awaited
    identity_held: bool = False  # inbound: its identity and its pseudonym's key are held until it ends

    @property
    def audio(self) -> NegotiatedAudio | None:
        return self.media.audio

    @property
    def on_hold(self) -> bool:
        return self.media.on_hold

    @property
    def local_rtp_port(self) -> int:
        return self.media.local_port


@dataclass
class SipCounters:
    received: int = 0
    malformed: int = 0
    oversized: int = 0
    calls: int = 0
    # In-dialog requests (a To tag) for a dialog this process does not hold, e.g. the BYEs of calls
    # a killed predecessor answered; each got 481. A late request for a call just ended counts too.
    orphans: int = 0


# What to do with the final response to one of our requests (None: Timer F or B fired).
FinalHandler = Callable[[ClientTransaction, SipResponse | None], None]


class CallCore:
    def __init__(
        self,
        settings: CoreSettings,
        policy: RequestPolicy | None = None,
        entropy: Entropy = Entropy(),
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.entropy = entropy
        self.heap = TimerHeap()
        self.transactions = TransactionLayer(settings.timers, self.heap)
        self.counters = SipCounters()
        self.overload = OverloadGuard(settings.overload)
        self.pseudonyms = Pseudonyms(settings.key_rotation)
        # By name ("UDP", "TCP", "TLS"): what the core asks of them is their port, whether they are
        # reliable and hold a connection, and where a closed connection's responses go; never to send.
        self.transports: dict[str, SipTransport] = {}
        self.draining = False
        self._calls: dict[tuple[str, str], Call] = {}  # (Call-ID, our tag) -> call
        self._by_id: dict[str, Call] = {}  # every call not yet ended, and ended ones the app still decides on
        self._calls_by_invite: dict[ServerTransaction, Call] = {}
        self._outgoing: dict[ClientTransaction, Call] = {}  # our INVITEs, for their provisional responses
        self._pending: dict[ClientTransaction, FinalHandler] = {}
        self._sends: list[Send] = []
        self._events: list[Event] = []
        self._now = 0.0

    # -- outputs ------------------------------------------------------------------

    def take_sends(self) -> list[Send]:
        sends, self._sends = self._sends, []
        return sends

    def take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def next_deadline(self) -> float | None:
        """The earliest timer, or the pseudonym key's end (it is dropped on time, not at the next call)."""
        times = [t for t in (self.heap.next_deadline(), self.pseudonyms.expires_at) if t is not None]
        return min(times, default=None)

    @property
    def calls(self) -> list[Call]:
        return list(self._calls.values())

    @property
    def pending_requests(self) -> int:
        """Our requests still waiting for a final response."""
        return len(self._pending)

    def contact_for(self, transport: str, secure: bool = False) -> str:
        """Our Contact for a dialog over `transport`; `secure`: a sips Request-URI needs a sips Contact (8.1.1.8)."""
        port = self.transports[transport].local_address[1]
        host = self.settings.advertised_host
        if transport == "UDP":
            return f"<sip:voiceline@{host}:{port}>"
        if transport == "TLS" and secure:
            return f"<sips:voiceline@{host}:{port}>"
        return f"<sip:voiceline@{host}:{port};transport={transport.lower()}>"

    # -- time ---------------------------------------------------------------------

    def poll(self, now: float) -> None:
        """Fire every timer due at `now`."""
        self._now = now
        self.pseudonyms.expire(now)
        while (due := self.heap.pop_due(now)) is not None:
            owner, name = due
            if isinstance(owner, Call):
                self._contained(owner, self._call_timer, owner, name)
            else:
                assert isinstance(owner, (ServerTransaction, ClientTransaction))
                result = PollResult()
                self.transactions.fire(owner, name, now, result)
                self._transaction_timers(result)

    def _transaction_timers(self, result: PollResult) -> None:
        self._sends.extend(result.sends)
        for tx in result.unacknowledged:
            # Our 2xx to an INVITE or re-INVITE was never ACKed: end the session (13.3.1.4).
            call = next((c for c in self._calls.values() if c.awaiting_ack is tx), None)
            if call is not None:
                log.warning("call.ack_timeout", call=call.id)
                self._hangup(call, "no ACK")
        for client_tx in result.timed_out:
            on_final = self._pending.pop(client_tx, None)
            if on_final is not None:
                on_final(client_tx, None)

    def _contained(self, call: Call, step: Callable[..., None], *args: object) -> None:
        """One call's step: an error ends that call (its redacted trace logged), no other call is touched."""
        try:
            step(*args)
        except Exception as exc:
            log.error("call.internal_error", call=call.id, error=type(exc).__name__, exc_info=exc)
            self._hangup(call, "internal error")

    # -- inbound messages -----------------------------------------------------------

    def receive(self, data: bytes, source: Address, transport: str, now: float) -> None:
        """One datagram, or one framed stream message; `source` names the sender or the connection."""
        self._now = now
        try:
            self._on_message(data, source, self.transports[transport])
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
                if not isinstance(admission, Admit):
                    admission = self._call_peer_admission(message, source, transport) or admission
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
                self._sends.append(Send(_serialize_response(response_to(message, 400)), reply_to, transport.name))

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

    def _call_peer_admission(self, request: SipRequest, source: Address, transport: SipTransport) -> Admit | None:
        """A live call's own signalling peer keeps its dialog when its trunk is disabled or removed mid-call:
        a request matching the dialog (12.2.2) from the very host and transport its INVITE came from or went to."""
        to_tag = parse_name_addr(request.headers.get("To") or "").tag
        call = self._calls.get((request.headers.get("Call-ID") or "", to_tag or ""))
        if (
            call is None
            or call.peer[0] != source[0]
            or call.transport != transport.name
            or not call.dialog.matches(request)
        ):
            return None
        return Admit(call.trunk)

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
        response = response_to(request, refusal.status, to_tag=self.entropy.tag(), headers=refusal.headers)
        self._sends.append(Send(_serialize_response(response), reply_to, transport.name))

    def _admitted(self, request: SipRequest, source: Address, transport: SipTransport) -> bool:
        """The overload guard at the entry: scanners and over-limit sources never reach a transaction."""
        verdict = self.overload.check(request.method, request.headers.get("User-Agent"), source[0], self._now)
        if verdict is Verdict.ACCEPT:
            return True
        if verdict is Verdict.REJECT:
            retry = (("Retry-After", str(self.settings.overload.retry_after)),)
            self._refuse_stateless(request, source, transport, Refuse(503, retry))
        report = self.overload.report(self._now)
        if report is not None:
            log.warning("sip.overload", **report)  # aggregate counts only, never a source
        return False

    def _on_request(self, request: SipRequest, source: Address, transport: str, trunk: str) -> None:
        """A request from an admitted source; `trunk` is the one its source belongs to ("" without a policy)."""
        log.debug("sip.request", method=request.method)
        kind, tx, sends = self.transactions.on_request(request, source, self._now, transport)
        self._sends.extend(sends)
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
        elif request.method == "OPTIONS" and self.draining:
            self._respond(tx, 503, [("Retry-After", "60")])  # a dispatcher's probe takes us out of rotation
        elif request.method == "OPTIONS":
            self._respond(tx, 200, [*self._capabilities(), ("Accept", "application/sdp")])
        elif request.method in ("BYE", "INVITE", "UPDATE", "INFO", "NOTIFY"):
            self._on_in_dialog(tx, request, trunk)
        else:
            self._respond_and_forget(tx, 405, [("Allow", ALLOWED_METHODS)])

    # -- an inbound call ---------------------------------------------------------------

    def _on_invite(self, tx: ServerTransaction, request: SipRequest, admission: Admit) -> None:
        if self.draining:
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
        codecs = tuple(c for c in self.settings.codecs if c.name in admission.codecs or not admission.codecs)
        media = OfferAnswer(self.settings.advertised_host, codecs, srtp=admission.srtp)
        audio = None
        if offer is not None:
            try:
                audio = media.negotiate_offer(offer)
            except NoCommonCodec:
                raise _Refused(488) from None
            except SdpError:
                raise _Refused(400) from None
        dialog = Dialog.from_invite(request, self.entropy.tag())
        identity = asserted_identity(request.headers, admission.country_code)
        call = Call(
            self.entropy.call_id(), dialog, media, tx.source, tx.transport, invite=tx, offer=offer,
            session_agreement=timers, trunk=admission.trunk, line=admission.line,
            identity=identity, pseudonym=self.pseudonyms.for_call(identity, self._now), identity_held=True,
        )  # fmt: skip
        call.peer_allows_update = _lists(request.headers, "Allow", "UPDATE")
        if audio is not None:
            media.audio = audio  # answered in the 200 once the local port is known
        self._add(call)
        self._calls_by_invite[tx] = call
        self.counters.calls += 1
        self._respond(tx, 100)
        log.info("call.offered", call=call.id, codec=audio.codec.name if audio else None, trunk=call.trunk, line=call.line)
        self._events.append(CallOffered(self.info(call)))

    def _session_timers(self, request: SipRequest) -> Agreement | None:
        timers = answer_request(request.headers, self.settings.session_timers)
        if isinstance(timers, TooSmall):
            raise _Refused(422, [("Min-SE", str(timers.min_se))])
        return timers

    def accept(self, call_id: str, local_rtp_port: int, now: float) -> None:
        """The app took the offered call and listens on `local_rtp_port`: ring, then answer after the delay."""
        self._now = now
        call = self._by_id.get(call_id)
        if call is None or call.media_ready:
            return
        call.media_ready = True
        call.media.local_port = local_rtp_port
        if call.state is CallState.ENDED:  # cancelled while the app prepared media: it owns that media now
            self._by_id.pop(call.id, None)
            self._events.append(CallEnded(self.info(call), "cancelled"))
            return
        if self._move(call, CallEvent.ACCEPT) is not CallState.RINGING:
            return
        assert call.invite is not None
        self._respond(call.invite, 180, [*self._record_routes(call), *self._call_headers(call)])
        self.heap.arm(call, "answer", now + self.settings.answer_delay)

    def reject(self, call_id: str, status: int, retry_after: int | None, now: float) -> None:
        """The app refused the offered call with a final status."""
        self._now = now
        call = self._by_id.get(call_id)
        if call is None:
            return
        if call.state is CallState.ENDED:
            self._by_id.pop(call.id, None)
            return
        if self._move(call, CallEvent.REJECT) is CallState.ENDED:
            assert call.invite is not None
            self._respond(call.invite, status, [("Retry-After", str(retry_after))] if retry_after else [])
            self._end(call, f"refused {status}")

    def _answer(self, call: Call) -> None:
        """The answer delay is over: 200 with our SDP (an answer, or an offer when the INVITE had none)."""
        if self._move(call, CallEvent.ANSWER_DUE) is not CallState.ANSWERED:
            return
        assert call.invite is not None
        if call.offer is not None and call.audio is not None:
            sdp = call.media.answer(call.offer, call.audio)
            self._exchange(call, ExchangeEvent.INVITE_OFFER)
        else:
            sdp = call.media.offer()  # the answer comes in the ACK
            self._exchange(call, ExchangeEvent.INVITE)
        call.awaiting_ack = call.invite
        agreement = call.session_agreement
        timer_headers = list(agreement.response_headers) if agreement else []
        headers = [*self._record_routes(call), *self._call_headers(call), *timer_headers]
        self._respond(call.invite, 200, headers, sdp)
        if agreement is not None:
            call.session_timer = SessionTimer(agreement.interval, agreement.we_refresh, self._now)
        self._start_call_timers(call)
        log.info("call.answered", call=call.id, offered=call.offer is not None)

    def _start_call_timers(self, call: Call) -> None:
        if self.settings.max_call_duration:
            self.heap.arm(call, "max_duration", self._now + self.settings.max_call_duration)
        self._arm_session_timer(call)

    def _record_routes(self, call: Call) -> list[tuple[str, str]]:
        return [("Record-Route", route) for route in call.dialog.route_set]  # 12.1.1

    def _on_ack(self, request: SipRequest, trunk: str) -> None:
        call = self._dialog_of(request, trunk)
        if call is None or call.awaiting_ack is None:
            return  # a stray, repeated or forged ACK
        self._stop_awaiting_ack(call)
        exchange = call.exchange
        self._exchange(call, ExchangeEvent.ACK)
        if exchange is Exchange.AWAITING_ANSWER:  # we offered in the 200: the ACK carries the answer (13.2.1)
            before = call.audio
            try:
                call.media.take_answer(request.body)
            except SdpError:
                log.warning("call.no_answer_in_ack", call=call.id)
                self._hangup(call, "no usable answer in the ACK")
                return
            if call.state is CallState.CONFIRMED:
                self._media_maybe_changed(call, before)
        if call.state is CallState.ANSWERED and self._move(call, CallEvent.ACK) is CallState.CONFIRMED:
            log.info("call.confirmed", call=call.id, on_hold=call.on_hold)
            self._events.append(CallConfirmed(self.info(call)))

    def _on_cancel(self, tx: ServerTransaction, request: SipRequest) -> None:
        invite = self.transactions.find_invite(request)
        # Only the INVITE's own sender may cancel it (same host and transport): a copied branch is not enough.
        if invite is None or (invite.source[0], invite.transport) != (tx.source[0], tx.transport):
            self._respond_and_forget(tx, 481)  # keeps no transaction under the INVITE's branch for the real CANCEL
            return
        call = self._calls_by_invite.get(invite)
        self._respond(tx, 200)
        if call is not None and self._move(call, CallEvent.CANCEL) is CallState.ENDED:
            self._respond(invite, 487)
            self._end(call, "cancelled")

    # -- requests inside a dialog ----------------------------------------------------

    def _dialog_of(self, request: SipRequest, trunk: str) -> Call | None:
        """The live call whose dialog the request belongs to: Call-ID and both tags (12.2.2), from the call's trunk.

        Anything else is answered as an unknown dialog, so a stranger learns nothing and changes nothing.
        """
        to_tag = parse_name_addr(request.headers.get("To") or "").tag
        call = self._calls.get((request.headers.get("Call-ID") or "", to_tag or ""))
        if call is None or call.state is CallState.ENDED or call.trunk != trunk or not call.dialog.matches(request):
            return None
        return call

    def _orphaned(self, request: SipRequest) -> bool:
        """An in-dialog request (it has a To tag) whose Call-ID and To tag match no dialog we hold."""
        to_tag = parse_name_addr(request.headers.get("To") or "").tag
        return to_tag is not None and (request.headers.get("Call-ID") or "", to_tag) not in self._calls

    def _on_in_dialog(self, tx: ServerTransaction, request: SipRequest, trunk: str) -> None:
        call = self._dialog_of(request, trunk)
        event = {
            "BYE": CallEvent.BYE, "INFO": CallEvent.INFO, "INVITE": CallEvent.REINVITE, "NOTIFY": CallEvent.NOTIFY,
        }.get(request.method, CallEvent.UPDATE)  # fmt: skip
        if call is None or next_phase(call.state, event) == Refusal(481):
            if call is None and self._orphaned(request):
                self.counters.orphans += 1
                log.debug("sip.orphan", method=request.method)
            self._respond_and_forget(tx, 481)
            return
        if not call.dialog.accepts_remote_seq(request):
            self._respond(tx, 500)
            return
        if event is CallEvent.BYE:
            self._respond(tx, 200)
            self._move(call, event)
            self._end(call, "peer hung up" if call.outgoing is not None else "caller hung up")
        elif event is CallEvent.INFO:
            self._on_info(tx, request, call)
        elif event is CallEvent.NOTIFY:
            self._on_notify(tx, request, call)
        else:
            self._on_session_change(tx, request, call, event)

    def _on_session_change(self, tx: ServerTransaction, request: SipRequest, call: Call, event: CallEvent) -> None:
        """A re-INVITE or an UPDATE: maybe an offer (hold, resume, new address), maybe a session refresh."""
        is_invite = event is CallEvent.REINVITE
        _check_required(request)
        offer = _read_offer(request)
        target = contact_target(request.headers)  # checked before anything changes: 400 when unusable
        phase = next_phase(call.state, event)
        if isinstance(phase, Refusal):
            raise _Refused(phase.status)
        if is_invite:
            exchange_event = ExchangeEvent.INVITE_OFFER if offer is not None else ExchangeEvent.INVITE
        else:
            exchange_event = ExchangeEvent.UPDATE_OFFER if offer is not None else ExchangeEvent.UPDATE
        exchange = next_exchange(call.exchange, exchange_event)  # glare: RFC 3261 14.2, RFC 3311 5.2
        if isinstance(exchange, Refusal):
            raise _Refused(exchange.status)
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
        call.exchange = exchange
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
            self._events.append(Dtmf(self.info(call), digit))

    # -- transfer: our REFER (RFC 3515) ---------------------------------------------------

    def refer(self, call_id: str, target_uri: str, now: float, timeout: float = RING_TIMEOUT_SECONDS) -> bool:
        """Ask a confirmed call's peer to call `target_uri` in our place (RFC 3515); False when it cannot be asked.

        The REFER carries only `Refer-To` (no Referred-By: nothing of the caller). Its outcome
        comes as events: TransferProgress (202, then each provisional the peer reports), then
        Transferred (a 2xx reported) or TransferFailed (the REFER refused, a final error reported,
        the subscription ended without one, or nothing final within `timeout`). The call itself
        goes on: the app hangs it up once transferred.
        """
        self._now = now
        call = self._by_id.get(call_id)
        if call is None or call.state is not CallState.CONFIRMED or call.transferring:
            return False
        parse_uri(target_uri)  # SipParseError before anything is sent
        request = self._in_dialog_request(call, "REFER")
        for name, value in [("Refer-To", f"<{target_uri}>"), *self._call_headers(call), ("User-Agent", USER_AGENT)]:
            request.headers.add(name, value)
        call.transferring = True
        self._send_in_dialog(call, request, lambda tx, response: self._contained(call, self._refer_done, call, response))
        self.heap.arm(call, "transfer", now + timeout)
        log.info("call.refer", call=call.id)
        return True

    def _refer_done(self, call: Call, response: SipResponse | None) -> None:
        if not call.transferring or call.state is CallState.ENDED:
            return
        status = response.status if response is not None else 408
        if 200 <= status < 300:
            self._events.append(TransferProgress(call.id, status))
        else:
            self._transfer_over(call, TransferFailed(call.id, status))

    def _transfer_over(self, call: Call, outcome: Transferred | TransferFailed) -> None:
        call.transferring = False
        self.heap.cancel(call, "transfer")
        log.info("call.transfer", call=call.id, status=outcome.status if isinstance(outcome, TransferFailed) else 200)
        self._events.append(outcome)

    def _on_notify(self, tx: ServerTransaction, request: SipRequest, call: Call) -> None:
        """A NOTIFY of our REFER's progress: its message/sipfrag status line says how the peer's call goes."""
        event = (request.headers.get("Event") or "").split(";")[0].strip().lower()
        if event != "refer" or not call.transferring:
            self._respond(tx, 481)  # no such subscription (RFC 6665 4.1.3)
            return
        status = _sipfrag_status(request.body) if _content_type(request) == "message/sipfrag" else None
        if status is None:
            self._respond(tx, 400)
            return
        self._respond(tx, 200)
        terminated = (request.headers.get("Subscription-State") or "").strip().lower().startswith("terminated")
        if 200 <= status < 300:
            self._transfer_over(call, Transferred(call.id))
        elif status >= 300:
            self._transfer_over(call, TransferFailed(call.id, status))
        elif terminated:
            self._transfer_over(call, TransferFailed(call.id, 487))  # ended before any final word
        else:
            self._events.append(TransferProgress(call.id, status))

    def _media_maybe_changed(self, call: Call, before: NegotiatedAudio | None) -> None:
        audio = call.audio
        if audio is None or before is None:
            return
        moved = (audio.remote_host, audio.remote_port) != (before.remote_host, before.remote_port)
        if moved or audio.direction != before.direction or audio.crypto != before.crypto:
            log.info("call.media_changed", call=call.id, on_hold=call.on_hold, moved=moved)
            if call.state is CallState.CONFIRMED:
                self._events.append(MediaChanged(self.info(call)))

    def _stop_awaiting_ack(self, call: Call) -> None:
        if call.awaiting_ack is not None:
            self.transactions.acknowledged(call.awaiting_ack, self._now)
            call.awaiting_ack = None

    # -- call timers: answer delay, session refresh and expiry, maximum duration, ringing --

    def _call_timer(self, call: Call, name: str) -> None:
        if call.state is CallState.ENDED:
            return
        if name == "answer":
            self._answer(call)
        elif name == "max_duration":
            log.info("call.max_duration", call=call.id)
            self._hangup(call, "maximum duration")
        elif name == "ring":
            self._hangup(call, "no answer")
        elif name == "transfer" and call.transferring:
            self._transfer_over(call, TransferFailed(call.id, 408))
        elif name == "session":
            self._session_timer_due(call)

    def _session_timer_due(self, call: Call) -> None:
        timer = call.session_timer
        assert timer is not None
        action = timer.poll(self._now)
        if action is Action.EXPIRE:
            log.warning("call.session_expired", call=call.id)
            self._hangup(call, "session expired")
            return
        if action is Action.REFRESH:
            self._send_refresh(call)
        self._arm_session_timer(call)

    def _restart_session_timer(self, call: Call, agreement: Agreement | None) -> None:
        if agreement is None:
            return
        if call.session_timer is None:
            call.session_timer = SessionTimer(agreement.interval, agreement.we_refresh, self._now)
        else:
            call.session_timer.restart(agreement, self._now)
        self._arm_session_timer(call)

    def _arm_session_timer(self, call: Call) -> None:
        if call.session_timer is not None and call.state is not CallState.ENDED:
            self.heap.arm(call, "session", call.session_timer.next_deadline())

    def _send_refresh(self, call: Call) -> None:
        """Refresh the session as its refresher: UPDATE without SDP, else a re-INVITE with our SDP."""
        timer = call.session_timer
        assert timer is not None
        method = "UPDATE" if call.peer_allows_update else "INVITE"
        wanted = ExchangeEvent.SEND_INVITE if method == "INVITE" else ExchangeEvent.SEND_UPDATE
        exchange = next_exchange(call.exchange, wanted)
        if call.refresh is not None or isinstance(exchange, Refusal):
            timer.retry(self._now + GLARE_RETRY_SECONDS)  # an exchange is under way: try again soon
            return
        request = self._in_dialog_request(call, method)
        for name, value in [*self._call_headers(call), *request_headers(timer.ask, self.settings.session_timers)]:
            request.headers.add(name, value)
        if method == "INVITE":
            request.headers.add("Content-Type", "application/sdp")
            request.body = call.media.offer()
        call.exchange = exchange
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
        if is_invite:
            self._exchange(call, ExchangeEvent.INVITE_DONE)
            if status >= 300:
                call.media.offer_pending = False  # the offer was refused: the session stays as it was
        if 200 <= status < 300:
            assert response is not None
            self._on_refresh_accepted(call, tx, response, timer)
        elif status in (408, 481):
            self._hangup(call, "refresh failed")  # the peer lost the dialog (RFC 4028 10)
            return
        elif status == 422:
            min_se = (response.headers.get("Min-SE") if response else None) or ""
            timer.retry(self._now, int(min_se) if min_se.isdigit() else None)
        elif status == 491:
            timer.retry(self._now + self.entropy.uniform(0, GLARE_RETRY_SECONDS))
        elif status in (405, 501) and not is_invite:
            call.peer_allows_update = False
            timer.retry(self._now)
        self._arm_session_timer(call)

    def _on_refresh_accepted(self, call: Call, tx: ClientTransaction, response: SipResponse, timer: SessionTimer) -> None:
        if tx.is_invite:
            self._ack_2xx(call, tx)
            before = call.audio
            try:
                call.media.take_answer(response.body)
            except SdpError:
                self._hangup(call, "unusable answer to our re-INVITE")
                return
            self._media_maybe_changed(call, before)
        try:
            call.dialog.refresh_target(response.headers)
        except SipParseError:
            pass  # an unusable Contact in their 2xx: keep the target we have
        timer.restart(answer_response(response.headers, timer.ask), self._now)

    def _ack_2xx(self, call: Call, tx: ClientTransaction) -> None:
        """The ACK for a 2xx is ours to send (13.2.2.4); kept on the transaction for repeated 2xx."""
        cseq = parse_cseq(tx.request.headers.get("CSeq") or "")[0]
        tx.ack = serialize(self._in_dialog_request(call, "ACK", cseq))
        self._sends.append(Send(tx.ack, tx.dest, tx.transport))

    # -- an outbound call --------------------------------------------------------------

    def invite(
        self,
        target_uri: str,
        dest: Address,
        transport: str,
        local_rtp_port: int,
        now: float,
        credentials: DigestClient | None = None,
        from_user: str = "voiceline",
        privacy: bool = True,
        ring_timeout: float = RING_TIMEOUT_SECONDS,
        trunk: str = "",
        assert_identity_of: str | None = None,
        from_uri: str | None = None,
    ) -> str:
        """Call `target_uri` through `dest` (an IP address: names are resolved by the caller); returns the call's id.

        The outcome comes as an event: Answered (then CallEnded), Refused, Cancelled or TimedOut.
        `privacy`: an anonymous From and `Privacy: id` (RFC 3323), so the callee learns nothing of us.
        `from_uri`: our own identity for the From (e.g. the trunk's account, which some carriers
        require), with `Privacy: id` still asked when `privacy`.
        `assert_identity_of`: a live inbound call whose caller's asserted identity goes in a
        P-Asserted-Identity (RFC 3325; with `privacy`, the trusted next hop keeps it from
        untrusted ones); the identity is never returned, logged or kept past either call.
        """
        self._now = now
        if not is_ip_address(dest[0]):
            raise ValueError("the destination must be an IP address")
        parse_uri(target_uri)  # SipParseError before anything is kept
        if from_uri is not None:
            parse_uri(from_uri)
        local_tag = self.entropy.tag()
        port = self.transports[transport].local_address[1]
        host = self.settings.advertised_host
        sender = f"<{from_uri}>" if from_uri else ANONYMOUS_FROM if privacy else f"<sip:{from_user}@{host}>"
        headers = Headers(
            [
                ("Via", f"SIP/2.0/{transport} {host}:{port};branch={self.entropy.branch()};rport"),
                ("Max-Forwards", "70"),
                ("From", f"{sender};tag={local_tag}"),
                ("To", f"<{target_uri}>"),
                ("Call-ID", self.entropy.sip_call_id()),
                ("CSeq", f"{self.entropy.first_cseq()} INVITE"),
                ("Contact", self.contact_for(transport, target_uri[:5].lower() == "sips:")),
                *self._capabilities(),
                ("User-Agent", USER_AGENT),
            ]
        )
        policy = self.settings.session_timers
        if policy.session_expires:
            for name, value in request_headers(policy.session_expires, policy):
                if name != "Supported":  # already in the capabilities
                    headers.add(name, value)
        if privacy:
            headers.add("Privacy", "id")
        asserted = self._by_id.get(assert_identity_of) if assert_identity_of is not None else None
        if asserted is not None and asserted.identity is not None and asserted.state is not CallState.ENDED:
            headers.add("P-Asserted-Identity", _identity_uri(asserted.identity, host))
        media = OfferAnswer(host, self.settings.codecs, local_port=local_rtp_port)
        headers.add("Content-Type", "application/sdp")
        request = SipRequest("INVITE", target_uri, headers, media.offer())
        dialog = Dialog.from_our_invite(request, local_tag)
        call = Call(
            self.entropy.call_id(), dialog, media, dest, transport, state=CallState.CALLING,
            credentials=credentials, trunk=trunk,
        )  # fmt: skip
        self._exchange(call, ExchangeEvent.SEND_INVITE)
        self._add(call)
        self.counters.calls += 1
        self._send_invite(call, request)
        self.heap.arm(call, "ring", now + ring_timeout)
        log.info("call.placed", call=call.id, transport=transport.lower())
        return call.id

    def _send_invite(self, call: Call, request: SipRequest) -> None:
        if call.outgoing is not None:
            self._outgoing.pop(call.outgoing, None)
        call.outgoing = self._start_client(request, call.peer, call.transport, lambda tx, r: self._invite_final(call, tx, r))
        self._outgoing[call.outgoing] = call

    def _on_provisional(self, call: Call, response: SipResponse) -> None:
        call.provisional_seen = True
        if response.status > 100:
            self._events.append(Ringing(call.id, response.status))
        if self._move(call, CallEvent.PROVISIONAL) is CallState.CANCELLING and not call.cancel_sent:
            self._send_cancel(call)  # we hung up before anything was heard: the CANCEL may go now

    def _invite_final(self, call: Call, tx: ClientTransaction, response: SipResponse | None) -> None:
        self._outgoing.pop(tx, None)
        if response is None:
            cancelled = self._move(call, CallEvent.NO_RESPONSE) is CallState.ENDED and call.end_reason not in ("", "no answer")
            self._outbound_over(call, Cancelled(call.id) if cancelled else TimedOut(call.id), "no response")
        elif response.status < 300:
            self._invite_answered(call, tx, response)
        elif response.status in (401, 407) and self._retry_with_credentials(call, tx, response):
            return
        else:
            was = call.state
            self._move(call, CallEvent.FAILURE)
            if was is CallState.CANCELLING:
                cancelled = call.end_reason != "no answer"
                self._outbound_over(call, Cancelled(call.id) if cancelled else TimedOut(call.id), call.end_reason)
            else:
                log.info("call.refused", call=call.id, status=response.status)
                self._outbound_over(call, Refused(call.id, response.status), f"refused {response.status}")

    def _invite_answered(self, call: Call, tx: ClientTransaction, response: SipResponse) -> None:
        was = call.state
        try:
            call.dialog.confirm(response.headers)
        except SipParseError:
            log.warning("call.unusable_answer", call=call.id)
            self._move(call, CallEvent.FAILURE)
            self._outbound_over(call, Refused(call.id, 502), "unusable 2xx")
            return
        self._ack_2xx(call, tx)
        self._move(call, CallEvent.SUCCESS)
        self._exchange(call, ExchangeEvent.INVITE_DONE)
        if was is CallState.CANCELLING:  # the 2xx crossed our CANCEL (RFC 3261 9.1): ACK it, then BYE
            self._send_bye(call)
            self._outbound_over(call, Cancelled(call.id), call.end_reason)
            return
        try:
            call.media.take_answer(response.body)
        except SdpError:
            self._send_bye(call)
            self._move(call, CallEvent.HANGUP)
            self._outbound_over(call, Refused(call.id, 488), "unusable answer")
            return
        call.peer_allows_update = _lists(response.headers, "Allow", "UPDATE")
        self.heap.cancel(call, "ring")
        if self.settings.session_timers.session_expires or "Session-Expires" in response.headers:
            agreement = answer_response(response.headers, self.settings.session_timers.session_expires)
            if agreement.interval:
                call.session_timer = SessionTimer(agreement.interval, agreement.we_refresh, self._now)
        self._start_call_timers(call)
        call.media_ready = True
        log.info("call.answered", call=call.id, outbound=True)
        self._events.append(Answered(self.info(call)))

    def _retry_with_credentials(self, call: Call, tx: ClientTransaction, response: SipResponse) -> bool:
        """Send the INVITE again with our answer to a digest challenge; False when there is none to give."""
        header = "WWW-Authenticate" if response.status == 401 else "Proxy-Authenticate"
        challenge = pick_challenge(response.headers.get_all(header))
        if call.credentials is None or challenge is None or call.state not in (CallState.CALLING, CallState.PROCEEDING):
            return False
        if call.challenged and not challenge.stale:
            return False  # our credentials were refused
        call.challenged = True
        call.credentials.accept(challenge)
        request = tx.request
        headers = request.headers.copy()
        headers.remove("Authorization")
        headers.remove("Proxy-Authorization")
        via = parse_via(headers.get("Via") or "")
        via.params["branch"] = self.entropy.branch()
        headers.set("Via", str(via))
        seq = parse_cseq(headers.get("CSeq") or "")[0] + 1
        headers.set("CSeq", f"{seq} INVITE")
        authorization = call.credentials.authorization("INVITE", request.uri)
        assert authorization is not None  # a challenge was accepted
        headers.add("Authorization" if response.status == 401 else "Proxy-Authorization", authorization)
        call.dialog.local_seq = seq
        call.provisional_seen = False
        log.info("call.challenged", call=call.id, status=response.status)
        self._send_invite(call, SipRequest("INVITE", request.uri, headers, request.body))
        return True

    def _outbound_over(self, call: Call, outcome: Event, reason: str) -> None:
        self._events.append(outcome)
        self._end(call, reason)

    def _send_cancel(self, call: Call) -> None:
        """CANCEL our INVITE (9.1): its Request-URI, Call-ID, From, To, CSeq number and Via branch."""
        invite = call.outgoing
        assert invite is not None
        call.cancel_sent = True
        headers = Headers([("Via", invite.request.headers.get("Via") or "")])
        for name in ("Max-Forwards", "From", "To", "Call-ID"):
            headers.add(name, invite.request.headers.get(name) or "")
        headers.add("CSeq", f"{parse_cseq(invite.request.headers.get('CSeq') or '')[0]} CANCEL")
        headers.add("User-Agent", USER_AGENT)
        self._start_client(SipRequest("CANCEL", invite.request.uri, headers), invite.dest, invite.transport, _ignore)

    # -- ending calls ------------------------------------------------------------------

    def hangup(self, call_id: str, reason: str, now: float) -> None:
        """End a call from our side: a final error before the answer, BYE after it, CANCEL while ours rings.

        An inbound call ends even when its answer or BYE cannot be sent (logged): nothing stays behind.
        """
        self._now = now
        call = self._by_id.get(call_id)
        if call is not None:
            self._hangup(call, reason)

    def _hangup(self, call: Call, reason: str) -> None:
        if call.state is CallState.ENDED:
            return
        was = call.state
        self._move(call, CallEvent.HANGUP)
        if was in (CallState.CALLING, CallState.PROCEEDING):
            call.end_reason = reason
            if call.provisional_seen:
                self._send_cancel(call)
            return  # ends with the INVITE's final response (or Timer B)
        if was is CallState.CANCELLING:
            return
        try:
            if was in (CallState.OFFERED, CallState.RINGING):
                assert call.invite is not None
                self._respond(call.invite, 480, [("Retry-After", "60")])
            else:
                self._send_bye(call)
        except Exception as exc:
            log.error("call.hangup_failed", call=call.id, error=type(exc).__name__, exc_info=exc)
        self._end(call, reason)

    def _send_bye(self, call: Call) -> None:
        bye = self._in_dialog_request(call, "BYE")
        bye.headers.add("User-Agent", USER_AGENT)
        self._send_in_dialog(call, bye, _ignore)

    def drain(self) -> None:
        """Refuse new calls (503 with Retry-After); calls in progress go on."""
        if not self.draining:
            self.draining = True
            log.info("sip.draining", calls=len(self._calls))

    def undrain(self) -> None:
        """Take new calls again after a drain."""
        if self.draining:
            self.draining = False
            log.info("sip.undrained", calls=len(self._calls))

    def _add(self, call: Call) -> None:
        self._calls[(call.dialog.call_id, call.dialog.local_tag)] = call
        self._by_id[call.id] = call

    def _end(self, call: Call, reason: str) -> None:
        call.state = CallState.ENDED
        self._stop_awaiting_ack(call)  # a BYE before the ACK ends the 2xx retransmissions too
        call.deadlines.clear()
        if call.transferring:
            self._transfer_over(call, TransferFailed(call.id, 487))  # the call ended before the transfer did
        if call.pseudonym is not None and call.identity_held:
            self.pseudonyms.release(call.pseudonym.key_epoch)
        call.identity, call.identity_held = None, False  # the pseudonym stays for the CallEnded event
        self._calls.pop((call.dialog.call_id, call.dialog.local_tag), None)
        if call.invite is not None:
            self._calls_by_invite.pop(call.invite, None)
        if call.media_ready or call.outgoing is not None:
            self._by_id.pop(call.id, None)  # else kept until the app's accept or reject
        log.info("call.ended", call=call.id, reason=reason)
        if call.media_ready:
            self._events.append(CallEnded(self.info(call), reason))

    def _exchange(self, call: Call, event: ExchangeEvent) -> Refusal | None:
        """Apply the exchange table; a refusal changes nothing."""
        outcome = next_exchange(call.exchange, event)
        if isinstance(outcome, Refusal):
            return outcome
        call.exchange = outcome
        return None

    def _move(self, call: Call, event: CallEvent) -> CallState | Refusal:
        """Apply the phase table; returns the new state (or the refusal, which changes nothing)."""
        outcome = next_phase(call.state, event)
        if isinstance(outcome, CallState):
            call.state = outcome
        return outcome

    # -- sending -----------------------------------------------------------------------

    def _dialog_destination(self, call: Call) -> tuple[str, Address]:
        """Where our in-dialog requests go (RFC 3261 18.1.1), never resolving a name the peer chose.

        Over the peer's connection while it is open; else to the next hop (the
        first route, else the remote target) over the transport its URI asks for,
        when that hop is an IP address or a host name of the call's own trunk (at
        its last resolved address); else back to where the INVITE came from or went.
        """
        arrived_on = self.transports[call.transport]
        if arrived_on.reliable and arrived_on.has_connection(call.peer):
            return call.transport, call.peer
        host, port = call.dialog.next_hop()
        if not is_ip_address(host):
            resolved = self.policy.trunk_address(call.trunk, host) if self.policy is not None else None
            if resolved is None:
                return call.transport, call.peer
            host = resolved
        name = _next_hop_transport(call.dialog.route_set, call.dialog.remote_target)
        return (name if name in self.transports else call.transport), (host, port)

    def _in_dialog_request(self, call: Call, method: str, cseq: int | None = None) -> SipRequest:
        transport, _ = self._dialog_destination(call)
        port = self.transports[transport].local_address[1]
        return call.dialog.new_request(
            method, self.settings.advertised_host, port, transport, cseq, branch=self.entropy.branch()
        )

    def _send_in_dialog(self, call: Call, request: SipRequest, on_final: FinalHandler) -> ClientTransaction:
        transport, dest = self._dialog_destination(call)
        return self._start_client(request, dest, transport, on_final)

    def send_request(self, request: SipRequest, dest: Address, now: float) -> ClientTransaction:
        """Send a non-INVITE request (REGISTER, OPTIONS ...); its final response comes as RequestDone.

        The caller builds the request, with a Via carrying a fresh branch and the
        transport it goes on (one we listen on).
        """
        self._now = now
        transport = parse_via(request.headers.get("Via") or "").transport.upper()
        return self._start_client(request, dest, transport, self._request_done)

    def _request_done(self, tx: ClientTransaction, response: SipResponse | None) -> None:
        self._events.append(RequestDone(tx, response))

    def _start_client(self, request: SipRequest, dest: Address, transport: str, on_final: FinalHandler) -> ClientTransaction:
        tx, sends = self.transactions.send_request(request, dest, self._now, transport)
        self._pending[tx] = on_final
        self._sends.extend(sends)
        return tx

    def _on_response(self, response: SipResponse) -> None:
        matched = self.transactions.find_client(response)
        tx = self.transactions.on_response(response, self._now)
        self._sends.extend(self.transactions.take_sends())
        if matched is not None and response.status < 200:
            call = self._outgoing.get(matched)
            if call is not None:
                self._contained(call, self._on_provisional, call, response)
        if tx is None:
            return
        on_final = self._pending.pop(tx, None)
        if on_final is not None:
            call = self._outgoing.get(tx)
            if call is not None:
                self._contained(call, on_final, tx, response)
            else:
                on_final(tx, response)
        elif tx.ack is not None and response.status < 300:
            self._sends.append(Send(tx.ack, tx.dest, tx.transport))  # a repeated 2xx to our INVITE: our ACK was lost

    def _capabilities(self) -> list[tuple[str, str]]:
        return [("Allow", ALLOWED_METHODS), ("Supported", ", ".join(SUPPORTED_EXTENSIONS))]

    def _call_headers(self, call: Call) -> list[tuple[str, str]]:
        secure = call.invite is not None and call.invite.request.uri[:5].lower() == "sips:"
        return [("Contact", self.contact_for(call.transport, secure)), *self._capabilities()]

    def _respond(
        self, tx: ServerTransaction, status: int, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
    ) -> None:
        response = self._response(tx, status, headers, body)
        self._sends.extend(self.transactions.respond(tx, response, self._now))

    def _respond_and_forget(self, tx: ServerTransaction, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        """A final answer that keeps no state for its sender (a retransmission gets the same answer again)."""
        self._sends.append(tx.send(serialize(self._response(tx, status, headers))))
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
            to_tag = call.dialog.local_tag if call is not None else self.entropy.tag()
        return _with_server(response_to(tx.request, status, to_tag=to_tag, headers=extra, body=body))

    def info(self, call: Call) -> CallInfo:
        """What the app may know of `call`."""
        audio = call.audio
        media = None
        if audio is not None:
            ours = call.media.local_crypto
            keys = None
            if ours is not None and audio.crypto is not None:
                keys = SdesKeys(ours.suite, send_key=ours.key, receive_key=audio.crypto.key)
            media = CallMedia(
                audio.codec, audio.payload_type, audio.telephone_event_pt, (audio.remote_host, audio.remote_port),
                audio.direction, call.on_hold, keys,
            )  # fmt: skip
        pseudonym = call.pseudonym
        return CallInfo(
            call.id, call.outgoing is not None, call.trunk, call.line, call.peer[0], call.local_rtp_port, media,
            pseudonym.value if pseudonym else "", pseudonym.key_epoch if pseudonym else 0,
            pseudonym.withheld if pseudonym else False,
        )  # fmt: skip


def _identity_uri(identity: str, host: str) -> str:
    """A normalised identity as a P-Asserted-Identity value: tel: for E.164, a sip: URI else."""
    if identity.startswith("+"):
        return f"<tel:{identity}>"
    if identity.startswith("sip:"):
        return f"<{identity}>"
    return f"<sip:{identity}@{host};user=phone>"


def _ignore(tx: ClientTransaction, response: SipResponse | None) -> None:
    """The final response of a request whose outcome changes nothing (our BYE, our CANCEL)."""


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


def _sipfrag_status(body: bytes) -> int | None:
    """The status of a message/sipfrag's status line (`SIP/2.0 180 Ringing`), else None."""
    words = body.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
    if len(words) >= 2 and words[0] == b"SIP/2.0" and words[1].isdigit() and len(words[1]) == 3:
        return int(words[1])
    return None


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
