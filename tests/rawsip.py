"""A bare UDP SIP peer for integration tests: sends hand-written messages, collects what comes back."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator

from voiceline.app import VoiceLine
from voiceline.config import Config
from voiceline.sip.message import SipMessage, SipParseError, SipRequest, SipResponse, parse_message, parse_name_addr

OFFER = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio {port} RTP/AVP {formats}\r\n"
    "a=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-16\r\na={direction}\r\n"
)


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[VoiceLine]:
    """The whole service, in this process, for the length of the block."""
    app = await VoiceLine.open(config)
    try:
        await app.start()
        yield app
    finally:
        await app.stop()


def address(app: VoiceLine) -> tuple[str, int]:
    """Where the running service takes SIP over UDP."""
    assert app.agent is not None and app.agent.transport is not None
    return app.agent.transport.local_address


def to_tag(response: SipResponse) -> str:
    return parse_name_addr(response.headers.get("To") or "").tag or ""


_numbers = itertools.count(1001)  # callers' numbers, one per Dialer unless a test names one

class RawPeer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.inbox: asyncio.Queue[SipMessage] = asyncio.Queue()
        self.raw: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, host: str = "127.0.0.1") -> RawPeer:
        loop = asyncio.get_running_loop()
        _, peer = await loop.create_datagram_endpoint(cls, local_addr=(host, 0))
        return peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.raw.append(data)
        try:
            self.inbox.put_nowait(parse_message(data))
        except SipParseError:
            pass  # e.g. a 400 that echoes the malformed header: tests read it from `raw`

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def send(self, data: bytes | str, dest: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data.encode() if isinstance(data, str) else data, dest)

    async def receive(self, timeout: float = 3.0) -> SipMessage:
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def response(self, status: int | None = None, method: str | None = None, timeout: float = 3.0) -> SipResponse:
        """The next response (optionally of a status and CSeq method), skipping others."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            message = await self.receive(max(0.01, end - loop.time()))
            if not isinstance(message, SipResponse):
                continue
            if status is not None and message.status != status:
                continue
            if method is not None and not (message.headers.get("CSeq") or "").endswith(method):
                continue
            return message

    async def request(self, method: str, timeout: float = 3.0) -> SipRequest:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            message = await self.receive(max(0.01, end - loop.time()))
            if isinstance(message, SipRequest) and message.method == method:
                return message

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Dialer:
    """Builds the requests of one call from a RawPeer."""

    def __init__(self, peer: RawPeer, server: tuple[str, int], from_user: str = "", to_user: str = "line") -> None:
        """`from_user`: the caller's number; by default a new one per dialer, since the service
        recognises a caller by it and never pairs a caller with itself."""
        self.peer = peer
        self.server = server
        self.to_user = to_user  # the dialled number: Request-URI and To user part
        self.call_id = secrets.token_hex(8)
        self.from_tag = secrets.token_hex(4)
        self.from_user = from_user or f"caller{next(_numbers)}"
        self.cseq = 1
        self.branch = ""
        self.to_tag = ""
        self.last_invite = b""
        self.contact_uri = ""  # the Contact our requests carry; empty: the peer's own address

    def _headers(self, method: str, branch: str, cseq: int, to_tag: str = "") -> str:
        to = f"<sip:{self.to_user}@{self.server[0]}:{self.server[1]}>" + (f";tag={to_tag}" if to_tag else "")
        return (
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.peer.port};branch={branch};rport\r\n"
            f"From: <sip:{self.from_user}@127.0.0.1>;tag={self.from_tag}\r\n"
            f"To: {to}\r\n"
            f"Call-ID: {self.call_id}\r\n"
            f"CSeq: {cseq} {method}\r\n"
            f"Contact: <{self.contact_uri or f'sip:{self.from_user}@127.0.0.1:{self.peer.port}'}>\r\n"
            "Max-Forwards: 70\r\n"
        )

    def invite(
        self, rtp_port: int | None, formats: str = "0 8 101", contact: bool = True, extra: str = ""
    ) -> None:
        """An INVITE with a fresh branch offering `rtp_port` (None: an offerless INVITE).

        `extra` is added header lines (CRLF-terminated).
        """
        self.branch = "z9hG4bK" + secrets.token_hex(6)
        body = OFFER.format(port=rtp_port, formats=formats, direction="sendrecv") if rtp_port is not None else ""
        headers = self._headers("INVITE", self.branch, self.cseq) + extra
        if not contact:
            headers = "".join(line + "\r\n" for line in headers.split("\r\n") if line and not line.startswith("Contact:"))
        text = (
            f"INVITE {self.request_uri} SIP/2.0\r\n"
            + headers
            + ("Content-Type: application/sdp\r\n" if body else "")
            + f"Content-Length: {len(body)}\r\n\r\n{body}"
        )
        self.last_invite = text.encode()
        self.peer.send(text, self.server)

    @property
    def request_uri(self) -> str:
        return f"sip:{self.to_user}@{self.server[0]}:{self.server[1]}"

    def resend_invite(self) -> None:
        """A retransmission: the very same bytes, same branch."""
        self.peer.send(self.last_invite, self.server)

    def ack(self, to_tag: str, for_error: bool = False, sdp_port: int | None = None, direction: str = "sendrecv") -> None:
        """ACK our last INVITE; with `sdp_port`, carrying the answer to an offer the server made."""
        self.to_tag = to_tag
        branch = self.branch if for_error else "z9hG4bK" + secrets.token_hex(6)
        body = OFFER.format(port=sdp_port, formats="0", direction=direction) if sdp_port is not None else ""
        kind = "Content-Type: application/sdp\r\n" if body else ""
        text = f"ACK {self.request_uri} SIP/2.0\r\n" + self._headers(
            "ACK", branch, self.cseq, to_tag
        ) + f"{kind}Content-Length: {len(body)}\r\n\r\n{body}"
        self.peer.send(text, self.server)

    def cancel(self) -> None:
        text = f"CANCEL {self.request_uri} SIP/2.0\r\n" + self._headers(
            "CANCEL", self.branch, self.cseq
        ) + "Content-Length: 0\r\n\r\n"
        self.peer.send(text, self.server)

    def in_dialog(
        self,
        method: str,
        sdp_port: int | None = None,
        cseq: int | None = None,
        direction: str = "sendrecv",
        body: str = "",
        content_type: str = "",
        extra: str = "",
    ) -> None:
        """A request inside the dialog; with `sdp_port`, carrying an SDP offer (a re-INVITE or UPDATE)
        in `direction`; or any other `body` of `content_type`. `extra` adds header lines."""
        self.cseq = cseq if cseq is not None else self.cseq + 1
        if method == "INVITE":
            self.branch = "z9hG4bK" + secrets.token_hex(6)
        branch = self.branch if method == "INVITE" else "z9hG4bK" + secrets.token_hex(6)
        if sdp_port is not None:
            body, content_type = OFFER.format(port=sdp_port, formats="0 8 101", direction=direction), "application/sdp"
        kind = f"Content-Type: {content_type}\r\n" if body else ""
        text = f"{method} sip:voiceline@{self.server[0]}:{self.server[1]} SIP/2.0\r\n" + self._headers(
            method, branch, self.cseq, self.to_tag
        ) + f"{extra}{kind}Content-Length: {len(body)}\r\n\r\n{body}"
        self.peer.send(text, self.server)

    def out_of_dialog(self, method: str) -> None:
        branch = "z9hG4bK" + secrets.token_hex(6)
        text = f"{method} {self.request_uri} SIP/2.0\r\n" + self._headers(
            method, branch, self.cseq
        ) + "Content-Length: 0\r\n\r\n"
        self.peer.send(text, self.server)
