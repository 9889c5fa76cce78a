"""The soak's callers: calls placed at a steady rate, each held a while and hung up, RTP on a share.

Every call is a `voiceline.bench.uac.BenchCall` (INVITE with an offer, ACK, BYE) over one SIP
socket. Every `rtp_every`-th call sends 20 ms PCMU-sized packets from a socket of its own
(taken from a pool bound in the caller port block) for as long as it is up, and counts what
the service sends back; the other calls name one shared socket in their offers, which reads
and drops what arrives (hold audio, a partner's voice).

A call counts as failed when its INVITE gets an error or no answer, its answer is unusable, or
its BYE gets an error or no answer; as hung when it is not over when the run's time is up.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from voiceline.bench.uac import MAX_TRANSMISSIONS, RETRANSMIT_SECONDS, BenchCall, CallState
from voiceline.sip.message import SipParseError, SipRequest, parse_cseq, parse_message

FRAME_SECONDS = 0.02
HOUSEKEEPING_SECONDS = 0.05  # SIP retransmissions
PAYLOAD = b"\xff" * 160  # 20 ms of PCMU silence
_RTP_HEADER = struct.Struct("!BBHII")
# How long after its last planned hangup a call may still be finishing: a BYE retransmitted until it gives up.
FINISH_MARGIN_SECONDS = MAX_TRANSMISSIONS * RETRANSMIT_SECONDS + 3.0


@dataclass(frozen=True)
class ChurnOptions:
    calls: int
    rate: float  # calls placed per second
    hold: tuple[float, float] = (1.0, 2.0)  # seconds an answered call stays up, drawn uniformly
    rtp_every: int = 3  # every n-th call sends RTP; 0: none does
    host: str = "127.0.0.1"


@dataclass
class ChurnCounts:
    placed: int = 0
    answered: int = 0
    completed: int = 0  # hung up by us, the BYE answered 200
    failed: int = 0
    ended_by_server: int = 0  # the service sent the BYE
    hung: int = 0  # not over when the run's time was up
    rtp_calls: int = 0
    rtp_silent: int = 0  # RTP calls answered that heard nothing back
    packets_sent: int = 0
    packets_received: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # why, e.g. "INVITE 503", "BYE unanswered"


class _Leg(asyncio.DatagramProtocol):
    """One RTP socket of the pool: sends while its call is up, counts what its call's server port sends."""

    def __init__(self, counts: ChurnCounts) -> None:
        self.counts = counts
        self.transport: asyncio.DatagramTransport | None = None
        self.dest: tuple[str, int] | None = None  # the service's port for the call up on it
        self.heard = 0
        self.buf = bytearray(_RTP_HEADER.size + len(PAYLOAD))
        self.buf[_RTP_HEADER.size :] = PAYLOAD
        self.sequence = random.getrandbits(16)
        self.timestamp = random.getrandbits(32)
        self.ssrc = random.getrandbits(32)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr == self.dest:  # not a late packet of the socket's previous call
            self.heard += 1
            self.counts.packets_received += 1

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable after the service closed the call's port: the call is ending

    def send_frame(self) -> None:
        assert self.transport is not None and self.dest is not None
        self.sequence = (self.sequence + 1) & 0xFFFF
        self.timestamp = (self.timestamp + len(PAYLOAD)) & 0xFFFFFFFF
        _RTP_HEADER.pack_into(self.buf, 0, 0x80, 0, self.sequence, self.timestamp, self.ssrc)
        self.transport.sendto(self.buf, self.dest)


class _Sink(asyncio.DatagramProtocol):
    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        pass

    def error_received(self, exc: Exception) -> None:
        pass


@dataclass(eq=False)
class _Call:
    uac: BenchCall
    leg: _Leg | None
    over: bool = False


class Churn(asyncio.DatagramProtocol):
    """Places `options.calls` calls against `server`, binding its sockets in `ports` (first, last)."""

    def __init__(self, options: ChurnOptions, server: tuple[str, int], ports: tuple[int, int]) -> None:
        first, last = ports
        if last - first < 5:
            raise ValueError("the caller port block needs at least 6 ports")
        self.options = options
        self.server = server
        self.counts = ChurnCounts()
        self.half_placed = asyncio.Event()
        self._ports = (first, last)
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.DatagramTransport | None = None
        self._calls: dict[str, _Call] = {}  # by Call-ID, until over
        self._free_legs: list[_Leg] = []
        self._sending: set[_Leg] = set()
        self._sink_port = first + 2
        self._transports: list[asyncio.BaseTransport] = []
        self._all_placed = False
        self._all_over = asyncio.Event()

    # -- the run -----------------------------------------------------------------

    async def run(self) -> ChurnCounts:
        """Place every call at the rate, wait until each is over (or the time is up): the counts."""
        await self._open()
        timers = [
            self._loop.create_task(self._every(FRAME_SECONDS, self._send_frames)),
            self._loop.create_task(self._every(HOUSEKEEPING_SECONDS, self._housekeeping)),
        ]
        try:
            await self._place_all()
            try:
                await asyncio.wait_for(self._all_over.wait(), self.options.hold[1] + FINISH_MARGIN_SECONDS)
            except TimeoutError:
                self.counts.hung = len(self._calls)
        finally:
            for timer in timers:
                timer.cancel()
            await asyncio.gather(*timers, return_exceptions=True)
            for transport in self._transports:
                transport.close()
        return self.counts

    async def _open(self) -> None:
        first, last = self._ports
        host = self.options.host
        transport, _ = await self._loop.create_datagram_endpoint(lambda: self, local_addr=(host, first))
        self._transports.append(transport)
        sink, _ = await self._loop.create_datagram_endpoint(_Sink, local_addr=(host, self._sink_port))
        self._transports.append(sink)
        if self.options.rtp_every:
            for port in range(first + 4, last + 1, 2):  # even ports, as RTP takes
                leg_transport, leg = await self._loop.create_datagram_endpoint(
                    lambda: _Leg(self.counts), local_addr=(host, port)
                )
                self._transports.append(leg_transport)
                self._free_legs.append(leg)

    async def _place_all(self) -> None:
        start = self._loop.time()
        for index in range(self.options.calls):
            delay = start + index / self.options.rate - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._place(index)
            if index + 1 == (self.options.calls + 1) // 2:
                self.half_placed.set()
        self.half_placed.set()
        self._all_placed = True
        if not self._calls:
            self._all_over.set()

    async def _every(self, interval: float, action: Callable[[], None]) -> None:
        next_at = self._loop.time()
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - self._loop.time()))
            action()

    # -- calls -------------------------------------------------------------------

    def _place(self, index: int) -> None:
        leg = None
        if self.options.rtp_every and index % self.options.rtp_every == 0:
            if not self._free_legs:
                raise RuntimeError("the caller port block has too few ports for the RTP calls up at once")
            leg = self._free_legs.pop()
            self.counts.rtp_calls += 1
        local = (self.options.host, self._ports[0])
        port = int(leg.transport.get_extra_info("sockname")[1]) if leg and leg.transport else self._sink_port
        call = _Call(BenchCall(local, self.server, port), leg)
        self._calls[call.uac.call_id] = call
        self.counts.placed += 1
        self._send(call.uac.invite(self._loop.time()))

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            message = parse_message(data)
        except SipParseError:
            return
        call = self._calls.get(message.headers.get("Call-ID") or "")
        if call is None:
            return  # a retransmission for a call already over
        uac = call.uac
        if isinstance(message, SipRequest):
            self._send(uac.on_request(message), addr)
            if uac.state is CallState.ENDED:
                self.counts.ended_by_server += 1
                self._over(call)
            return
        try:
            _, method = parse_cseq(message.headers.get("CSeq") or "")
        except SipParseError:
            return
        before = uac.state
        reply = uac.on_response(message, self._loop.time())
        if reply:
            self._send(reply)
        if before is CallState.INVITING and uac.state is CallState.ANSWERED:
            self._answered(call)
        elif before is CallState.INVITING and uac.state is CallState.FAILED:
            self._failed(call, f"INVITE {message.status}" if message.status >= 300 else "unusable answer")
        elif before is CallState.HANGING_UP and uac.state is CallState.ENDED:
            if 200 <= message.status < 300:
                self.counts.completed += 1
                self._over(call)
            else:
                self._failed(call, f"{method} {message.status}")

    def _answered(self, call: _Call) -> None:
        self.counts.answered += 1
        if call.leg is not None and call.uac.remote_rtp is not None:
            call.leg.dest = call.uac.remote_rtp
            call.leg.heard = 0
            self._sending.add(call.leg)
        self._loop.call_later(random.uniform(*self.options.hold), self._hang_up, call)

    def _hang_up(self, call: _Call) -> None:
        if call.over:
            return
        bye = call.uac.hangup(self._loop.time())
        if bye is not None:
            self._send(bye)

    def _failed(self, call: _Call, reason: str) -> None:
        self.counts.failed += 1
        self.counts.failures[reason] += 1
        self._over(call)

    def _over(self, call: _Call) -> None:
        call.over = True
        del self._calls[call.uac.call_id]
        leg = call.leg
        if leg is not None:
            if leg in self._sending:
                self._sending.discard(leg)
                if not leg.heard:
                    self.counts.rtp_silent += 1
            leg.dest = None
            self._free_legs.append(leg)
        if not self._calls and self._all_placed:
            self._all_over.set()

    # -- timers ------------------------------------------------------------------

    def _send_frames(self) -> None:
        for leg in self._sending:
            leg.send_frame()
        self.counts.packets_sent += len(self._sending)

    def _housekeeping(self) -> None:
        now = self._loop.time()
        for call in list(self._calls.values()):
            uac = call.uac
            before = uac.state
            request = uac.due(now)
            if request is not None:
                self._send(request)
            elif before is CallState.INVITING and uac.state is CallState.FAILED:
                self._failed(call, "INVITE unanswered")
            elif before is CallState.HANGING_UP and uac.state is CallState.ENDED:
                self._failed(call, "BYE unanswered")

    def _send(self, data: bytes, dest: tuple[str, int] | None = None) -> None:
        assert self._transport is not None
        self._transport.sendto(data, dest or self.server)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        pass  # the service's port refused a datagram: the retransmissions count it as unanswered

