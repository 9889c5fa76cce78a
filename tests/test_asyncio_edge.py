"""The user agent's asyncio edge on loopback: the app's handler failing ends that call alone, with its trace logged."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import structlog

from rawsip import Dialer, RawPeer, to_tag
from voiceline.sip.core import CoreSettings
from voiceline.sip.events import CallInfo
from voiceline.sip.transport import open_udp
from voiceline.sip.useragent import UserAgent

from port_table import port_block

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
_first, _last = port_block("test_asyncio_edge")
_ports = iter(range(_first, _last))  # this file's SIP ports (the last is named in SDP only)


class FailsOnConfirm:
    """A handler whose confirmation step breaks for the first call only."""

    def __init__(self) -> None:
        self.confirmed: list[str] = []
        self.ended: list[tuple[str, str]] = []

    async def call_offered(self, call: CallInfo) -> int:
        return _last  # only named in our SDP

    def call_confirmed(self, call: CallInfo) -> None:
        if not self.confirmed:
            self.confirmed.append(call.id)
            raise RuntimeError("media failed to start")
        self.confirmed.append(call.id)

    def call_media_changed(self, call: CallInfo) -> None: ...

    def call_dtmf(self, call: CallInfo, digit: str) -> None: ...

    def call_ended(self, call: CallInfo, reason: str) -> None:
        self.ended.append((call.id, reason))


@pytest.fixture
async def edge() -> AsyncIterator[tuple[UserAgent, FailsOnConfirm, RawPeer]]:
    handler = FailsOnConfirm()
    agent = UserAgent(CoreSettings(HOST, answer_delay=0.0), handler)
    transport = await open_udp(HOST, next(_ports), agent.message_received)
    agent.attach(transport)
    peer = await RawPeer.open()
    try:
        yield agent, handler, peer
    finally:
        peer.close()
        await agent.shutdown(timeout=0.5)
        transport.close()


async def test_a_handler_error_ends_that_call_with_its_trace_and_the_next_call_goes_on(
    edge: tuple[UserAgent, FailsOnConfirm, RawPeer],
) -> None:
    agent, handler, peer = edge
    assert agent.transport is not None
    server = agent.transport.local_address
    with structlog.testing.capture_logs() as logs:
        first = Dialer(peer, server)
        first.invite(rtp_port=4000)
        first.ack(to_tag(await peer.response(status=200)))
        bye = await peer.request("BYE")
        assert bye.headers.get("Call-ID") == first.call_id  # the failed call is ended, not left half set up
    [failure] = [entry for entry in logs if entry["event"] == "call.handler_failed"]
    assert failure["error"] == "RuntimeError" and failure["exc_info"]
    assert [reason for _, reason in handler.ended] == ["internal error"]

    second = Dialer(peer, server)
    second.invite(rtp_port=4002)
    second.ack(to_tag(await peer.response(status=200)))
    second.out_of_dialog("OPTIONS")  # answered after the ACK before it was taken
    await peer.response(method="OPTIONS")
    assert len(handler.confirmed) == 2 and [c.id for c in agent.calls] == [handler.confirmed[1]]
