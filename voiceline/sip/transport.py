"""asyncio edges for SIP transports. UDP now; TCP and TLS will offer the same two calls."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, Protocol, cast

Address = tuple[str, int]
DatagramHandler = Callable[[bytes, Address], None]

# A deep receive buffer rides out bursts (retransmission storms, floods) without drops.
RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024


class SipTransport(Protocol):
    name: str

    def send(self, data: bytes, dest: Address) -> None: ...

    @property
    def local_address(self) -> Address: ...

    def close(self) -> None: ...


class UdpTransport(asyncio.DatagramProtocol):
    name = "UDP"

    def __init__(self, on_message: DatagramHandler) -> None:
        self._on_message = on_message
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector transport does not subclass DatagramTransport: cast, don't check.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._on_message(data, (str(addr[0]), int(addr[1])))  # IPv6 addresses come as 4-tuples

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (a phone that went away) must not stop the socket.
        pass

    def send(self, data: bytes, dest: Address) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(data, dest)

    @property
    def local_address(self) -> Address:
        assert self._transport is not None
        host, port = self._transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def open_udp(host: str, port: int, on_message: DatagramHandler) -> UdpTransport:
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
