"""The asyncio edge of the call core: sockets in and out, one loop timer, events to the app.

Everything SIP decides is in `core.CallCore`; this class feeds it what the
transports receive and the loop's clock, sends what it returns, keeps one
`loop.call_at` for its next deadline, and turns its events into calls on the
app's `CallHandler` (awaiting the app's decision on an offered call) and into
futures for the requests and calls we place.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from voiceline.sip.auth import DigestClient
from voiceline.sip.core import CallCore, CoreSettings, Entropy, SipCounters
from voiceline.sip.events import (
    Answered,
    CallConfirmed,
    CallEnded,
    CallInfo,
    CallOffered,
    Cancelled,
    Dtmf,
    Event,
    MediaChanged,
    Refused,
    RequestDone,
    Ringing,
    TimedOut,
    TransferFailed,
    TransferProgress,
    Transferred,
)
from voiceline.sip.message import SipRequest, SipResponse
from voiceline.sip.overload import OverloadGuard
from voiceline.sip.transaction import ClientTransaction, TransactionLayer
from voiceline.sip.transport import Address, SipTransport, StreamTransport
from voiceline.sip.admission import RequestPolicy

log = structlog.get_logger("voiceline.sip")

Outcome = Answered | Refused | Cancelled | TimedOut


class CallRejected(Exception):
    """Raised by the call handler to refuse a call with a SIP status."""

    def __init__(self, status: int, retry_after: int | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.retry_after = retry_after


class CallHandler(Protocol):
    async def call_offered(self, call: CallInfo) -> int:
        """Prepare media; return the local RTP port for the SDP, or raise CallRejected.

        `call.media` is None when the INVITE had no offer: it is there by the time of call_confirmed.
        """
        ...

    def call_confirmed(self, call: CallInfo) -> None: ...

    def call_media_changed(self, call: CallInfo) -> None:
        """A re-INVITE or UPDATE changed the direction, the remote address or the SRTP key."""
        ...

    def call_dtmf(self, call: CallInfo, digit: str) -> None:
        """A digit sent by SIP INFO (application/dtmf-relay or application/dtmf)."""
        ...

    def call_ended(self, call: CallInfo, reason: str) -> None: ...


@dataclass(eq=False)
class OutboundCall:
    """A call we placed: its outcome, then (when answered) its end; what else it reported on the way."""

    id: str
    outcome: asyncio.Future[Outcome]
    ended: asyncio.Future[CallEnded]
    events: asyncio.Queue[Ringing | MediaChanged | Dtmf] = field(default_factory=asyncio.Queue)


@dataclass(eq=False)
class Transfer:
    """Our REFER in a call: its outcome (Transferred or TransferFailed), and the progress reported on the way."""

    call_id: str
    outcome: asyncio.Future[Transferred | TransferFailed]
    progress: asyncio.Queue[TransferProgress] = field(default_factory=asyncio.Queue)


class UserAgent:
    def __init__(
        self,
        settings: CoreSettings,
        handler: CallHandler | None = None,
        policy: RequestPolicy | None = None,
        entropy: Entropy = Entropy(),
    ) -> None:
        """`handler`: None takes no calls (every INVITE is refused 503), e.g. to send one OPTIONS."""
        self.core = CallCore(settings, policy, entropy)
        self.handler = handler
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._requests: dict[ClientTransaction, asyncio.Future[SipResponse | None]] = {}
        self._outbound: dict[str, OutboundCall] = {}
        self._transfers: dict[str, Transfer] = {}
        self._requests_done = asyncio.Event()

    # -- what the app and tests read -------------------------------------------------

    @property
    def settings(self) -> CoreSettings:
        return self.core.settings

    @property
    def transports(self) -> dict[str, SipTransport]:
        return self.core.transports

    @property
    def transport(self) -> SipTransport | None:
        """The first transport attached (UDP unless it is off)."""
        return next(iter(self.core.transports.values()), None)

    @property
    def counters(self) -> SipCounters:
        return self.core.counters

    @property
    def overload(self) -> OverloadGuard:
        return self.core.overload

    @property
    def transactions(self) -> TransactionLayer:
        return self.core.transactions

    @property
    def calls(self) -> list[CallInfo]:
        """The calls in progress, as the app may see them."""
        return [self.core.info(call) for call in self.core.calls]

    @property
    def draining(self) -> bool:
        return self.core.draining

    # -- lifecycle -----------------------------------------------------------

    def attach(self, transport: SipTransport) -> None:
        """Add a listening transport; its messages come in through `message_received`."""
        self.core.transports[transport.name] = transport
        if isinstance(transport, StreamTransport):
            transport.busy_peers = functools.partial(self._call_peers, transport.name)

    def _call_peers(self, transport_name: str) -> set[Address]:
        """Remote addresses of the connections that live calls use."""
        return {call.peer for call in self.core.calls if call.transport == transport_name}

    def drain(self) -> None:
        """Refuse new calls (503 with Retry-After); calls in progress go on."""
        self.core.drain()

    def undrain(self) -> None:
        """Take new calls again after a drain."""
        self.core.undrain()

    async def shutdown(self, timeout: float = 4.0) -> None:
        """Refuse new calls, end every call, wait (bounded) for the answers to our BYEs."""
        self.core.draining = True
        for call in self.core.calls:
            self.hangup(call.id, "service stopping")  # never raises: one call's failure stops no other BYE
        if self.core.pending_requests:
            self._requests_done.clear()
            try:
                await asyncio.wait_for(self._requests_done.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        for task in list(self._tasks):
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()

    # -- into the core -----------------------------------------------------------

    def message_received(self, data: bytes, source: Address, transport: SipTransport) -> None:
        """One datagram, or one framed stream message; `source` names the sender or the connection."""
        self.core.receive(data, source, transport.name, self._loop.time())
        self._flush()

    def hangup(self, call_id: str, reason: str) -> None:
        """End a call from our side (BYE, a final error, or CANCEL while our INVITE rings)."""
        self.core.hangup(call_id, reason, self._loop.time())
        self._flush()

    def refer(self, call_id: str, target_uri: str, timeout: float | None = None) -> Transfer | None:
        """Ask a confirmed call's peer to call `target_uri` instead (REFER, RFC 3515); None when it cannot be asked."""
        options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        if not self.core.refer(call_id, target_uri, self._loop.time(), **options):
            return None
        transfer = self._transfers[call_id] = Transfer(call_id, self._loop.create_future())
        self._flush()
        return transfer

    async def request(self, request: SipRequest, dest: Address) -> SipResponse | None:
        """Send a non-INVITE request (REGISTER, OPTIONS ...) in a client transaction.

        Returns its final response, or None when none came in time (Timer F).
        The caller builds the request, with a Via carrying a fresh branch and
        the transport it goes on (one we listen on).
        """
        waiter: asyncio.Future[SipResponse | None] = self._loop.create_future()
        self._requests[self.core.send_request(request, dest, self._loop.time())] = waiter
        self._flush()
        return await waiter

    def invite(
        self,
        target_uri: str,
        dest: Address,
        local_rtp_port: int,
        transport: str = "UDP",
        credentials: DigestClient | None = None,
        privacy: bool = True,
        ring_timeout: float | None = None,
        trunk: str = "",
        assert_identity_of: str | None = None,
        from_uri: str | None = None,
    ) -> OutboundCall:
        """Place a call to `target_uri` through `dest` (an IP address); await `outcome`, then `ended`.

        `trunk`: the trunk `dest` belongs to, when it is one: its requests in the call are then admitted as ours.
        `assert_identity_of`: an inbound call whose caller's identity the callee may learn (CallCore.invite);
        `from_uri`: our own From (the trunk's account) instead of the anonymous one.
        """
        options: dict[str, Any] = {} if ring_timeout is None else {"ring_timeout": ring_timeout}
        call_id = self.core.invite(
            target_uri, dest, transport, local_rtp_port, self._loop.time(), credentials,
            privacy=privacy, trunk=trunk, assert_identity_of=assert_identity_of,
            from_uri=from_uri, **options,
        )  # fmt: skip
        call = OutboundCall(call_id, self._loop.create_future(), self._loop.create_future())
        self._outbound[call_id] = call
        self._flush()
        return call

    # -- out of the core -----------------------------------------------------------

    def _flush(self) -> None:
        """Send what the core decided, hand its events on, and wake up for its next deadline."""
        for send in self.core.take_sends():
            transport = self.core.transports.get(send.transport)
            if transport is not None:
                transport.send(send.data, send.dest)
        for event in self.core.take_events():
            self._dispatch(event)
        if not self.core.pending_requests:
            self._requests_done.set()
        self._reschedule()

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, RequestDone):
            waiter = self._requests.pop(event.request, None)
            if waiter is not None and not waiter.done():  # the caller may have stopped waiting
                waiter.set_result(event.response)
            return
        if isinstance(event, (TransferProgress, Transferred, TransferFailed)):
            self._to_transfer(event)
            return
        call_id = event.call_id if isinstance(event, (Ringing, Refused, Cancelled, TimedOut)) else event.call.id
        outbound = self._outbound.get(call_id)
        if outbound is not None:
            self._to_outbound(outbound, event)
        elif isinstance(event, CallOffered):
            self._spawn(self._decide(event.call))
        elif self.handler is not None and isinstance(event, (CallConfirmed, MediaChanged, Dtmf, CallEnded)):
            self._to_handler(event)

    def _to_outbound(self, call: OutboundCall, event: Event) -> None:
        if isinstance(event, (Answered, Refused, Cancelled, TimedOut)):
            if not call.outcome.done():
                call.outcome.set_result(event)
            if not isinstance(event, Answered):
                del self._outbound[call.id]
        elif isinstance(event, CallEnded):
            del self._outbound[call.id]
            if not call.ended.done():
                call.ended.set_result(event)
        elif isinstance(event, (Ringing, MediaChanged, Dtmf)):
            call.events.put_nowait(event)

    def _to_transfer(self, event: TransferProgress | Transferred | TransferFailed) -> None:
        transfer = self._transfers.get(event.call_id)
        if transfer is None:
            return
        if isinstance(event, TransferProgress):
            transfer.progress.put_nowait(event)
            return
        del self._transfers[event.call_id]
        if not transfer.outcome.done():
            transfer.outcome.set_result(event)

    def _to_handler(self, event: CallConfirmed | MediaChanged | Dtmf | CallEnded) -> None:
        assert self.handler is not None
        try:
            if isinstance(event, CallConfirmed):
                self.handler.call_confirmed(event.call)
            elif isinstance(event, MediaChanged):
                self.handler.call_media_changed(event.call)
            elif isinstance(event, Dtmf):
                self.handler.call_dtmf(event.call, event.digit)
            else:
                self.handler.call_ended(event.call, event.reason)
        except Exception as exc:  # this call ends (when it still runs); no other call is touched
            log.error("call.handler_failed", call=event.call.id, error=type(exc).__name__, exc_info=exc)
            if not isinstance(event, CallEnded):
                self.hangup(event.call.id, "internal error")

    async def _decide(self, call: CallInfo) -> None:
        """The app's answer to an offered call: its RTP port, a refusal, or (on a bug) the call ends."""
        if self.handler is None:
            self.core.reject(call.id, 503, None, self._loop.time())
            self._flush()
            return
        try:
            port = await self.handler.call_offered(call)
        except CallRejected as exc:
            self.core.reject(call.id, exc.status, exc.retry_after, self._loop.time())
        except Exception as exc:  # a bug in one call ends that call, with its trace in the log
            log.error("call.answer_failed", call=call.id, error=type(exc).__name__, exc_info=exc)
            self.core.hangup(call.id, "internal error", self._loop.time())
            self.core.reject(call.id, 500, None, self._loop.time())  # forgets it: nobody accepts it now
        else:
            self.core.accept(call.id, port, self._loop.time())
        self._flush()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("sip.task_failed", error=type(exc).__name__, exc_info=exc)

    def _reschedule(self) -> None:
        deadline = self.core.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = None if deadline is None else self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        try:
            self.core.poll(self._loop.time())
        except Exception as exc:  # logged; the timers stay armed for every other transaction and call
            log.error("sip.internal_error", error=type(exc).__name__, exc_info=exc)
        self._flush()
