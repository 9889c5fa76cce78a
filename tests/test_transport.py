"""SIP transports: stream framing (sans-I/O), reliable-transport timers, and the real service over TCP and UDP."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import secrets
import socket
import ssl
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from port_table import port_ranges
from rawsip import OFFER, RawPeer, serving
from waiting import until
from voiceline.app import VoiceLine
from voiceline.config import Config, ConfigError, MediaConfig, SipConfig, StorageConfig
from voiceline.sip.message import SipRequest, SipResponse, parse_message, parse_name_addr, parse_via
from voiceline.sip.transaction import Incoming, State, TransactionLayer
from voiceline.sim.plugin import self_signed_certificate
from voiceline.sip.transport import (
    PING,
    FramingError,
    StreamFramer,
    StreamLimits,
    TlsListener,
    open_transports,
    server_tls_context,
)

pytestmark = pytest.mark.integration

# --- stream framing ---------------------------------------------------------------------


def message(method: str = "OPTIONS", body: bytes = b"", compact: bool = False) -> bytes:
    length = "l" if compact else "Content-Length"
    head = (
        f"{method} sip:line@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bK{secrets.token_hex(4)}\r\n"
        f"Call-ID: {secrets.token_hex(4)}\r\nCSeq: 1 {method}\r\n{length}: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def test_coalesced_messages_come_out_one_by_one() -> None:
    first, second = message(body=b"v=0\r\n"), message("INVITE", body=b"x" * 300, compact=True)
    assert StreamFramer(65535).feed(first + second) == [first, second]


def test_a_message_split_into_single_bytes_comes_out_once_complete() -> None:
    framer = StreamFramer(65535)
    whole = message(body=b"0123456789")
    out = [framer.feed(whole[i : i + 1]) for i in range(len(whole))]
    assert out[:-1] == [[]] * (len(whole) - 1) and out[-1] == [whole]


@given(st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=30), st.integers(0, 3))
def test_any_split_of_a_stream_gives_the_same_messages(cuts: list[int], count: int) -> None:
    messages = [message(body=bytes(range(n % 256)) * 2) for n in range(count + 1)]
    stream = b"\r\n".join(messages)  # single CRLFs between messages are skipped
    framer, out, position = StreamFramer(65535), [], 0
    for cut in cuts:
        out += framer.feed(stream[position : position + cut])
        position += cut
    out += framer.feed(stream[position:])
    assert out == messages


def test_double_crlf_is_a_keepalive_ping_even_when_split() -> None:
    framer = StreamFramer(65535)
    assert framer.feed(b"\r\n") == []
    assert framer.feed(b"\r\n") == [PING]
    whole = message()
    assert framer.feed(b"\r\n" + whole) == [whole]  # a lone CRLF before a message is skipped


@pytest.mark.parametrize(
    "head",
    [
        b"OPTIONS sip:a@127.0.0.1 SIP/2.0\r\nCSeq: 1 OPTIONS\r\n\r\n",  # no Content-Length
        b"OPTIONS sip:a@127.0.0.1 SIP/2.0\r\nContent-Length: ten\r\n\r\n",
        b"OPTIONS sip:a@127.0.0.1 SIP/2.0\r\nContent-Length: -1\r\n\r\n",
        b"OPTIONS sip:a@127.0.0.1 SIP/2.0\r\nContent-Length: 1\r\nl: 2\r\n\r\nxx",  # two different values
        b"OPTIONS sip:a@127.0.0.1 SIP/2.0\r\nContent-Length: 1234567890\r\n\r\n",
    ],
)
def test_a_missing_or_bad_content_length_is_a_framing_error(head: bytes) -> None:
    with pytest.raises(FramingError):
        StreamFramer(65535).feed(head)


def test_oversize_messages_are_framing_errors_and_the_buffer_stays_bounded() -> None:
    with pytest.raises(FramingError):  # declared too large: refused before the body arrives
        StreamFramer(2048).feed(message(body=b"x" * 3000)[:200])
    framer = StreamFramer(2048)
    with pytest.raises(FramingError):  # headers that never end
        for _ in range(100):
            framer.feed(b"X-Filler: " + b"y" * 50 + b"\r\n")
    assert len(framer._buffer) < 2048 + 100


# --- reliable transports: timers of RFC 3261 17 ------------------------------------------------


def request(method: str, transport: str = "TCP") -> bytes:
    return (
        f"{method} sip:line@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/{transport} 127.0.0.1:5070;branch=z9hG4bK{secrets.token_hex(4)}\r\n"
        f"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:line@127.0.0.1>\r\nCall-ID: {secrets.token_hex(4)}\r\n"
        f"CSeq: 1 {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def from_bytes(data: bytes) -> SipRequest:
    parsed = parse_message(data)
    assert isinstance(parsed, SipRequest)
    return parsed


@pytest.mark.parametrize("transport", ["UDP", "TCP"])
def test_non_invite_server_transaction_lingers_only_on_udp(transport: str) -> None:
    layer = TransactionLayer()
    req = from_bytes(request("OPTIONS", transport))
    kind, tx, _ = layer.on_request(req, ("127.0.0.1", 5070), 0.0, transport)
    assert kind is Incoming.NEW and tx is not None and tx.reliable == (transport == "TCP")
    (send,) = layer.respond(tx, SipResponse(200, "OK", req.headers.copy()), 0.0)
    assert send.transport == transport
    if transport == "TCP":  # Timer J is zero
        assert tx.state is State.TERMINATED and layer.active == 0 and layer.next_deadline() is None
    else:
        assert layer.next_deadline() == pytest.approx(32.0)


@pytest.mark.parametrize("status", [200, 486])
def test_invite_final_is_not_retransmitted_over_tcp_but_timer_h_runs(status: int) -> None:
    layer = TransactionLayer()
    req = from_bytes(request("INVITE"))
    _, tx, _ = layer.on_request(req, ("127.0.0.1", 5070), 0.0, "TCP")
    assert tx is not None
    layer.respond(tx, SipResponse(status, "X", req.headers.copy()), 0.0)
    assert layer.next_deadline() == pytest.approx(32.0)  # only Timer H: no Timer G
    result = layer.poll(31.9)
    assert result.sends == []
    result = layer.poll(32.0)
    assert result.sends == [] and result.unacknowledged == ([tx] if status == 200 else [])
    assert layer.active == 0


def test_ack_for_an_error_over_tcp_ends_the_transaction_at_once() -> None:
    layer = TransactionLayer()
    req = from_bytes(request("INVITE"))
    _, tx, _ = layer.on_request(req, ("127.0.0.1", 5070), 0.0, "TCP")
    assert tx is not None
    layer.respond(tx, SipResponse(486, "Busy", req.headers.copy()), 0.0)
    ack = from_bytes(request("INVITE").replace(b"INVITE", b"ACK"))
    ack.headers.set("Via", req.headers.get("Via") or "")
    ack.headers.set("Call-ID", req.headers.get("Call-ID") or "")
    kind, _, _ = layer.on_request(ack, ("127.0.0.1", 5070), 1.0, "TCP")
    assert kind is Incoming.ABSORBED and tx.state is State.TERMINATED and layer.next_deadline() is None


def test_client_transaction_over_tcp_has_no_timer_e_and_no_timer_k() -> None:
    layer = TransactionLayer()
    req = from_bytes(request("BYE"))
    tx, sends = layer.send_request(req, ("127.0.0.1", 5070), 0.0, "TCP")
    assert [s.transport for s in sends] == ["TCP"]
    assert layer.next_deadline() == pytest.approx(32.0)  # Timer F only
    assert layer.poll(10.0).sends == []
    assert layer.on_response(SipResponse(200, "OK", req.headers.copy()), 11.0) is tx
    assert tx.state is State.TERMINATED and layer.active == 0
    # Timer F still ends a request that is never answered.
    tx2, _ = layer.send_request(from_bytes(request("BYE")), ("127.0.0.1", 5070), 0.0, "TCP")
    assert layer.poll(32.0).timed_out == [tx2]


# --- the real service ---------------------------------------------------------------------

_rtp_blocks = port_ranges("test_transport", 20)  # this file's RTP ports
SILENT_RTP, _ = next(_rtp_blocks)  # offered in SDP: nothing listens there


def running(tmp_path: Path, **sip: object) -> contextlib.AbstractAsyncContextManager[VoiceLine]:
    low, high = next(_rtp_blocks)
    config = Config(
        # shutdown_timeout: stopping waits 1 s, not 4 s, for answers to BYEs the raw peers never give.
        sip=replace(SipConfig(listen="127.0.0.1:0", answer_delay=0.05, shutdown_timeout=1.0), **sip),  # type: ignore[arg-type]
        media=MediaConfig(rtp_ports=f"{low}-{high}"),
        storage=StorageConfig(data_dir=str(tmp_path / "data")),
    ).validate()
    return serving(config)


def port_of(app: VoiceLine, name: str) -> int:
    assert app.agent is not None
    return app.agent.transports[name].local_address[1]


class TcpPeer:
    """A bare SIP-over-TCP client: one connection, framed with the server's own framer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.framer = StreamFramer(1 << 20)
        self.pending: list[bytes] = []
        self.port = writer.get_extra_info("sockname")[1]

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> TcpPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(host, 0))
        return cls(reader, writer)

    def send(self, data: bytes | str) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)

    async def receive(self, timeout: float = 3.0) -> bytes:
        """The next framed message (or PING reply bytes); b"" once the server closed the connection."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not self.pending:
            chunk = await asyncio.wait_for(self.reader.read(65536), max(0.01, end - loop.time()))
            if not chunk:
                return b""
            if chunk == b"\r\n":
                return chunk
            self.pending += self.framer.feed(chunk)
        return self.pending.pop(0)

    async def response(self, timeout: float = 3.0) -> SipResponse:
        data = await self.receive(timeout)
        parsed = parse_message(data)
        assert isinstance(parsed, SipResponse)
        return parsed

    async def closed_by_server(self, timeout: float = 3.0) -> bool:
        try:
            while (await self.receive(timeout)) != b"":
                pass
        except (asyncio.TimeoutError, ConnectionError):
            return False
        return True

    def close(self) -> None:
        self.writer.close()


def tcp_request(method: str, peer_port: int, server_port: int, call_id: str = "", cseq: int = 1,
                body: str = "", to_tag: str = "", branch: str = "") -> str:
    to = f"<sip:line@127.0.0.1:{server_port}>" + (f";tag={to_tag}" if to_tag else "")
    kind = "Content-Type: application/sdp\r\n" if body else ""
    return (
        f"{method} sip:line@127.0.0.1:{server_port};transport=tcp SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP 127.0.0.1:{peer_port};branch={branch or 'z9hG4bK' + secrets.token_hex(6)};rport\r\n"
        f"From: <sip:anon@127.0.0.1>;tag=abc\r\nTo: {to}\r\nCall-ID: {call_id or secrets.token_hex(6)}\r\n"
        f"CSeq: {cseq} {method}\r\nContact: <sip:anon@127.0.0.1:{peer_port};transport=tcp>\r\n"
        f"Max-Forwards: 70\r\n{kind}Content-Length: {len(body.encode())}\r\n\r\n{body}"
    )


async def test_a_call_over_tcp_uses_one_connection_both_ways(tmp_path: Path) -> None:
    async with running(tmp_path) as app:
        port = port_of(app, "TCP")
        assert port == port_of(app, "UDP")  # one port for UDP and TCP
        peer = await TcpPeer.connect(port)
        call_id = secrets.token_hex(6)
        peer.send(tcp_request("INVITE", peer.port, port, call_id, body=OFFER.format(port=SILENT_RTP, formats="0", direction="sendrecv")))
        statuses = []
        while not statuses or statuses[-1] < 200:
            response = await peer.response()
            statuses.append(response.status)
        assert statuses == [100, 180, 200]
        contact = parse_name_addr(response.headers.get("Contact") or "").uri
        assert contact.endswith(f":{port};transport=tcp")
        via = parse_via(response.headers.get("Via") or "")
        assert via.params["rport"] == str(peer.port)  # RFC 3581 over TCP too
        to_tag = parse_name_addr(response.headers.get("To") or "").tag or ""
        peer.send(tcp_request("ACK", peer.port, port, call_id, to_tag=to_tag))
        await until(lambda: app.agent and app.agent.core.calls and app.agent.core.calls[0].state.value == "confirmed")
        # Our BYE goes back over the caller's open connection, with a TCP Via.
        assert app.agent is not None
        app.agent.hangup(app.agent.core.calls[0].id, "test")
        bye = parse_message(await peer.receive())
        assert getattr(bye, "method", "") == "BYE"
        assert parse_via(bye.headers.get("Via") or "").transport == "TCP"
        peer.close()


async def test_coalesced_and_split_requests_are_each_answered(tmp_path: Path) -> None:
    async with running(tmp_path) as app:
        port = port_of(app, "TCP")
        peer = await TcpPeer.connect(port)
        two = tcp_request("OPTIONS", peer.port, port) + tcp_request("OPTIONS", peer.port, port)
        peer.send(two)
        assert [(await peer.response()).status for _ in range(2)] == [200, 200]
        one = tcp_request("OPTIONS", peer.port, port).encode()
        for i in range(0, len(one), 7):
            peer.send(one[i : i + 7])
            await peer.writer.drain()
            await asyncio.sleep(0.001)
        assert (await peer.response()).status == 200
        peer.send(b"\r\n\r\n")  # RFC 5626 ping
        assert await peer.receive() == b"\r\n"
        peer.close()


@pytest.mark.parametrize(
    "bad",
    [
        b"OPTIONS sip:a@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:1;branch=z9hG4bK1\r\n\r\n",  # no Content-Length
        b"\x00\xff garbage that never ends its headers " * 3000,
        b"INVITE sip:a@127.0.0.1 SIP/2.0\r\nContent-Length: 900000\r\n\r\n",  # oversize
    ],
    ids=["no-content-length", "garbage", "oversize"],
)
async def test_unframeable_input_closes_that_connection_only(tmp_path: Path, bad: bytes) -> None:
    async with running(tmp_path) as app:
        port = port_of(app, "TCP")
        bystander = await TcpPeer.connect(port)
        peer = await TcpPeer.connect(port)
        peer.send(bad)
        assert await peer.closed_by_server()
        bystander.send(tcp_request("OPTIONS", bystander.port, port))
        assert (await bystander.response()).status == 200
        bystander.close()
        peer.close()


async def test_idle_connections_are_closed(tmp_path: Path) -> None:
    async with running(tmp_path, connection_idle_timeout=1.0) as app:
        peer = await TcpPeer.connect(port_of(app, "TCP"))
        assert await peer.closed_by_server(timeout=5.0)
        peer.close()


async def test_connections_beyond_the_limit_are_refused(tmp_path: Path) -> None:
    async with running(tmp_path, max_connections=2) as app:
        port = port_of(app, "TCP")
        kept = [await TcpPeer.connect(port) for _ in range(2)]
        extra = await TcpPeer.connect(port)
        assert await extra.closed_by_server()
        kept[0].send(tcp_request("OPTIONS", kept[0].port, port))
        assert (await kept[0].response()).status == 200
        for peer in (*kept, extra):
            peer.close()


def udp_options(sent_by: str, rport: bool, user_agent: str = "", branch: str = "") -> str:
    return (
        f"OPTIONS sip:line@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {sent_by};branch={branch or 'z9hG4bK' + secrets.token_hex(6)}{';rport' if rport else ''}\r\n"
        f"From: <sip:anon@127.0.0.1>;tag=abc\r\nTo: <sip:line@127.0.0.1>\r\nCall-ID: {secrets.token_hex(6)}\r\n"
        f"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
        + (f"User-Agent: {user_agent}\r\n" if user_agent else "")
        + "Content-Length: 0\r\n\r\n"
    )


async def test_udp_rport_answers_the_source_and_records_received(tmp_path: Path) -> None:
    async with running(tmp_path) as app:
        peer = await RawPeer.open()
        # A sent-by that is not where the request came from (as behind a NAT).
        peer.send(udp_options("127.0.0.9:5999", rport=True), ("127.0.0.1", port_of(app, "UDP")))
        response = await peer.response(200)
        via = parse_via(response.headers.get("Via") or "")
        assert via.params["received"] == "127.0.0.1" and via.params["rport"] == str(peer.port)
        peer.close()


async def test_udp_without_rport_answers_the_sent_by_port(tmp_path: Path) -> None:
    async with running(tmp_path) as app:
        sender, listener = await RawPeer.open(), await RawPeer.open()
        # Sent-by names the listener's port; the response must go there, not to the sender's port.
        sender.send(udp_options(f"127.0.0.1:{listener.port}", rport=False), ("127.0.0.1", port_of(app, "UDP")))
        response = await listener.response(200)
        assert "received" not in parse_via(response.headers.get("Via") or "").params  # sent-by host was right
        with pytest.raises(asyncio.TimeoutError):
            await sender.receive(timeout=0.3)
        sender.close()
        listener.close()


async def test_scanners_are_dropped_and_others_answered(tmp_path: Path) -> None:
    async with running(tmp_path) as app:
        peer = await RawPeer.open()
        server = ("127.0.0.1", port_of(app, "UDP"))
        peer.send(udp_options(f"127.0.0.1:{peer.port}", True, user_agent="friendly-scanner"), server)
        peer.send(udp_options(f"127.0.0.1:{peer.port}", True, user_agent="SIPVicious 0.3"), server)
        with pytest.raises(asyncio.TimeoutError):
            await peer.receive(timeout=0.4)
        peer.send(udp_options(f"127.0.0.1:{peer.port}", True, user_agent="Linphone/5"), server)
        assert (await peer.response()).status == 200
        assert app.agent is not None and app.agent.overload.counters.scanners == 2
        peer.close()


async def test_rate_limit_is_per_source(tmp_path: Path) -> None:
    async with running(tmp_path, options_rate=0.5, options_burst=3) as app:
        server = ("127.0.0.1", port_of(app, "UDP"))
        noisy, quiet = await RawPeer.open("127.0.0.1"), await RawPeer.open("127.0.0.2")
        for _ in range(10):
            noisy.send(udp_options(f"127.0.0.1:{noisy.port}", True), server)
        answered = 0
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                await noisy.response(timeout=0.5)
                answered += 1
        assert answered == 3
        quiet.send(udp_options(f"127.0.0.2:{quiet.port}", True), server)
        assert (await quiet.response()).status == 200
        noisy.close()
        quiet.close()


async def test_calls_beyond_capacity_get_503_with_retry_after(tmp_path: Path) -> None:
    async with running(tmp_path, max_calls=1, answer_delay=5.0) as app:
        port = port_of(app, "TCP")
        peer = await TcpPeer.connect(port)
        peer.send(tcp_request("INVITE", peer.port, port, body=OFFER.format(port=SILENT_RTP, formats="0", direction="sendrecv")))
        assert (await peer.response()).status == 100
        peer.send(tcp_request("INVITE", peer.port, port, body=OFFER.format(port=SILENT_RTP + 2, formats="0", direction="sendrecv")))
        responses = [await peer.response() for _ in range(2)]  # 180 of the first, 503 of the second
        refused = [r for r in responses if r.status >= 300]
        assert [r.status for r in refused] == [503] and refused[0].headers.get("Retry-After") == "30"
        peer.close()



def test_messages_before_unframeable_bytes_are_still_delivered() -> None:
    framer = StreamFramer(65535)
    good = message()
    assert framer.feed(good + b"INVITE sip:x@127.0.0.1 SIP/2.0\r\nCSeq: 1 INVITE\r\n\r\n") == [good]
    assert framer.failed is not None
    with pytest.raises(FramingError):
        framer.feed(message())


async def test_a_response_after_the_connection_closed_goes_to_the_sent_by_port(tmp_path: Path) -> None:
    async with running(tmp_path, answer_delay=0.3) as app:
        port = port_of(app, "TCP")
        arrived: asyncio.Queue[bytes] = asyncio.Queue()

        async def listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            framer = StreamFramer(65535)
            while chunk := await reader.read(65536):
                for item in framer.feed(chunk):
                    await arrived.put(item)
            writer.close()

        server = await asyncio.start_server(listener, "127.0.0.1", 0)
        sent_by_port = server.sockets[0].getsockname()[1]
        peer = await TcpPeer.connect(port)
        invite = tcp_request("INVITE", sent_by_port, port, body=OFFER.format(port=SILENT_RTP, formats="0", direction="sendrecv"))
        peer.send(invite)
        assert (await peer.response()).status == 100
        peer.close()  # gone before the 200
        status = 0
        while status < 200:  # the 180 may have made it over the old connection or this one
            response = parse_message(await asyncio.wait_for(arrived.get(), 3))
            assert isinstance(response, SipResponse)
            status = response.status
        assert status == 200
        assert app.agent is not None
        for call in app.agent.core.calls:
            app.agent.hangup(call.id, "test")
        server.close()


async def test_options_over_tls_and_an_in_dialog_contact_that_says_tls(tmp_path: Path) -> None:
    certificate, key = self_signed_certificate(tmp_path / "tls")
    async with running(
        tmp_path, listen_tls="127.0.0.1:0", tls_certificate=str(certificate), tls_private_key=str(key)
    ) as app:
        port = port_of(app, "TLS")
        client = ssl.create_default_context(cafile=str(certificate))  # verifies our certificate and its IP
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        peer = TcpPeer(reader, writer)
        text = tcp_request("INVITE", peer.port, port, body=OFFER.format(port=SILENT_RTP, formats="0", direction="sendrecv"))
        peer.send(text.replace("SIP/2.0/TCP", "SIP/2.0/TLS").replace(";transport=tcp SIP", ";transport=tls SIP"))
        status, response = 0, None
        while status < 200:
            response = await peer.response()
            status = response.status
        assert response is not None and status == 200
        assert parse_name_addr(response.headers.get("Contact") or "").uri.endswith(f":{port};transport=tls")
        assert app.agent is not None
        for call in app.agent.core.calls:
            app.agent.hangup(call.id, "test")
        peer.close()


def test_tls_needs_version_1_2_and_a_certificate(tmp_path: Path) -> None:
    certificate, key = self_signed_certificate(tmp_path / "tls")
    assert server_tls_context(str(certificate), str(key)).minimum_version is ssl.TLSVersion.TLSv1_2
    with pytest.raises(ConfigError, match="tls_certificate"):
        Config(sip=SipConfig(listen_tls="127.0.0.1:5061")).validate()
    with pytest.raises(ConfigError, match="transports"):
        Config(sip=SipConfig(transports=("udp", "sctp"))).validate()
    with pytest.raises(ConfigError, match="nothing would listen"):
        Config(sip=SipConfig(transports=())).validate()


async def test_an_idle_connection_stays_open_while_its_call_lasts(tmp_path: Path) -> None:
    async with running(tmp_path, connection_idle_timeout=1.0) as app:
        port = port_of(app, "TCP")
        peer = await TcpPeer.connect(port)
        call_id = secrets.token_hex(6)
        peer.send(tcp_request("INVITE", peer.port, port, call_id, body=OFFER.format(port=SILENT_RTP, formats="0", direction="sendrecv")))
        response = await peer.response()
        while response.status < 200:
            response = await peer.response()
        to_tag = parse_name_addr(response.headers.get("To") or "").tag or ""
        peer.send(tcp_request("ACK", peer.port, port, call_id, to_tag=to_tag))
        with pytest.raises(asyncio.TimeoutError):  # three idle timeouts pass: still open
            await peer.receive(timeout=3.0)
        assert app.agent is not None
        app.agent.hangup(app.agent.core.calls[0].id, "test")
        bye = parse_message(await peer.receive())
        assert getattr(bye, "method", "") == "BYE"
        assert await peer.closed_by_server(timeout=5.0)  # the call is over: now the idle timeout applies
        peer.close()


# --- opening the listening transports ---------------------------------------------------


async def test_udp_and_tcp_share_one_port_and_tls_listens_on_its_own(tmp_path: Path) -> None:
    certificate, key = self_signed_certificate(tmp_path / "tls")
    tls = TlsListener(("127.0.0.1", 0), str(certificate), str(key), str(certificate))
    opened = await open_transports("127.0.0.1", 0, ("udp", "tcp"), lambda *_: None, StreamLimits(), tls)
    try:
        assert [transport.name for transport in opened] == ["UDP", "TCP", "TLS"]
        udp_port, tcp_port, tls_port = (transport.local_address[1] for transport in opened)
        assert udp_port == tcp_port != tls_port
        assert all(transport.local_address[0] == "127.0.0.1" for transport in opened)
    finally:
        for transport in opened:
            transport.close()


def _tcp_listener_below_ephemeral_range() -> socket.socket:
    """A TCP socket listening on a loopback port below 32768 whose UDP twin is free."""
    for port in random.sample(range(20000, 32768), 50):
        listener, udp = socket.socket(socket.AF_INET, socket.SOCK_STREAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            listener.bind(("127.0.0.1", port))
            udp.bind(("127.0.0.1", port))
        except OSError:
            listener.close()
            continue
        finally:
            udp.close()
        listener.listen()
        return listener
    raise AssertionError("no free loopback port found below 32768")


async def test_a_taken_tcp_port_fails_the_start_and_releases_the_udp_port() -> None:
    with _tcp_listener_below_ephemeral_range() as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as failure:
            await open_transports("127.0.0.1", port, ("udp", "tcp"), lambda *_: None, StreamLimits())
        assert failure.value.errno == errno.EADDRINUSE
        await asyncio.sleep(0)  # asyncio releases a closed transport's socket on the next loop pass
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", port))  # the UDP transport opened before TCP failed was closed
