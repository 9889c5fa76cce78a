"""What a call does with each event in each state: two tables, read and reviewed here, used by the call core.

`PHASES` is the call's life: an inbound call is OFFERED (the app decides), RINGING
(accepted, 180 sent, answered when the answer delay is over), ANSWERED (our 200
out, waiting for the ACK), then CONFIRMED; an outbound call is CALLING (our
INVITE out), PROCEEDING (a 1xx came) or CANCELLING, then CONFIRMED. Both end
in ENDED. `EXCHANGES` is the SDP exchange or INVITE under way inside a call:
it decides glare (RFC 3261 14, RFC 3311 5.2) for the peer's re-INVITEs and
UPDATEs and whether we may start a session refresh.

A cell is the next state, `=` (the state stays), or a SIP status: the peer's
request is refused with it and nothing changes. Each table names every event
for every state, so there is no implicit case. What is sent on a transition
(a 180, a 200, an ACK, a BYE) is the core's, next to the event's handling.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeVar


class CallState(enum.Enum):
    OFFERED = "offered"  # inbound: INVITE received, the app decides
    RINGING = "ringing"  # inbound: accepted, 180 sent, 200 after the answer delay
    ANSWERED = "answered"  # inbound: our 200 sent, waiting for the ACK
    CALLING = "calling"  # outbound: our INVITE sent, nothing heard
    PROCEEDING = "proceeding"  # outbound: a provisional response came
    CANCELLING = "cancelling"  # outbound: our CANCEL sent, waiting for the INVITE's final response
    CONFIRMED = "confirmed"  # media flows
    ENDED = "ended"


class CallEvent(enum.Enum):
    ACCEPT = "accept"  # the app accepted the offered call (local RTP port known)
    REJECT = "reject"  # the app refused it with a status
    ANSWER_DUE = "answer_due"  # the answer delay is over
    HANGUP = "hangup"  # we end the call (app, maximum duration, session expiry, shutdown)
    ACK = "ack"  # the peer's ACK for our 2xx
    BYE = "bye"
    CANCEL = "cancel"  # the peer cancels its INVITE
    REINVITE = "reinvite"
    UPDATE = "update"
    INFO = "info"
    NOTIFY = "notify"  # the peer's NOTIFY of a REFER's progress (RFC 3515)
    PROVISIONAL = "provisional"  # a 1xx to our INVITE
    SUCCESS = "success"  # a 2xx to our INVITE (each retransmission too)
    FAILURE = "failure"  # a final error to our INVITE (after any authentication retry)
    NO_RESPONSE = "no_response"  # Timer B: our INVITE got no final response
    ACK_TIMEOUT = "ack_timeout"  # Timer H: our 2xx was never ACKed


_PHASES = """
            accept   reject  answer_due  hangup      ack        bye    cancel  reinvite   update     info       notify     provisional  success    failure  no_response  ack_timeout
offered     ringing  ended   =           ended       =          ended  ended   491        491        =          =          =            =          =        =            =
ringing     =        =       answered    ended       =          ended  ended   491        491        =          =          =            =          =        =            =
answered    =        =       =           ended       confirmed  ended  =       =          =          =          =          =            =          =        =            ended
calling     =        =       =           cancelling  =          481    =       481        481        481        481        proceeding   confirmed  ended    ended        =
proceeding  =        =       =           cancelling  =          481    =       481        481        481        481        =            confirmed  ended    ended        =
cancelling  =        =       =           =           =          481    =       481        481        481        481        =            ended      ended    ended        =
confirmed   =        =       =           ended       =          ended  =       =          =          =          =          =            =          =        =            ended
ended       =        =       =           =           =          481    =       481        481        481        481        =            =          =        =            =
"""


class Exchange(enum.Enum):
    IDLE = "idle"
    AWAITING_ACK = "awaiting_ack"  # our 2xx answered the peer's INVITE offer; its ACK is due
    AWAITING_ANSWER = "awaiting_answer"  # our 2xx to an offerless INVITE offered; its ACK brings the answer
    OUR_INVITE = "our_invite"  # our INVITE (first or refresh), with our offer, waits for its final response


class ExchangeEvent(enum.Enum):
    INVITE_OFFER = "invite_offer"  # the peer's (re-)INVITE with an offer, answered 2xx
    INVITE = "invite"  # the peer's (re-)INVITE without an offer: our 2xx offers
    UPDATE_OFFER = "update_offer"
    UPDATE = "update"  # an UPDATE without an offer: a session refresh only
    ACK = "ack"
    SEND_INVITE = "send_invite"  # we want to send a re-INVITE (session refresh)
    SEND_UPDATE = "send_update"  # we want to send an UPDATE without an offer (session refresh)
    INVITE_DONE = "invite_done"  # our INVITE got its final response


_EXCHANGES = """
                 invite_offer  invite           update_offer  update  ack   send_invite  send_update  invite_done
idle             awaiting_ack  awaiting_answer  =             =       =     our_invite   =            =
awaiting_ack     491           491              =             =       idle  491          491          =
awaiting_answer  491           491              491           =       idle  491          491          =
our_invite       491           491              491           =       =     491          491          idle
"""


@dataclass(frozen=True)
class Refusal:
    """The event is refused with `status` (for our own SEND_INVITE: not now, retry later)."""

    status: int


S = TypeVar("S", CallState, Exchange)
E = TypeVar("E", CallEvent, ExchangeEvent)


def _parse(text: str, states: type[S], events: type[E]) -> dict[tuple[S, E], S | Refusal | None]:
    """The grid as a dict; None for `=` (the state stays). Fails on import when a row misses an event."""
    header, *rows = (line.split() for line in text.strip().splitlines())
    table: dict[tuple[S, E], S | Refusal | None] = {}
    for state_name, *cells in rows:
        for event_name, cell in zip(header, cells, strict=True):
            outcome: S | Refusal | None = None
            if cell.isdigit():
                outcome = Refusal(int(cell))
            elif cell != "=":
                outcome = states(cell)
            table[(states(state_name), events(event_name))] = outcome
    return table


PHASES = _parse(_PHASES, CallState, CallEvent)
EXCHANGES = _parse(_EXCHANGES, Exchange, ExchangeEvent)


def next_phase(state: CallState, event: CallEvent) -> CallState | Refusal:
    """The call's state after `event`, or the refusal of the peer's request."""
    outcome = PHASES[(state, event)]
    return state if outcome is None else outcome


def next_exchange(state: Exchange, event: ExchangeEvent) -> Exchange | Refusal:
    outcome = EXCHANGES[(state, event)]
    return state if outcome is None else outcome
