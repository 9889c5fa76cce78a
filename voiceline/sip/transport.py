"""SIP transports: UDP, TCP and TLS behind one small interface (RFC 3261 section 18).

A transport hands every received message to `on_message(data, source, transport)`.
For UDP `source` is the datagram's sender; for TCP and TLS it is the remote
address of the connection, which also names that connection: `send(data, dest)`
writes to the open connection with that remote address, or opens a new one.

Stream framing (`StreamFramer`) is sans-I/O: bytes in, whole messages out,
using Content-Length (18.3). A stream message without a usable Content-Length,
or larger than the limit, is an error that closes that connection.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol, cast

Address = tuple[str, int]
MessageHandler = Callable[[bytes, Address, "SipTransport"], None]

# A deep receive buffer rides out bursts (retransmission storms, floods) without drops.
RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024
# A peer that stops reading is cut off once this much is queued for it.
MAX_WRITE_BUFFER_BYTES = 1024 * 1024
# What an outbound connection may queue while it is still being set up.
MAX_PENDING_BYTES = 256 * 1024
CONNECT_TIMEOUT_SECONDS = 10.0
# A TLS client that has not finished its handshake by then is dropped.
TLS_HANDSHAKE_SECONDS = 10.0
# Closed connections whose reply address (received IP, sent-by port) is remembered.
MAX_REMEMBERED_REPLY_ADDRESSES = 4096
# RFC 5626 keep-alive: a double CRLF ping is answered with a single CRLF pong.
# With port 0 UDP and TCP share one kernel-chosen port; tries when TCP finds it taken.
SHARED_PORT_ATTEMPTS = 20
PING = b"\r\n\r\n"
PONG = b"\r\n"


class SipTransport(Protocol):
    name: str  # "UDP", "TCP" or "TLS", as written in Via
    reliable: bool

    def send(self, data: bytes, dest: Address) -> None: ...

    def has_connection(self, dest: Address) -> bool:
        """True while a connection with that remote address is open (never for UDP)."""
        ...

    def set_reply_address(self, source: Address, address: Address) -> None:
        """Where responses for requests from `source` go once its connection has closed (18.2.2)."""
        ...

    @property
    def local_address(self) -> Address: ...

    def close(self) -> None: ...


# -- UDP -----------------------------------------------------------------------


class UdpTransport(asyncio.DatagramProtocol):
    name = "UDP"
    reliable = False

    def __init__(self, on_message: MessageHandler) -> None:
        self._on_message = on_message
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector transport does not subclass DatagramTransport: cast, don't check.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._on_message(data, (str(addr[0]), int(addr[1])), self)  # IPv6 addresses come as 4-tuples

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (a phone that went away) must not stop the socket.
        pass

    def send(self, data: bytes, dest: Address) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(data, dest)

    def has_connection(self, dest: Address) -> bool:
        return False

    def set_reply_address(self, source: Address, address: Address) -> None:
        pass  # UDP replies are addressed per message

    @property
    def local_address(self) -> Address:
        assert self._transport is not None
        host, port = self._transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def open_udp(host: str, port: int, on_message: MessageHandler) -> UdpTransport:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(lambda: UdpTransport(on_message), sock=sock)
    return protocol


# -- stream framing (sans-I/O) -----------------------------------------------------


class FramingError(Exception):
    """The byte stream cannot be split into SIP messages: the connection must close."""


class StreamFramer:
    """Splits a TCP/TLS byte stream into SIP messages by Content-Length (RFC 3261 18.3).

    `feed()` returns complete messages; `PING` stands for a keep-alive ping the
    caller answers with `PONG`. Unframeable input raises FramingError, after the
    messages before it were returned (`failed` is then set and the next feed
    raises). The buffer never holds more than one message of at most
    `max_message_size` octets (plus the bytes of one read).
    """

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self._buffer = bytearray()
        self._scanned = 0  # how far the search for the end of the headers got
        self._body_end: int | None = None
        self.failed: FramingError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        if self.failed is not None:
            raise self.failed
        self._buffer += data
        messages: list[bytes] = []
        while True:
            try:
                message = self._next()
            except FramingError as exc:
                self.failed = exc
                self._buffer.clear()
                if messages:
                    return messages  # what came before the bad part is still delivered
                raise
            if message is None:
                return messages
            messages.append(message)

    def _next(self) -> bytes | None:
        buffer = self._buffer
        if self._body_end is None:
            if buffer and buffer[0] in b"\r\n":
                return self._keepalive()
            head_end = self._find_head_end()
            if head_end is None:
                if len(buffer) > self.max_message_size:
                    raise FramingError("headers larger than the message size limit")
                return None
            self._body_end = head_end + _content_length(bytes(buffer[:head_end]))
            if self._body_end > self.max_message_size:
                raise FramingError("message larger than the message size limit")
        if len(buffer) < self._body_end:
            return None
        message = bytes(buffer[: self._body_end])
        del buffer[: self._body_end]
        self._body_end = None
        self._scanned = 0
        return message

    def _keepalive(self) -> bytes | None:
        """Leading CR/LF between messages: a ping when it holds a double CRLF, else skipped."""
        buffer = self._buffer
        run = len(buffer) - len(buffer.lstrip(b"\r\n"))
        if run == len(buffer) and run < len(PING) and PING.startswith(bytes(buffer)):
            return None  # maybe the first half of a ping: wait for the rest
        is_ping = PING in buffer[:run]
        del buffer[:run]
        return PING if is_ping else self._next()

    def _find_head_end(self) -> int | None:
        """Offset just past the blank line ending the headers (bare LF tolerated, as the parser does)."""
        start = max(0, self._scanned - 3)
        crlf = self._buffer.find(b"\r\n\r\n", start)
        lf = self._buffer.find(b"\n\n", start)
        self._scanned = len(self._buffer)
        if lf >= 0 and (crlf < 0 or lf < crlf):
            return lf + 2
        if crlf >= 0:
            return crlf + 4
        return None


def _content_length(head: bytes) -> int:
    """The one Content-Length (or compact `l`) of a header block; missing or malformed is an error."""
    values: set[bytes] = set()
    for line in head.split(b"\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.strip(b" \t").lower() in (b"content-length", b"l"):
            values.add(value.strip(b" \t\r"))
    if not values:
        raise FramingError("stream message without Content-Length")
    declared = values.pop()
    if values or not declared.isdigit() or len(declared) > 9:
        raise FramingError("malformed Content-Length on a stream")
    return int(declared)


# -- TCP and TLS ---------------------------------------------------------------------


@dataclass
class StreamLimits:
    max_message_size: int = 65535
    idle_timeout: float = 600.0
    max_connections: int = 1024


@dataclass
class StreamCounters:
    accepted: int = 0
    opened: int = 0
    refused: int = 0  # over max_connections
    framing_errors: int = 0
    idle_closed: int = 0
    slow_readers: int = 0


class StreamConnection(asyncio.Protocol):
    """One TCP or TLS connection: frames what it reads, writes what the transport sends."""

    def __init__(self, owner: StreamTransport, outbound_to: Address | None = None) -> None:
        self._owner = owner
        self._framer = StreamFramer(owner.limits.max_message_size)
        self._transport: asyncio.Transport | None = None
        self.peer: Address | None = outbound_to
        self.reply_address: Address | None = None  # the peer's received IP and sent-by port
        self.last_active = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if self.peer is None and peer is not None:
            self.peer = (str(peer[0]), int(peer[1]))
        self._owner._connected(self)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        try:
            messages = self._framer.feed(data)
        except FramingError:
            self._owner.counters.framing_errors += 1
            self.close()
            return
        for message in messages:
            if message == PING:
                self.write(PONG)
            elif self.peer is not None and not self.closing:
                self._owner._on_message(message, self.peer, self._owner)
        if self._framer.failed is not None:
            self._owner.counters.framing_errors += 1
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._disconnected(self)

    @property
    def closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self.last_active = time.monotonic()
        self._transport.write(data)
        if self._transport.get_write_buffer_size() > MAX_WRITE_BUFFER_BYTES:
            self._owner.counters.slow_readers += 1
            self._transport.abort()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class StreamTransport:
    """TCP or TLS: a listening socket plus the connections, keyed by remote address."""

    def __init__(
        self,
        name: str,
        on_message: MessageHandler,
        limits: StreamLimits,
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.name = name
        self.reliable = True
        self._on_message = on_message
        self.limits = limits
        self.counters = StreamCounters()
        self._server_ssl = server_ssl
        self._client_ssl = client_ssl
        self._server: asyncio.Server | None = None
        self._connections: dict[Address, StreamConnection] = {}
        self._connecting: dict[Address, list[bytes]] = {}
        # Remote address of a closed connection -> where its responses go instead; oldest first.
        self._reply_addresses: OrderedDict[Address, Address] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._bind_host = ""
        self._closed = False
        # Remote addresses of connections a live call uses: never closed for being idle.
        self.busy_peers: Callable[[], Collection[Address]] = tuple

    async def listen(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._bind_host = host
        self._server = await loop.create_server(
            lambda: StreamConnection(self),
            host,
            port,
            ssl=self._server_ssl,
            ssl_handshake_timeout=TLS_HANDSHAKE_SECONDS if self._server_ssl is not None else None,
            reuse_address=True,
        )
        self._schedule_sweep()

    @property
    def local_address(self) -> Address:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def has_connection(self, dest: Address) -> bool:
        connection = self._connections.get(dest)
        return connection is not None and not connection.closing

    def set_reply_address(self, source: Address, address: Address) -> None:
        connection = self._connections.get(source)
        if connection is not None:
            connection.reply_address = address

    def send(self, data: bytes, dest: Address) -> None:
        """Write to the connection with that remote address, else open one (RFC 3261 18.1.1, 18.2.2).

        A response whose connection has closed goes to a new connection to the
        peer's received IP and sent-by port, not to the old connection's port.
        """
        if self._closed:
            return
        connection = self._connections.get(dest)
        if connection is not None and not connection.closing:
            connection.write(data)
            return
        dest = self._reply_addresses.get(dest, dest)
        connection = self._connections.get(dest)
        if connection is not None and not connection.closing:
            connection.write(data)
            return
        pending = self._connecting.get(dest)
        if pending is not None:
            if sum(map(len, pending)) + len(data) <= MAX_PENDING_BYTES:
                pending.append(data)
            return
        if len(self._connections) + len(self._connecting) >= self.limits.max_connections:
            self.counters.refused += 1
            return
        self._connecting[dest] = [data]
        task = asyncio.get_running_loop().create_task(self._connect(dest))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, dest: Address) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: StreamConnection(self, outbound_to=dest),
                    dest[0],
                    dest[1],
                    ssl=self._client_ssl,
                    server_hostname=dest[0] if self._client_ssl is not None else None,
                    local_addr=(self._bind_host, 0) if self._bind_host not in ("", "0.0.0.0", "::") else None,
                ),
                CONNECT_TIMEOUT_SECONDS,
            )
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            self._connecting.pop(dest, None)  # the transaction's Timer F reports the failure
            return
        self.counters.opened += 1
        for data in self._connecting.pop(dest, []):
            connection.write(data)

    def _connected(self, connection: StreamConnection) -> None:
        if connection.peer is None or self._closed:
            connection.close()
            return
        inbound = connection.peer not in self._connecting
        if inbound:
            if len(self._connections) >= self.limits.max_connections:
                self.counters.refused += 1
                connection.close()
                return
            self.counters.accepted += 1
        previous = self._connections.get(connection.peer)
        self._connections[connection.peer] = connection
        if previous is not None:
            previous.close()

    def _disconnected(self, connection: StreamConnection) -> None:
        if connection.peer is not None and self._connections.get(connection.peer) is connection:
            del self._connections[connection.peer]
            if connection.reply_address is not None and connection.reply_address != connection.peer:
                self._reply_addresses[connection.peer] = connection.reply_address
                self._reply_addresses.move_to_end(connection.peer)
                while len(self._reply_addresses) > MAX_REMEMBERED_REPLY_ADDRESSES:
                    self._reply_addresses.popitem(last=False)

    def _schedule_sweep(self) -> None:
        interval = min(max(self.limits.idle_timeout / 4, 0.05), 30.0)
        self._sweeper = asyncio.get_running_loop().call_later(interval, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for longer than the idle timeout (bounds abandoned connections).

        Connections a live call came in on stay: our in-dialog requests must still reach a
        phone behind NAT, which only that connection can do.
        """
        cutoff = time.monotonic() - self.limits.idle_timeout
        idle = [c for c in self._connections.values() if c.last_active < cutoff]
        busy = self.busy_peers() if idle else ()
        for connection in idle:
            if connection.peer not in busy:
                self.counters.idle_closed += 1
                connection.close()
        if not self._closed:
            self._schedule_sweep()

    def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections.values()):
            connection.close()
        for task in list(self._tasks):
            task.cancel()


def server_tls_context(certificate: str, private_key: str) -> ssl.SSLContext:
    """TLS 1.2 or newer with our certificate; callers are not asked for one."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, private_key)
    return context


def client_tls_context(ca_file: str) -> ssl.SSLContext:
    """For connections we open (a BYE when the caller's connection is gone): the peer's certificate is verified."""
    context = ssl.create_default_context(cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def open_stream(
    name: str,
    host: str,
    port: int,
    on_message: MessageHandler,
    limits: StreamLimits,
    server_ssl: ssl.SSLContext | None = None,
    client_ssl: ssl.SSLContext | None = None,
) -> StreamTransport:
    transport = StreamTransport(name, on_message, limits, server_ssl, client_ssl)
    await transport.listen(host, port)
    return transport


@dataclass(frozen=True)
class TlsListener:
    """Where TLS listens and with which certificate; `ca_file` (empty: the system's) verifies the peers we connect to."""

    address: Address
    certificate: str
    private_key: str
    ca_file: str = ""


async def open_transports(
    host: str,
    port: int,
    protocols: Collection[str],
    on_message: MessageHandler,
    limits: StreamLimits,
    tls: TlsListener | None = None,
) -> list[SipTransport]:
    """UDP and TCP (those of `protocols`, "udp"/"tcp") on one port of `host`, TLS where `tls` says."""
    opened: list[SipTransport] = []
    try:
        for attempt in range(SHARED_PORT_ATTEMPTS):
            if "udp" in protocols:
                udp = await open_udp(host, port, on_message)
                opened.append(udp)
            if "tcp" not in protocols:
                break
            tcp_port = opened[0].local_address[1] if opened else port
            try:
                opened.append(await open_stream("TCP", host, tcp_port, on_message, limits))
                break
            except OSError as exc:
                # Port 0: the UDP port the kernel chose may be taken for TCP; choose again.
                if port != 0 or exc.errno != errno.EADDRINUSE or attempt == SHARED_PORT_ATTEMPTS - 1:
                    raise
                for transport in opened:
                    transport.close()
                opened.clear()
        if tls is not None:
            opened.append(
                await open_stream(
                    "TLS",
                    *tls.address,
                    on_message,
                    limits,
                    server_ssl=server_tls_context(tls.certificate, tls.private_key),
                    client_ssl=client_tls_context(tls.ca_file),
                )
            )
    except BaseException:
        for transport in opened:
            transport.close()
        raise
    return opened
