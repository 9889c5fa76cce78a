"""A minimal SIP UAC for the bench: one call = INVITE with an SDP offer, ACK, then BYE.

Sans-I/O: `BenchCall` turns responses into datagrams to send and exposes the
state the generator acts on. Retransmission is a fixed interval (not RFC 3261
Timer A's doubling): on loopback a lost request only happens under overload,
and then a steady retry is what the bench wants to see.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass

from voiceline.codec_table import Codec, lookup
from voiceline.sip.message import (
    SipParseError,
    SipRequest,
    SipResponse,
    parse_cseq,
    parse_name_addr,
    response_to,
    serialize,
)
from voiceline.sip.sdp import SdpError, parse_sdp

RETRANSMIT_SECONDS = 1.0
MAX_TRANSMISSIONS = 7

EVENT_PAYLOAD_TYPE = 101


@dataclass(frozen=True)
class Scenario:
    """What every bench leg offers and sends: one audio codec, with or without telephone-event; or,
    when `transcoded_to` is set, the first leg of each pair this and the second that (the relay
    transcodes between them)."""

    name: str
    payload_type: int
    rtpmap: str  # encoding/clock as in a=rtpmap
    telephone_event: bool = True  # without it the server watches the audio for in-band DTMF
    transcoded_to: Scenario | None = None
    levels: tuple[int, ...] = ()  # its own pair counts in a side-by-side run at the default levels

    @property
    def codec(self) -> Codec:
        return lookup(self.rtpmap.partition("/")[0])

    def leg(self, second: bool) -> Scenario:
        """What the first or the second leg of a pair offers and sends."""
        return self.transcoded_to if second and self.transcoded_to is not None else self

    def offer(self, host: str, port: int) -> str:
        """An SDP offer of this scenario's media at `host`:`port`."""
        formats = f"{self.payload_type} {EVENT_PAYLOAD_TYPE}" if self.telephone_event else f"{self.payload_type}"
        event = (
            f"a=rtpmap:{EVENT_PAYLOAD_TYPE} telephone-event/8000\r\na=fmtp:{EVENT_PAYLOAD_TYPE} 0-16\r\n"
            if self.telephone_event
            else ""
        )
        return (
            f"v=0\r\no=bench {secrets.randbits(31)} 1 IN IP4 {host}\r\ns=bench\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP {formats}\r\na=rtpmap:{self.payload_type} {self.rtpmap}\r\n{event}"
            "a=ptime:20\r\na=sendrecv\r\n"
        )


PCMU_WITH_EVENTS = Scenario("pcmu", 0, "PCMU/8000")
OPUS_LEG = Scenario("opus", 96, "opus/48000/2")
# About 140 us of CPU per transcoded packet (most of it encoding Opus): some 70 pairs fill a core,
# so lower levels than the others.
PCMU_TO_OPUS = Scenario("pcmu-opus", 0, "PCMU/8000", transcoded_to=OPUS_LEG, levels=(50, 100))
SCENARIOS = {
    scenario.name: scenario
    for scenario in (
        PCMU_WITH_EVENTS,
        Scenario("pcmu-inband", 0, "PCMU/8000", telephone_event=False),
        Scenario("g722", 9, "G722/8000"),
        PCMU_TO_OPUS,
    )
}


class CallState(enum.Enum):
    INVITING = "inviting"
    ANSWERED = "answered"  # 200 OK received and ACKed: media flows
    FAILED = "failed"  # a final error, no answer, or a broken answer
    HANGING_UP = "hanging_up"
    ENDED = "ended"


class BenchCall:
    """One outgoing call from `local` (our SIP host, port) to the server, offering `scenario`'s media
    at `rtp_port`."""

    def __init__(
        self, local: tuple[str, int], server: tuple[str, int], rtp_port: int, scenario: Scenario = PCMU_WITH_EVENTS
    ) -> None:
        self.local = local
        self.server = server
        self.call_id = secrets.token_hex(10)
        self.state = CallState.INVITING
        self.remote_rtp: tuple[str, int] | None = None
        self.answered_at = 0.0
        self._from_tag = secrets.token_hex(4)
        self._to = f"<sip:voiceline@{server[0]}:{server[1]}>"
        self._target = f"sip:voiceline@{server[0]}:{server[1]}"
        self._cseq = 1
        self._rtp_port = rtp_port
        self._scenario = scenario
        self._pending = b""  # the request we retransmit until its final response
        self._transmissions = 0
        self._next_retransmit = 0.0
        self._ack = b""
        self._invite_branch = _new_branch()

    def invite(self, now: float) -> bytes:
        sdp = self._scenario.offer(self.local[0], self._rtp_port)
        return self._start(self._request("INVITE", self._invite_branch, "application/sdp", sdp), now)

    def hangup(self, now: float) -> bytes | None:
        """A BYE for an answered call; None (nothing to send) otherwise."""
        if self.state is not CallState.ANSWERED:
            self.state = CallState.ENDED if self.state is not CallState.INVITING else CallState.FAILED
            return None
        self.state = CallState.HANGING_UP
        self._cseq += 1
        return self._start(self._request("BYE", _new_branch()), now)

    def due(self, now: float) -> bytes | None:
        """The request to retransmit now, if any; gives up after MAX_TRANSMISSIONS."""
        if not self._pending or now < self._next_retransmit:
            return None
        if self._transmissions >= MAX_TRANSMISSIONS:
            self._pending = b""
            self.state = CallState.FAILED if self.state is CallState.INVITING else CallState.ENDED
            return None
        self._transmissions += 1
        self._next_retransmit = now + RETRANSMIT_SECONDS
        return self._pending

    def on_response(self, response: SipResponse, now: float) -> bytes | None:
        """Handle a response of this call; return an ACK to send, if any."""
        try:
            _, method = parse_cseq(response.headers.get("CSeq") or "")
        except SipParseError:
            return None
        if method == "BYE":
            if response.status >= 200 and self.state is CallState.HANGING_UP:
                self._pending = b""
                self.state = CallState.ENDED
            return None
        if method != "INVITE" or response.status < 200:
            return None
        to = response.headers.get("To") or ""
        if response.status >= 300:  # the ACK of a failure belongs to the INVITE transaction
            ack = self._ack_for_failure(to)
            if self.state is CallState.INVITING:
                self._pending = b""
                self.state = CallState.FAILED
            return ack
        if self.state is CallState.INVITING:
            self._pending = b""
            if not self._accept_answer(response, to):
                self.state = CallState.FAILED
                return None
            self.state = CallState.ANSWERED
            self.answered_at = now
            self._ack = self._request("ACK", _new_branch())
        return self._ack or None  # a retransmitted 200 gets the same ACK again

    def on_request(self, request: SipRequest) -> bytes:
        """The server's BYE (or anything else in the dialog): end the call and answer 200."""
        if request.method == "BYE":
            self.state = CallState.ENDED
            self._pending = b""
        return serialize(response_to(request, 200))

    def _accept_answer(self, response: SipResponse, to: str) -> bool:
        try:
            tag = parse_name_addr(to).tag
            contact = response.headers.get("Contact")
            answer = parse_sdp(response.body)
        except (SipParseError, SdpError):
            return False
        audio = next((media for media in answer.media if media.media == "audio" and media.port), None)
        host = (audio.connection if audio else None) or answer.connection
        if not tag or audio is None or host is None:
            return False
        self._to = f"{self._to};tag={tag}"
        if contact:
            self._target = parse_name_addr(contact).uri
        self.remote_rtp = (host, audio.port)
        return True

    def _ack_for_failure(self, to: str) -> bytes:
        return self._request("ACK", self._invite_branch, to=to)

    def _start(self, request: bytes, now: float) -> bytes:
        self._pending = request
        self._transmissions = 1
        self._next_retransmit = now + RETRANSMIT_SECONDS
        return request

    def _request(self, method: str, branch: str, content_type: str = "", body: str = "", to: str = "") -> bytes:
        host, port = self.local
        lines = [
            f"{method} {self._target} SIP/2.0",
            f"Via: SIP/2.0/UDP {host}:{port};branch={branch};rport",
            "Max-Forwards: 70",
            # Withheld: each generated call is a stranger to the others (no pseudonym shared, no rate).
            f"From: <sip:anonymous@{host}>;tag={self._from_tag}",
            f"To: {to or self._to}",
            f"Call-ID: {self.call_id}",
            f"CSeq: {1 if method == 'ACK' else self._cseq} {method}",  # an ACK takes its INVITE's number
            f"Contact: <sip:bench@{host}:{port}>",
        ]
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        lines.append(f"Content-Length: {len(body.encode())}")
        return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def _new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)
