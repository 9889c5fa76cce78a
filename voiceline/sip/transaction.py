"""Sans-I/O SIP transactions (RFC 3261 section 17, RFC 6026 for accepted INVITEs).

The layer is fed parsed messages and the current time and returns what to send;
it never touches a socket or a clock itself. `next_deadline()` tells the I/O
edge when to call `poll()`, so tests drive every timer with a fake clock.
What the layer sends on its own while matching a response (the ACK for a
non-2xx final response to our INVITE) waits in `take_sends()`.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field

from voiceline.sip.message import (
    Headers,
    SipParseError,
    SipRequest,
    SipResponse,
    parse_cseq,
    parse_name_addr,
    parse_via,
    serialize,
)
from voiceline.sip.timer_heap import TimerHeap

Address = tuple[str, int]
MAGIC_COOKIE = "z9hG4bK"


@dataclass(frozen=True)
class Timers:
    """RFC 3261 timer base values in seconds (T1 RTT estimate, T2 cap, T4 network lifetime)."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    # Timer D: how long a completed client INVITE absorbs retransmitted final
    # responses (at least 32 s over UDP, RFC 3261 17.1.1.2).
    d: float = 32.0


@dataclass(frozen=True)
class Send:
    data: bytes
    dest: Address
    transport: str = "UDP"  # the name of the transport to send on ("UDP", "TCP", "TLS")


# Transports that deliver reliably: no retransmissions (Timers E, G; A for the INVITE
# client) and no lingering to absorb them (Timers I, J, K; D for the INVITE client are zero).
RELIABLE_TRANSPORTS = frozenset({"TCP", "TLS", "SCTP", "WS", "WSS"})


class State(enum.Enum):
    CALLING = "calling"  # our INVITE sent, nothing heard yet
    TRYING = "trying"
    PROCEEDING = "proceeding"
    ACCEPTED = "accepted"  # INVITE answered 2xx, waiting for the ACK (RFC 6026)
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


def new_branch() -> str:
    return MAGIC_COOKIE + secrets.token_hex(8)


def _merge_key(request: SipRequest) -> tuple[str, ...] | None:
    """What identifies a request arriving by several paths (RFC 3261 8.2.2.2); None inside a dialog."""
    if parse_name_addr(request.headers.get("To") or "").tag is not None:
        return None
    from_tag = parse_name_addr(request.headers.get("From") or "").tag or ""
    cseq, method = parse_cseq(request.headers.get("CSeq") or "")
    return (from_tag, request.headers.get("Call-ID") or "", str(cseq), method)


def _server_key(request: SipRequest, method: str) -> tuple[str, ...]:
    """Matching key of RFC 3261 17.2.3, with the RFC 2543 fallback for old peers."""
    via = parse_via(request.headers.get("Via") or "")
    branch = via.branch or ""
    if branch.startswith(MAGIC_COOKIE):
        return (branch, via.host, str(via.port or ""), method)
    from_tag = parse_name_addr(request.headers.get("From") or "").tag or ""
    cseq = parse_cseq(request.headers.get("CSeq") or "")[0]
    return ("2543", request.headers.get("Call-ID") or "", from_tag, str(cseq), str(via), method)


class _Kind:
    """What both transaction sides derive from their request and transport."""

    request: SipRequest
    transport: str

    @property
    def is_invite(self) -> bool:
        return self.request.method == "INVITE"

    @property
    def reliable(self) -> bool:
        return self.transport in RELIABLE_TRANSPORTS


@dataclass(eq=False)
class ServerTransaction(_Kind):
    key: tuple[str, ...]
    request: SipRequest
    source: Address  # where responses go (RFC 3261 18.2.2)
    state: State
    transport: str = "UDP"
    last_response: bytes | None = None
    final_status: int = 0
    retransmit_interval: float = 0.0
    deadlines: dict[str, float] = field(default_factory=dict)
    merge_key: tuple[str, ...] | None = None

    def send(self, data: bytes) -> Send:
        return Send(data, self.source, self.transport)


@dataclass(eq=False)
class ClientTransaction(_Kind):
    key: tuple[str, ...]
    request: SipRequest
    data: bytes
    dest: Address
    transport: str = "UDP"
    state: State = State.TRYING
    response: SipResponse | None = None
    timed_out: bool = False
    retransmit_interval: float = 0.0
    deadlines: dict[str, float] = field(default_factory=dict)
    # Our ACK for an INVITE's final response: sent by the transaction for a non-2xx, by the
    # TU for a 2xx (kept here so a repeated 2xx gets the same ACK until Timer M).
    ack: bytes | None = None

    def send(self) -> Send:
        return Send(self.data, self.dest, self.transport)


class Incoming(enum.Enum):
    NEW = "new"  # a new request for the transaction user
    ABSORBED = "absorbed"  # a retransmission or an ACK for a non-2xx: handled here
    ACK = "ack"  # an ACK for a 2xx: it belongs to a dialog, not a transaction
    LOOP = "loop"  # a new request that looped back to us or merged with another: answer it 482


@dataclass
class PollResult:
    sends: list[Send] = field(default_factory=list)
    # INVITEs answered 2xx that never got an ACK (Timer H): the TU ends those calls.
    unacknowledged: list[ServerTransaction] = field(default_factory=list)
    # Our requests that got no final response in time (Timer F; Timer B for an INVITE).
    timed_out: list[ClientTransaction] = field(default_factory=list)


Transaction = ServerTransaction | ClientTransaction


class TransactionLayer:
    def __init__(self, timers: Timers = Timers(), heap: TimerHeap | None = None) -> None:
        """`heap`: shared with the transaction user's own timers; it then pops them and calls `fire`."""
        self.timers = timers
        self._server: dict[tuple[str, ...], ServerTransaction] = {}
        self._client: dict[tuple[str, ...], ClientTransaction] = {}
        self._merge: dict[tuple[str, ...], ServerTransaction] = {}
        self._outbox: list[Send] = []
        self.heap = heap if heap is not None else TimerHeap()

    # -- server side -------------------------------------------------------

    def on_request(
        self, request: SipRequest, source: Address, now: float, transport: str = "UDP"
    ) -> tuple[Incoming, ServerTransaction | None, list[Send]]:
        """Match a request to a server transaction (new, retransmission or ACK).

        `source` is where responses go: the address of RFC 3261 18.2.2 for UDP,
        the connection's remote address for TCP and TLS.
        """
        method = "INVITE" if request.method == "ACK" else request.method
        key = _server_key(request, method)
        tx = self._server.get(key)
        if request.method == "ACK":
            if tx is None or tx.state is State.ACCEPTED or tx.final_status < 300:
                return Incoming.ACK, tx, []
            if tx.state is State.COMPLETED:
                tx.state = State.CONFIRMED
                tx.deadlines.pop("G", None)
                tx.deadlines.pop("H", None)
                if tx.reliable:
                    self._terminate_server(tx)  # Timer I is zero
                else:
                    self._arm(tx, "I", now + self.timers.t4)
            return Incoming.ABSORBED, tx, []
        if tx is not None:
            resend = tx.last_response is not None and tx.state is not State.ACCEPTED
            sends = [tx.send(tx.last_response)] if resend and tx.last_response else []
            return Incoming.ABSORBED, tx, sends
        state = State.PROCEEDING if method == "INVITE" else State.TRYING
        tx = ServerTransaction(key, request, source, state, transport)
        self._server[key] = tx
        if self._looped(request):
            return Incoming.LOOP, tx, []
        tx.merge_key = _merge_key(request)
        if tx.merge_key is not None:
            if tx.merge_key in self._merge:
                tx.merge_key = None  # the first arrival keeps the entry
                return Incoming.LOOP, tx, []
            self._merge[tx.merge_key] = tx
        return Incoming.NEW, tx, []

    def _looped(self, request: SipRequest) -> bool:
        """A request that carries a Via of one of our own pending requests came back to us (8.2.2.2)."""
        for value in request.headers.get_all("Via"):
            via = parse_via(value)
            ours = self._client.get((via.branch or "", request.method))
            if ours is not None:
                sent = parse_via(ours.request.headers.get("Via") or "")
                if (sent.host, sent.port) == (via.host, via.port):
                    return True
        return False

    def find_invite(self, cancel: SipRequest) -> ServerTransaction | None:
        """The INVITE transaction a CANCEL refers to (same branch and sent-by)."""
        return self._server.get(_server_key(cancel, "INVITE"))

    def respond(self, tx: ServerTransaction, response: SipResponse, now: float) -> list[Send]:
        if tx.state in (State.COMPLETED, State.CONFIRMED, State.TERMINATED, State.ACCEPTED):
            return []  # a final response was already sent
        data = serialize(response)
        tx.last_response = data
        status = response.status
        if status >= 200:
            tx.final_status = status
            if not tx.is_invite:
                tx.state = State.COMPLETED
                if tx.reliable:
                    self._terminate_server(tx)  # Timer J is zero
                else:
                    self._arm(tx, "J", now + 64 * self.timers.t1)
            else:
                tx.state = State.ACCEPTED if status < 300 else State.COMPLETED
                tx.retransmit_interval = self.timers.t1
                if not tx.reliable:
                    self._arm(tx, "G", now + tx.retransmit_interval)
                self._arm(tx, "H", now + 64 * self.timers.t1)
        elif not tx.is_invite:
            tx.state = State.PROCEEDING
        return [tx.send(data)]

    def discard(self, tx: ServerTransaction) -> None:
        """Forget a request the TU drops unanswered (a retransmission then counts as new)."""
        self._terminate_server(tx)

    def acknowledged(self, tx: ServerTransaction, now: float) -> None:
        """The dialog saw the ACK for our 2xx: stop retransmitting it.

        The transaction lingers until Timer H so late INVITE retransmissions
        are still absorbed instead of looking like new calls (RFC 6026 Timer L).
        """
        if tx.state is State.ACCEPTED:
            tx.state = State.CONFIRMED
            tx.deadlines.pop("G", None)

    # -- client side (BYE, OPTIONS, REGISTER, UPDATE; INVITE with Timers A, B, D) ----

    def send_request(
        self, request: SipRequest, dest: Address, now: float, transport: str = "UDP"
    ) -> tuple[ClientTransaction, list[Send]]:
        via = parse_via(request.headers.get("Via") or "")
        key = (via.branch or "", request.method)
        data = serialize(request)
        state = State.CALLING if request.method == "INVITE" else State.TRYING
        tx = ClientTransaction(key, request, data, dest, transport, state)
        self._client[key] = tx
        tx.retransmit_interval = self.timers.t1
        retransmit, timeout = ("A", "B") if tx.is_invite else ("E", "F")
        if not tx.reliable:
            self._arm(tx, retransmit, now + tx.retransmit_interval)
        self._arm(tx, timeout, now + 64 * self.timers.t1)
        return tx, [tx.send()]

    def on_response(self, response: SipResponse, now: float) -> ClientTransaction | None:
        """Match a response; returns the transaction when its final response is for the TU.

        That is once per transaction, except for an INVITE's 2xx: each (retransmitted)
        2xx goes to the TU, which sends the ACK for it (RFC 6026 Accepted state).
        """
        tx = self.find_client(response)
        if tx is None:
            return None
        if tx.is_invite:
            return self._invite_response(tx, response, now)
        if tx.state is State.COMPLETED:
            return None
        if response.status < 200:
            tx.state = State.PROCEEDING
            return None
        tx.state = State.COMPLETED
        tx.response = response
        tx.deadlines.clear()
        if tx.reliable:
            self._terminate_client(tx)  # Timer K is zero
        else:
            self._arm(tx, "K", now + self.timers.t4)
        return tx

    def find_client(self, response: SipResponse) -> ClientTransaction | None:
        """The live client transaction a response belongs to (17.1.3: top Via branch and CSeq method)."""
        try:
            branch = parse_via(response.headers.get("Via") or "").branch or ""
            method = parse_cseq(response.headers.get("CSeq") or "")[1]
        except SipParseError:
            return None
        tx = self._client.get((branch, method))
        return None if tx is None or tx.state is State.TERMINATED else tx

    def _invite_response(self, tx: ClientTransaction, response: SipResponse, now: float) -> ClientTransaction | None:
        status = response.status
        if tx.state is State.COMPLETED:
            if status >= 300 and tx.ack is not None:
                self._outbox.append(Send(tx.ack, tx.dest, tx.transport))  # our ACK was lost: the final came again
            return None
        if tx.state is State.ACCEPTED:
            return tx if 200 <= status < 300 else None
        if status < 200:
            tx.state = State.PROCEEDING
            tx.deadlines.pop("A", None)
            tx.deadlines.pop("B", None)  # the peer is alive; from here the TU decides how long to wait
            return None
        tx.response = response
        tx.deadlines.clear()
        if status < 300:
            tx.state = State.ACCEPTED
            self._arm(tx, "M", now + 64 * self.timers.t1)
            return tx
        tx.state = State.COMPLETED
        tx.ack = serialize(_ack_for_error(tx.request, response))
        self._outbox.append(Send(tx.ack, tx.dest, tx.transport))
        if tx.reliable:
            self._terminate_client(tx)  # Timer D is zero
        else:
            self._arm(tx, "D", now + self.timers.d)
        return tx

    def take_sends(self) -> list[Send]:
        """What the layer decided to send while matching responses (ACKs for non-2xx finals)."""
        sends, self._outbox = self._outbox, []
        return sends

    # -- timers --------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self.heap.next_deadline()

    def poll(self, now: float) -> PollResult:
        result = PollResult()
        while (due := self.heap.pop_due(now)) is not None:
            tx, name = due
            assert isinstance(tx, (ServerTransaction, ClientTransaction))
            self.fire(tx, name, now, result)
        return result

    def fire(self, tx: Transaction, name: str, now: float, result: PollResult) -> None:
        """Timer `name` of `tx` is due (already disarmed): what it sends and ends goes into `result`."""
        if isinstance(tx, ServerTransaction):
            self._server_timer(tx, name, now, result)
        else:
            self._client_timer(tx, name, now, result)

    def _server_timer(self, tx: ServerTransaction, name: str, now: float, result: PollResult) -> None:
        if name == "G" and tx.last_response is not None:
            result.sends.append(tx.send(tx.last_response))
            tx.retransmit_interval = min(2 * tx.retransmit_interval, self.timers.t2)
            self._arm(tx, "G", now + tx.retransmit_interval)
        elif name == "H":
            if tx.state is State.ACCEPTED:
                result.unacknowledged.append(tx)
            self._terminate_server(tx)
        elif name in ("I", "J"):
            self._terminate_server(tx)

    def _client_timer(self, tx: ClientTransaction, name: str, now: float, result: PollResult) -> None:
        if name == "A":
            result.sends.append(tx.send())
            tx.retransmit_interval *= 2  # Timer A doubles without the T2 cap (17.1.1.2)
            self._arm(tx, "A", now + tx.retransmit_interval)
        elif name == "E":
            result.sends.append(tx.send())
            # In Proceeding the interval jumps to T2 (RFC 3261 17.1.2.2).
            doubled = 2 * tx.retransmit_interval if tx.state is State.TRYING else self.timers.t2
            tx.retransmit_interval = min(doubled, self.timers.t2)
            self._arm(tx, "E", now + tx.retransmit_interval)
        elif name in ("B", "F"):
            tx.timed_out = True
            tx.deadlines.clear()
            result.timed_out.append(tx)
            self._terminate_client(tx)
        elif name in ("D", "K", "M"):
            self._terminate_client(tx)

    def _arm(self, tx: Transaction, name: str, deadline: float) -> None:
        self.heap.arm(tx, name, deadline)

    def _terminate_server(self, tx: ServerTransaction) -> None:
        tx.state = State.TERMINATED
        tx.deadlines.clear()
        self._server.pop(tx.key, None)
        if tx.merge_key is not None and self._merge.get(tx.merge_key) is tx:
            del self._merge[tx.merge_key]

    def _terminate_client(self, tx: ClientTransaction) -> None:
        tx.state = State.TERMINATED
        self._client.pop(tx.key, None)

    @property
    def active(self) -> int:
        return len(self._server) + len(self._client)


def _ack_for_error(invite: SipRequest, response: SipResponse) -> SipRequest:
    """The ACK the transaction itself sends for a non-2xx final response (17.1.1.3)."""
    headers = Headers([("Via", invite.headers.get("Via") or "")])
    for name in ("Max-Forwards", "From"):
        value = invite.headers.get(name)
        if value is not None:
            headers.add(name, value)
    headers.add("To", response.headers.get("To") or invite.headers.get("To") or "")
    headers.add("Call-ID", invite.headers.get("Call-ID") or "")
    headers.add("CSeq", f"{parse_cseq(invite.headers.get('CSeq') or '')[0]} ACK")
    for route in invite.headers.get_all("Route"):
        headers.add("Route", route)
    return SipRequest("ACK", invite.uri, headers)
