"""The SIP user agent core: answers inbound calls and ends them (RFC 3261 as a UAS).

Timers and retransmissions live in the sans-I/O transaction layer; this module
is the asyncio edge that feeds it datagrams and the loop clock and tells the
call handler (the app) when a call is offered, confirmed and ended.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from voiceline import __version__
from voiceline.privacy import new_call_id
from voiceline.sip.dialog import Dialog, is_ip_address, new_tag
from voiceline.sip.message import (
    SipParseError,
    SipRequest,
    SipResponse,
    UnsupportedVersion,
    parse_message,
    parse_name_addr,
    response_to,
    salvage_request_headers,
    serialize,
)
from voiceline.sip.sdp import (
    NegotiatedAudio,
    NoCommonCodec,
    SdpError,
    SessionDescription,
    build_answer,
    negotiate,
    parse_sdp,
)
from voiceline.sip.transaction import (
    ClientTransaction,
    Incoming,
    Send,
    ServerTransaction,
    Timers,
    TransactionLayer,
)
from voiceline.sip.transport import Address, SipTransport
from voiceline.sip.trunks import Admit, Drop, Refuse, RequestPolicy

log = structlog.get_logger("voiceline.sip")

ALLOWED_METHODS = "INVITE, ACK, BYE, CANCEL, OPTIONS"
USER_AGENT = f"voiceline/{__version__}"


class CallState(enum.Enum):
    OFFERED = "offered"  # INVITE received, ringing
    ANSWERED = "answered"  # 200 OK sent, waiting for the ACK
    CONFIRMED = "confirmed"  # ACK received: media flows
    ENDED = "ended"


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
    offer: SessionDescription
    audio: NegotiatedAudio
    invite: ServerTransaction
    state: CallState = CallState.OFFERED
    local_rtp_port: int = 0
    media_ready: bool = False  # the handler accepted the call and owns media for it
    awaiting_ack: ServerTransaction | None = None  # an INVITE whose 2xx is retransmitted until ACKed
    answer_sdp: bytes = b""
    session_id: int = field(default_factory=lambda: secrets.randbelow(1 << 31))
    trunk: str = ""  # the trunk it came in on (admission policy), "" without a policy
    line: str = ""  # the line its dialled number reaches


class CallHandler(Protocol):
    async def call_offered(self, call: Call) -> int:
        """Prepare media; return the local RTP port for the SDP answer, or raise CallRejected."""
        ...

    def call_confirmed(self, call: Call) -> None: ...

    def call_ended(self, call: Call) -> None: ...


@dataclass
class UserAgentSettings:
    advertised_host: str
    answer_delay: float = 0.5
    timers: Timers = Timers()
    max_message_size: int = 65535
    codecs: tuple[str, ...] = ("PCMU", "PCMA")


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
        self.transport: SipTransport | None = None
        self._calls: dict[tuple[str, str], Call] = {}  # (Call-ID, our tag) -> call
        self._calls_by_invite: dict[ServerTransaction, Call] = {}
        self._pending_byes: set[ClientTransaction] = set()
        self._waiters: dict[ClientTransaction, asyncio.Future[SipResponse | None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = False
        self._loop = asyncio.get_running_loop()

    # -- lifecycle -----------------------------------------------------------

    def attach(self, transport: SipTransport) -> None:
        self.transport = transport

    @property
    def contact(self) -> str:
        assert self.transport is not None
        port = self.transport.local_address[1]
        return f"<sip:voiceline@{self.settings.advertised_host}:{port}>"

    @property
    def calls(self) -> list[Call]:
        return list(self._calls.values())

    async def shutdown(self, timeout: float = 4.0) -> None:
        """Refuse new calls, send BYE on every call, wait (bounded) for the answers."""
        self._draining = True
        for call in list(self._calls.values()):
            self.hangup(call, "service stopping")
        deadline = self._loop.time() + timeout
        while self._pending_byes and self._loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self._tasks):
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()

    # -- inbound -------------------------------------------------------------

    def datagram_received(self, data: bytes, source: Address) -> None:
        try:
            self._on_datagram(data, source)
        except Exception as exc:  # no input may stop the server; the message text is not logged
            log.error("sip.internal_error", error=type(exc).__name__)

    def _on_datagram(self, data: bytes, source: Address) -> None:
        self.counters.received += 1
        if len(data) > self.settings.max_message_size:
            self.counters.oversized += 1
            return
        if not data.strip(b"\r\n"):
            return  # keep-alive
        try:
            message = parse_message(data, self.settings.max_message_size)
        except UnsupportedVersion:
            self._reject_unparsed(data, source, 505)
            return
        except SipParseError:
            self.counters.malformed += 1
            log.debug("sip.malformed", size=len(data))
            self._reject_unparsed(data, source, 400)
            return
        try:
            if isinstance(message, SipRequest):
                self._on_request(message, source)
            else:
                self._on_response(message)
        except SipParseError:
            # A header the parser accepted but transaction matching could not use.
            self.counters.malformed += 1
            if isinstance(message, SipRequest) and message.method != "ACK":
                self._send(Send(_serialize_response(response_to(message, 400)), source))
        self._reschedule()  # an ACK or a response may have cancelled timers

    def _on_request(self, request: SipRequest, source: Address) -> None:
        log.debug("sip.request", method=request.method)
        now = self._loop.time()
        kind, tx, sends = self.transactions.on_request(request, source, now)
        self._send_all(sends)
        if kind is Incoming.ABSORBED:
            return
        if kind is Incoming.ACK:
            self._on_ack(request)
            return
        assert tx is not None
        try:
            self._dispatch(tx, request)
        except SipParseError:
            # A header the parser accepted but this request's handling needs in a stricter form
            # (e.g. an INVITE without a usable Contact): 400 through its transaction.
            self.counters.malformed += 1
            self._respond(tx, 400)

    def _dispatch(self, tx: ServerTransaction, request: SipRequest) -> None:
        max_forwards = request.headers.get("Max-Forwards")  # the parser checked it is numeric
        if max_forwards is not None and int(max_forwards) == 0 and request.method != "OPTIONS":
            self._respond(tx, 483)
            return
        to_tag = parse_name_addr(request.headers.get("To") or "").tag
        admission = Admit("")
        if self.policy is not None and to_tag is None and request.method != "CANCEL":
            verdict = self.policy.check(request, tx.source)
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
            self._respond(tx, 200, [("Allow", ALLOWED_METHODS), ("Accept", "application/sdp")])
        elif request.method in ("BYE", "INVITE"):
            self._on_in_dialog(tx, request, to_tag)
        else:
            self._respond(tx, 405, [("Allow", ALLOWED_METHODS)])

    def _on_invite(self, tx: ServerTransaction, request: SipRequest, admission: Admit) -> None:
        if self._draining:
            self._respond(tx, 503, [("Retry-After", "60")])
            return
        if not request.uri.lower().startswith(("sip:", "sips:")):
            self._respond(tx, 416)
            return
        required = request.headers.get_all("Require")
        if required:
            self._respond(tx, 420, [("Unsupported", ", ".join(required))])
            return
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/sdp" or not request.body:
            # Offerless INVITEs (offer in the 200, answer in the ACK) are not supported yet.
            self._respond(tx, 415 if request.body else 488, [("Accept", "application/sdp")])
            return
        try:
            offer = parse_sdp(request.body)
            codecs = tuple(c for c in self.settings.codecs if c in admission.codecs or not admission.codecs)
            audio = negotiate(offer, codecs)
        except NoCommonCodec:
            self._respond(tx, 488)
            return
        except SdpError:
            self._respond(tx, 400)
            return
        dialog = Dialog.from_invite(request, new_tag())
        call = Call(new_call_id(), dialog, offer, audio, tx, trunk=admission.trunk, line=admission.line)
        self._calls[(dialog.call_id, dialog.local_tag)] = call
        self._calls_by_invite[tx] = call
        self.counters.calls += 1
        self._respond(tx, 100)
        log.info("call.offered", call=call.id, codec=audio.codec, trunk=call.trunk, line=call.line)
        self._spawn(self._answer(call))

    async def _answer(self, call: Call) -> None:
        try:
            call.local_rtp_port = await self.handler.call_offered(call)
        except CallRejected as exc:
            extra = [("Retry-After", str(exc.retry_after))] if exc.retry_after else []
            self._final_without_dialog(call, exc.status, extra)
            return
        call.media_ready = True
        if call.state is CallState.ENDED:  # cancelled while media was being prepared
            self.handler.call_ended(call)
            return
        self._respond(call.invite, 180, self._call_headers())
        await asyncio.sleep(self.settings.answer_delay)
        if call.state is not CallState.OFFERED:
            return
        call.answer_sdp = build_answer(
            call.offer,
            call.audio,
            self.settings.advertised_host,
            call.local_rtp_port,
            call.session_id,
            1,
        )
        call.state = CallState.ANSWERED
        call.awaiting_ack = call.invite
        self._respond(call.invite, 200, self._call_headers(), call.answer_sdp)
        log.info("call.answered", call=call.id)

    def _on_ack(self, request: SipRequest) -> None:
        to_tag = parse_name_addr(request.headers.get("To") or "").tag
        call = self._calls.get((request.headers.get("Call-ID") or "", to_tag or ""))
        if call is None:
            return  # a stray ACK
        self._stop_awaiting_ack(call)
        if call.state is not CallState.ANSWERED:
            return  # the ACK of a re-INVITE, or a repeated one
        call.state = CallState.CONFIRMED
        log.info("call.confirmed", call=call.id)
        self.handler.call_confirmed(call)

    def _on_cancel(self, tx: ServerTransaction, request: SipRequest) -> None:
        invite = self.transactions.find_invite(request)
        call = self._calls_by_invite.get(invite) if invite is not None else None
        if invite is None:
            self._respond(tx, 481)
            return
        self._respond(tx, 200)
        if call is not None and call.state is CallState.OFFERED:
            self._respond(invite, 487)
            self._end(call, "cancelled")

    def _on_in_dialog(self, tx: ServerTransaction, request: SipRequest, to_tag: str | None) -> None:
        call = self._calls.get((request.headers.get("Call-ID") or "", to_tag or ""))
        if call is None or call.state is CallState.ENDED:
            self._respond(tx, 481)
            return
        if not call.dialog.accepts_remote_seq(request):
            self._respond(tx, 500)
            return
        if request.method == "BYE":
            self._respond(tx, 200)
            self._end(call, "caller hung up")
            return
        self._on_reinvite(tx, request, call)

    def _on_reinvite(self, tx: ServerTransaction, request: SipRequest, call: Call) -> None:
        """A refresh that keeps our codec gets our unchanged answer; anything else 488."""
        try:
            audio = negotiate(parse_sdp(request.body), (call.audio.codec,)) if request.body else call.audio
        except SdpError:
            self._respond(tx, 488)
            return
        if call.state is not CallState.CONFIRMED or audio.payload_type != call.audio.payload_type:
            self._respond(tx, 488)
            return
        self._respond(tx, 200, self._call_headers(), call.answer_sdp)
        call.awaiting_ack = tx

    def _stop_awaiting_ack(self, call: Call) -> None:
        if call.awaiting_ack is not None:
            self.transactions.acknowledged(call.awaiting_ack, self._loop.time())
            call.awaiting_ack = None

    # -- outbound ------------------------------------------------------------

    def hangup(self, call: Call, reason: str) -> None:
        """End a call from our side: a final error before the answer, BYE after it."""
        if call.state is CallState.ENDED:
            return
        if call.state is CallState.OFFERED:
            self._respond(call.invite, 480, [("Retry-After", "60")])
        else:
            self._send_bye(call)
        self._end(call, reason)

    def _send_bye(self, call: Call) -> None:
        assert self.transport is not None
        port = self.transport.local_address[1]
        bye = call.dialog.new_request("BYE", self.settings.advertised_host, port, self.transport.name)
        bye.headers.add("User-Agent", USER_AGENT)
        next_host, next_port = call.dialog.next_hop()
        if is_ip_address(next_host):
            self._start_client(bye, (next_host, next_port))
        else:
            self._spawn(self._resolve_and_send(bye, next_host, next_port, call.invite.source))

    async def _resolve_and_send(self, request: SipRequest, host: str, port: int, fallback: Address) -> None:
        try:
            infos = await self._loop.getaddrinfo(host, port, type=2)  # SOCK_DGRAM
            dest: Address = (str(infos[0][4][0]), int(infos[0][4][1]))
        except OSError:
            dest = fallback  # the address the INVITE came from is our best remaining hope
        self._start_client(request, dest)

    async def request(self, request: SipRequest, dest: Address) -> SipResponse | None:
        """Send a non-INVITE request (REGISTER, OPTIONS ...) in a client transaction.

        Returns its final response, or None when none came in time (Timer F).
        The caller builds the request, with a Via carrying a fresh branch.
        """
        waiter: asyncio.Future[SipResponse | None] = self._loop.create_future()
        tx = self._start_client(request, dest)
        self._waiters[tx] = waiter
        try:
            return await waiter
        finally:
            self._waiters.pop(tx, None)

    def _start_client(self, request: SipRequest, dest: Address) -> ClientTransaction:
        tx, sends = self.transactions.send_request(request, dest, self._loop.time())
        if request.method == "BYE":
            self._pending_byes.add(tx)
        self._send_all(sends)
        self._reschedule()
        return tx

    def _on_response(self, response: SipResponse) -> None:
        tx = self.transactions.on_response(response, self._loop.time())
        if tx is not None:
            self._pending_byes.discard(tx)
            self._finish_request(tx, tx.response)

    def _finish_request(self, tx: ClientTransaction, response: SipResponse | None) -> None:
        waiter = self._waiters.pop(tx, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    # -- helpers ---------------------------------------------------------------

    def _end(self, call: Call, reason: str) -> None:
        if call.state is CallState.ENDED:
            return
        call.state = CallState.ENDED
        self._stop_awaiting_ack(call)  # a BYE before the ACK ends the 2xx retransmissions too
        self._calls.pop((call.dialog.call_id, call.dialog.local_tag), None)
        self._calls_by_invite.pop(call.invite, None)
        log.info("call.ended", call=call.id, reason=reason)
        if call.media_ready:
            self.handler.call_ended(call)

    def _final_without_dialog(self, call: Call, status: int, extra: list[tuple[str, str]]) -> None:
        if call.state is CallState.OFFERED:
            self._respond(call.invite, status, extra)
        self._end(call, f"refused {status}")

    def _call_headers(self) -> list[tuple[str, str]]:
        return [("Contact", self.contact), ("Allow", ALLOWED_METHODS)]

    def _respond(
        self,
        tx: ServerTransaction,
        status: int,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        extra = list(headers)
        if body:
            extra.append(("Content-Type", "application/sdp"))
        to_tag = None
        if status > 100 and not parse_name_addr(tx.request.headers.get("To") or "").tag:
            # Responses beyond 100 need a To tag (8.2.6.2); a call's INVITE uses its dialog's.
            call = self._calls_by_invite.get(tx)
            to_tag = call.dialog.local_tag if call is not None else new_tag()
        response = response_to(tx.request, status, to_tag=to_tag, headers=extra, body=body)
        self._send_all(self.transactions.respond(tx, _with_server(response), self._loop.time()))
        self._reschedule()  # a final response arms retransmission and cleanup timers

    def _reject_unparsed(self, data: bytes, source: Address, status: int) -> None:
        """Answer a message the parser refused, when the headers a response needs can be read back."""
        headers = salvage_request_headers(data)
        if headers is None:
            return
        request = SipRequest("INVITE", "sip:invalid", headers)
        try:
            response = response_to(request, status, to_tag=new_tag())
        except SipParseError:
            return
        self._send(Send(_serialize_response(response), source))

    def _send_all(self, sends: Iterable[Send]) -> None:
        for send in sends:
            self._send(send)

    def _send(self, send: Send) -> None:
        if self.transport is not None:
            self.transport.send(send.data, send.dest)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("sip.task_failed", error=type(exc).__name__)

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
        result = self.transactions.poll(self._loop.time())
        self._send_all(result.sends)
        for tx in result.unacknowledged:
            call = self._calls_by_invite.get(tx)
            if call is not None and call.state is CallState.ANSWERED:
                log.warning("call.ack_timeout", call=call.id)
                self.hangup(call, "no ACK")
        for client_tx in result.timed_out:
            self._pending_byes.discard(client_tx)
            self._finish_request(client_tx, None)
        self._reschedule()


def _with_server(response: SipResponse) -> SipResponse:
    response.headers.add("Server", USER_AGENT)
    return response


def _serialize_response(response: SipResponse) -> bytes:
    return serialize(_with_server(response))
