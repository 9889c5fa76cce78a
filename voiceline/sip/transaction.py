"""Sans-I/O SIP transactions (RFC 3261 section 17, RFC 6026 for accepted INVITEs).

The layer is fed parsed messages and the current time and returns what to send;
it never touches a socket or a clock itself. `next_deadline()` tells the I/O
edge when to call `poll()`, so tests drive every timer with a fake clock.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import secrets
from dataclasses import dataclass, field

from voiceline.sip.message import (
    SipParseError,
    SipRequest,
    SipResponse,
    parse_cseq,
    parse_name_addr,
    parse_via,
    serialize,
)

Address = tuple[str, int]
MAGIC_COOKIE = "z9hG4bK"


@dataclass(frozen=True)
class Timers:
    """RFC 3261 timer base values in seconds (T1 RTT estimate, T2 cap, T4 network lifetime)."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0


@dataclass(frozen=True)
class Send:
    data: bytes
    dest: Address


class State(enum.Enum):
    TRYING = "trying"
    PROCEEDING = "proceeding"
    ACCEPTED = "accepted"  # INVITE answered 2xx, waiting for the ACK (RFC 6026)
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


def new_branch() -> str:
    return MAGIC_COOKIE + secrets.token_hex(8)


def _server_key(request: SipRequest, method: str) -> tuple[str, ...]:
    """Matching key of RFC 3261 17.2.3, with the RFC 2543 fallback for old peers."""
    via = parse_via(request.headers.get("Via") or "")
    branch = via.branch or ""
    if branch.startswith(MAGIC_COOKIE):
        return (branch, via.host, str(via.port or ""), method)
    from_tag = parse_name_addr(request.headers.get("From") or "").tag or ""
    cseq = parse_cseq(request.headers.get("CSeq") or "")[0]
    return ("2543", request.headers.get("Call-ID") or "", from_tag, str(cseq), str(via), method)


@dataclass(eq=False)
class ServerTransaction:
    key: tuple[str, ...]
    request: SipRequest
    source: Address
    state: State
    last_response: bytes | None = None
    final_status: int = 0
    retransmit_interval: float = 0.0
    deadlines: dict[str, float] = field(default_factory=dict)

    @property
    def is_invite(self) -> bool:
        return self.request.method == "INVITE"


@dataclass(eq=False)
class ClientTransaction:
    key: tuple[str, ...]
    request: SipRequest
    data: bytes
    dest: Address
    state: State = State.TRYING
    response: SipResponse | None = None
    timed_out: bool = False
    retransmit_interval: float = 0.0
    deadlines: dict[str, float] = field(default_factory=dict)


class Incoming(enum.Enum):
    NEW = "new"  # a new request for the transaction user
    ABSORBED = "absorbed"  # a retransmission or an ACK for a non-2xx: handled here
    ACK = "ack"  # an ACK for a 2xx: it belongs to a dialog, not a transaction


@dataclass
class PollResult:
    sends: list[Send] = field(default_factory=list)
    # INVITEs answered 2xx that never got an ACK (Timer H): the TU ends those calls.
    unacknowledged: list[ServerTransaction] = field(default_factory=list)
    # Our requests that got no final response in time (Timer F).
    timed_out: list[ClientTransaction] = field(default_factory=list)


Transaction = ServerTransaction | ClientTransaction


class TransactionLayer:
    def __init__(self, timers: Timers = Timers()) -> None:
        self.timers = timers
        self._server: dict[tuple[str, ...], ServerTransaction] = {}
        self._client: dict[tuple[str, ...], ClientTransaction] = {}
        self._heap: list[tuple[float, int, str, Transaction]] = []
        self._order = itertools.count()

    # -- server side -------------------------------------------------------

    def on_request(self, request: SipRequest, source: Address, now: float) -> tuple[Incoming, ServerTransaction | None, list[Send]]:
        """Match a request to a server transaction (new, retransmission or ACK)."""
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
                self._arm(tx, "I", now + self.timers.t4)
            return Incoming.ABSORBED, tx, []
        if tx is not None:
            resend = tx.last_response is not None and tx.state is not State.ACCEPTED
            sends = [Send(tx.last_response, tx.source)] if resend and tx.last_response else []
            return Incoming.ABSORBED, tx, sends
        tx = ServerTransaction(key, request, source, State.PROCEEDING if method == "INVITE" else State.TRYING)
        self._server[key] = tx
        return Incoming.NEW, tx, []

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
                self._arm(tx, "J", now + 64 * self.timers.t1)
            else:
                tx.state = State.ACCEPTED if status < 300 else State.COMPLETED
                tx.retransmit_interval = self.timers.t1
                self._arm(tx, "G", now + tx.retransmit_interval)
                self._arm(tx, "H", now + 64 * self.timers.t1)
        elif not tx.is_invite:
            tx.state = State.PROCEEDING
        return [Send(data, tx.source)]

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

    # -- client side (non-INVITE: BYE, OPTIONS, REGISTER) --------------------

    def send_request(self, request: SipRequest, dest: Address, now: float) -> tuple[ClientTransaction, list[Send]]:
        via = parse_via(request.headers.get("Via") or "")
        key = (via.branch or "", request.method)
        data = serialize(request)
        tx = ClientTransaction(key, request, data, dest)
        self._client[key] = tx
        tx.retransmit_interval = self.timers.t1
        self._arm(tx, "E", now + tx.retransmit_interval)
        self._arm(tx, "F", now + 64 * self.timers.t1)
        return tx, [Send(data, dest)]

    def on_response(self, response: SipResponse, now: float) -> ClientTransaction | None:
        """Match a response; returns the transaction when it just got its final response."""
        try:
            branch = parse_via(response.headers.get("Via") or "").branch or ""
            method = parse_cseq(response.headers.get("CSeq") or "")[1]
        except SipParseError:
            return None
        tx = self._client.get((branch, method))
        if tx is None or tx.state in (State.COMPLETED, State.TERMINATED):
            return None
        if response.status < 200:
            tx.state = State.PROCEEDING
            return None
        tx.state = State.COMPLETED
        tx.response = response
        tx.deadlines.clear()
        self._arm(tx, "K", now + self.timers.t4)
        return tx

    # -- timers --------------------------------------------------------------

    def next_deadline(self) -> float | None:
        while self._heap:
            deadline, _, name, tx = self._heap[0]
            if tx.deadlines.get(name) == deadline:
                return deadline
            heapq.heappop(self._heap)  # stale entry: that timer was re-armed or cancelled
        return None

    def poll(self, now: float) -> PollResult:
        result = PollResult()
        while (deadline := self.next_deadline()) is not None and deadline <= now:
            _, _, name, tx = heapq.heappop(self._heap)
            del tx.deadlines[name]
            if isinstance(tx, ServerTransaction):
                self._server_timer(tx, name, now, result)
            else:
                self._client_timer(tx, name, now, result)
        return result

    def _server_timer(self, tx: ServerTransaction, name: str, now: float, result: PollResult) -> None:
        if name == "G" and tx.last_response is not None:
            result.sends.append(Send(tx.last_response, tx.source))
            tx.retransmit_interval = min(2 * tx.retransmit_interval, self.timers.t2)
            self._arm(tx, "G", now + tx.retransmit_interval)
        elif name == "H":
            if tx.state is State.ACCEPTED:
                result.unacknowledged.append(tx)
            self._terminate_server(tx)
        elif name in ("I", "J"):
            self._terminate_server(tx)

    def _client_timer(self, tx: ClientTransaction, name: str, now: float, result: PollResult) -> None:
        if name == "E":
            result.sends.append(Send(tx.data, tx.dest))
            # In Proceeding the interval jumps to T2 (RFC 3261 17.1.2.2).
            doubled = 2 * tx.retransmit_interval if tx.state is State.TRYING else self.timers.t2
            tx.retransmit_interval = min(doubled, self.timers.t2)
            self._arm(tx, "E", now + tx.retransmit_interval)
        elif name == "F":
            tx.timed_out = True
            tx.deadlines.clear()
            result.timed_out.append(tx)
            self._terminate_client(tx)
        elif name == "K":
            self._terminate_client(tx)

    def _arm(self, tx: Transaction, name: str, deadline: float) -> None:
        tx.deadlines[name] = deadline
        heapq.heappush(self._heap, (deadline, next(self._order), name, tx))

    def _terminate_server(self, tx: ServerTransaction) -> None:
        tx.state = State.TERMINATED
        tx.deadlines.clear()
        self._server.pop(tx.key, None)

    def _terminate_client(self, tx: ClientTransaction) -> None:
        tx.state = State.TERMINATED
        self._client.pop(tx.key, None)

    @property
    def active(self) -> int:
        return len(self._server) + len(self._client)
