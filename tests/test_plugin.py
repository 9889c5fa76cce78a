"""The pytest plugin's fixtures honour the SIP port and RTP ranges a test gives them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from port_table import port_block
from rawsip import Dialer, RawPeer, to_tag
from voiceline.sim.plugin import VoicelineServer
from voiceline.sim.runner import CallReport, CallSpec
from voiceline.sip.message import parse_via, response_to, serialize
from voiceline.sip.sdp import parse_sdp

pytestmark = pytest.mark.interop

BASE, _ = port_block("test_plugin")
SIP_PORT = BASE  # UDP and TCP both
SERVER_RTP = (BASE + 100, BASE + 199)
CALLER_RTP = (BASE + 200, BASE + 299)


async def test_voiceline_server_listens_on_the_given_port_and_answers_from_the_given_rtp_range(
    voiceline_server: Callable[..., VoicelineServer],
) -> None:
    server = voiceline_server(port=SIP_PORT, rtp_ports=SERVER_RTP)
    assert server.port == SIP_PORT and server.ports == {"udp": SIP_PORT, "tcp": SIP_PORT}
    peer = await RawPeer.open()
    try:
        dialer = Dialer(peer, (server.host, server.port))
        dialer.invite(rtp_port=4000)
        ok = await peer.response(status=200)
        assert SERVER_RTP[0] <= parse_sdp(ok.body).media[0].port <= SERVER_RTP[1]
        dialer.ack(to_tag(ok))
        dialer.in_dialog("BYE")
        assert (await peer.response(method="BYE")).status == 200
    finally:
        peer.close()


async def test_sim_calls_offer_rtp_ports_from_the_given_range(sim_calls: Callable[..., list[CallReport]]) -> None:
    busy = await RawPeer.open()  # a user agent that refuses every call, after reading its offer
    try:
        specs = [CallSpec(f"sip:line@127.0.0.1:{busy.port}", seconds=1.0, from_user=f"caller{n}") for n in range(2)]
        placing = asyncio.create_task(asyncio.to_thread(sim_calls, specs, timeout=20.0, rtp_ports=CALLER_RTP))
        offered = []
        for _ in specs:
            invite = await busy.request("INVITE", timeout=15.0)
            offered.append(parse_sdp(invite.body).media[0].port)
            via = parse_via(invite.headers.get("Via") or "")
            busy.send(serialize(response_to(invite, 486, to_tag="busy")), (via.host, via.port or 5060))
        reports = await placing
        assert [report.final_status for report in reports] == [486, 486]
        assert all(CALLER_RTP[0] <= port <= CALLER_RTP[1] for port in offered), offered
    finally:
        busy.close()
