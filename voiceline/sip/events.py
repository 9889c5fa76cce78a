"""What the call core reports, and what the app sees of a call: ids and media facts, never a dialog.

These frozen types are all that leaves `voiceline.sip` about a call, so the
caller's URI (held by the dialog, inside sip) cannot reach the app, a log line
or a record by way of a call's events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from voiceline.codec_table import Codec
from voiceline.sip.message import SipResponse
from voiceline.sip.transaction import ClientTransaction
from voiceline.sip.transport import Address


@dataclass(frozen=True)
class SdesKeys:
    """A call's SRTP master keys (key || salt): ours for what we send, the peer's for what it sends."""

    suite: str
    send_key: bytes = field(repr=False)
    receive_key: bytes = field(repr=False)


@dataclass(frozen=True)
class CallMedia:
    """The negotiated audio, as the media leg needs it."""

    codec: Codec
    payload_type: int
    telephone_event_pt: int | None
    remote: Address
    direction: str
    on_hold: bool  # the peer asked us not to send (sendonly or inactive)
    srtp: SdesKeys | None


@dataclass(frozen=True)
class CallInfo:
    """One call as the app sees it: no dialog, no party's URI."""

    id: str
    outbound: bool
    trunk: str  # "" without an admission policy or for an outbound call placed without one
    line: str
    signalling_host: str  # the peer's signalling address: its RTP may come from there too (NAT)
    local_rtp_port: int
    media: CallMedia | None  # None until an offerless INVITE's ACK brought the answer
    # Who is calling, as a keyed pseudonym (sip.identity): hex, "" for an outbound call; never logged.
    pseudonym: str = field(default="", repr=False)
    key_epoch: int = 0  # the pseudonym key it was made under: pseudonyms of one epoch compare
    withheld: bool = False  # no usable identity: the pseudonym is fresh for this call


@dataclass(frozen=True)
class CallOffered:
    """Answer with `accept(call.id, local_rtp_port)` or `reject(call.id, status)`."""

    call: CallInfo


@dataclass(frozen=True)
class CallConfirmed:
    """An inbound call's ACK came: media flows."""

    call: CallInfo


@dataclass(frozen=True)
class MediaChanged:
    """A re-INVITE or UPDATE changed the direction, the remote address or the SRTP key."""

    call: CallInfo


@dataclass(frozen=True)
class Dtmf:
    """A digit sent by SIP INFO (application/dtmf-relay or application/dtmf)."""

    call: CallInfo
    digit: str


@dataclass(frozen=True)
class CallEnded:
    """A call the app accepted (or an outbound call that was answered) is over."""

    call: CallInfo
    reason: str


@dataclass(frozen=True)
class Ringing:
    """Our INVITE got a provisional response."""

    call_id: str
    status: int


@dataclass(frozen=True)
class Answered:
    """Our INVITE was answered (and ACKed): `call.media` holds what the remote SDP negotiated."""

    call: CallInfo


@dataclass(frozen=True)
class Refused:
    """Our INVITE got a final error (after any authentication retry)."""

    call_id: str
    status: int


@dataclass(frozen=True)
class Cancelled:
    """We cancelled our INVITE before it was answered (or ended it right after a late 2xx)."""

    call_id: str


@dataclass(frozen=True)
class TimedOut:
    """Our INVITE got no final response (Timer B), or rang longer than its ring timeout."""

    call_id: str


@dataclass(frozen=True)
class TransferProgress:
    """Our REFER was accepted (202), or the peer reports a provisional status of the call it places."""

    call_id: str
    status: int


@dataclass(frozen=True)
class Transferred:
    """The peer reports the call it placed for our REFER answered: hang ours up when done with it."""

    call_id: str


@dataclass(frozen=True)
class TransferFailed:
    """Our REFER was refused, or the call it asked for failed (the reported status), or timed out (408)."""

    call_id: str
    status: int


@dataclass(frozen=True)
class RequestDone:
    """The final response to a request sent with `send_request`; None when none came in time (Timer F)."""

    request: ClientTransaction
    response: SipResponse | None


Event = (
    CallOffered | CallConfirmed | MediaChanged | Dtmf | CallEnded
    | Ringing | Answered | Refused | Cancelled | TimedOut | RequestDone
    | TransferProgress | Transferred | TransferFailed
)  # fmt: skip
