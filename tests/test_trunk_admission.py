"""Trunks and lines on a running service: 127.0.0.x addresses play different sources.

The service runs in-process on 127.0.0.1; bare UDP peers bound to other
loopback addresses stand for carriers, SBCs and strangers.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from port_table import port_ranges
from rawsip import Dialer, RawPeer, address, serving, to_tag
from waiting import until
from voiceline.app import VoiceLine
from voiceline.config import from_mapping
from voiceline.sim.plugin import QUICK_JOURNEY
from test_transport import TcpPeer
from voiceline.sip.auth import DigestClient, digest_response, parse_digest, pick_challenge
from voiceline.sip.message import Headers, SipRequest, SipResponse, parse_message, response_to, serialize
from voiceline.sip.transaction import new_branch

pytestmark = pytest.mark.integration

_next_range = port_ranges("test_trunk_admission", 20)  # this file's RTP ports

TRUNKS = [
    {"name": "carrier", "sources": ["127.0.0.2"]},
    {"name": "sbc", "sources": ["127.0.0.3"], "username": "sbc-in", "password": "in-secret", "realm": "voiceline.test"},
    {"name": "small", "sources": ["127.0.0.6"], "max_calls": 1},
]
LINES = [{"name": "general", "numbers": ["100", "+4930100"]}, {"name": "language", "numbers": ["200"]}]


def running(
    tmp_path: Path, trunks: list[dict[str, Any]] = TRUNKS, lines: list[dict[str, Any]] = LINES, **sip: Any
) -> contextlib.AbstractAsyncContextManager[VoiceLine]:
    low, high = next(_next_range)
    config = from_mapping(
        {
            # Stopping waits for answers to its BYEs, which these peers never give: 1 s, not 4 s.
            "sip": {"listen": "127.0.0.1:0", "answer_delay": 0.05, "shutdown_timeout": 1.0, **sip},
            "media": {"rtp_ports": f"{low}-{high}"},
            "storage": {"data_dir": str(tmp_path / "data"), "poll_interval": 0.2},
            "trunks": trunks,
            "lines": lines,
            **QUICK_JOURNEY,
        }
    )
    return serving(config)


@contextlib.asynccontextmanager
async def peer_at(host: str) -> AsyncIterator[RawPeer]:
    peer = await RawPeer.open(host)
    try:
        yield peer
    finally:
        peer.close()


async def final(peer: RawPeer, timeout: float = 3.0) -> SipResponse:
    """The first final response (skipping 1xx)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        response = await peer.response(timeout=max(0.01, end - loop.time()))
        if response.status >= 200:
            return response


async def call(app: VoiceLine, peer: RawPeer, number: str = "100", extra: str = "") -> tuple[Dialer, SipResponse]:
    dialer = Dialer(peer, address(app), to_user=number)
    dialer.invite(rtp_port=4000, extra=extra)
    response = await final(peer)
    dialer.ack(to_tag(response), for_error=response.status >= 300)
    return dialer, response


async def test_unprovisioned_source_gets_403_and_is_counted(tmp_path: Path) -> None:
    async with running(tmp_path) as app, peer_at("127.0.0.4") as stranger:
        _, response = await call(app, stranger)
        assert response.status == 403
        Dialer(stranger, address(app)).out_of_dialog("OPTIONS")
        assert (await stranger.response()).status == 403
        assert app.agent is not None and app.agent.core.calls == []
        assert app.storage is not None
        storage = app.storage
        await until(storage.refusals)  # the watcher moves the counts to the database
        assert [(row["reason"], row["count"]) for row in await storage.refusals()] == [("unknown_source", 2)]


async def test_unprovisioned_source_can_be_dropped_silently(tmp_path: Path) -> None:
    async with running(tmp_path, unknown_source="drop") as app, peer_at("127.0.0.4") as stranger:
        Dialer(stranger, address(app)).invite(rtp_port=4000)
        with pytest.raises(asyncio.TimeoutError):
            await stranger.receive(timeout=1.0)
        assert app.agent is not None and app.agent.transactions.active == 0  # nothing kept for it


async def test_ip_trunk_is_accepted_on_the_dialled_line(tmp_path: Path) -> None:
    async with running(tmp_path) as app, peer_at("127.0.0.2") as carrier:
        dialer, response = await call(app, carrier, number="+4930100")
        assert response.status == 200
        await until(lambda: app.ops.status()["lines"]["general"]["waiting"] == 1)
        assert app.agent is not None
        [offered] = app.agent.core.calls
        assert (offered.trunk, offered.line) == ("carrier", "general")
        assert app.ops.status()["lines"]["general"]["waiting"] == 1 and app.ops.status()["lines"]["language"]["waiting"] == 0
        dialer.in_dialog("BYE")
        assert (await carrier.response(method="BYE")).status == 200


async def test_trunk_identified_by_host_name(tmp_path: Path) -> None:
    """A host-name source is resolved (here `localhost`) and its addresses identify the trunk."""
    async with running(tmp_path, [{"name": "named", "sources": ["localhost"]}]) as app, peer_at("127.0.0.1") as peer:
        assert app.trunks is not None and "127.0.0.1" in app.trunks.policy.directory.resolved["localhost"]
        dialer, response = await call(app, peer)
        assert response.status == 200
        assert app.agent is not None and [c.trunk for c in app.agent.core.calls] == ["named"]
        dialer.in_dialog("BYE")
        await peer.response(method="BYE")
    async with running(tmp_path, [{"name": "named", "sources": ["localhost"]}]) as app, peer_at("127.0.0.8") as other:
        assert (await call(app, other))[1].status == 403


async def test_user_agent_request_returns_the_final_response_or_none(tmp_path: Path) -> None:
    """`UserAgent.request`: a non-INVITE client transaction; None after Timer F (64*T1) without an answer."""
    async with running(tmp_path, t1=0.01) as app, peer_at("127.0.0.2") as silent, peer_at("127.0.0.2") as answering:
        assert app.agent is not None
        host, port = address(app)

        def options(dest: tuple[str, int]) -> SipRequest:
            return SipRequest("OPTIONS", f"sip:{dest[0]}:{dest[1]}", Headers([
                ("Via", f"SIP/2.0/UDP {host}:{port};branch={new_branch()}"), ("From", f"<sip:voiceline@{host}>;tag=x"),
                ("To", f"<sip:{dest[0]}>"), ("Call-ID", new_branch()), ("CSeq", "1 OPTIONS"), ("Max-Forwards", "70"),
            ]))  # fmt: skip

        assert await asyncio.wait_for(app.agent.request(options(("127.0.0.2", silent.port)), ("127.0.0.2", silent.port)), 5) is None
        assert len(silent.raw) > 3  # retransmitted (Timer E) before giving up
        pending = asyncio.create_task(app.agent.request(options(("127.0.0.2", answering.port)), ("127.0.0.2", answering.port)))
        request = await answering.request("OPTIONS")
        answering.send(serialize(response_to(request, 180)), (host, port))
        answering.send(serialize(response_to(request, 200)), (host, port))
        response = await asyncio.wait_for(pending, 5)
        assert response is not None and response.status == 200


async def test_unknown_number_gets_404(tmp_path: Path) -> None:
    async with running(tmp_path) as app, peer_at("127.0.0.2") as carrier:
        _, response = await call(app, carrier, number="999")
        assert response.status == 404
        assert app.agent is not None and app.agent.core.calls == []


async def test_digest_trunk_is_challenged_then_accepted(tmp_path: Path) -> None:
    async with running(tmp_path) as app, peer_at("127.0.0.3") as sbc:
        dialer, challenge = await call(app, sbc)
        assert challenge.status == 401
        offered = challenge.headers.get_all("WWW-Authenticate")
        assert any("algorithm=SHA-256" in v for v in offered) and any("algorithm=MD5" in v for v in offered)
        assert app.agent is not None and app.agent.core.calls == []
        for password, expected in (("wrong", 403), ("in-secret", 200)):
            client = DigestClient("sbc-in", password)
            client.accept(pick_challenge(offered))  # type: ignore[arg-type]
            dialer.cseq += 1
            dialer.invite(rtp_port=4000, extra=f"Authorization: {client.authorization('INVITE', dialer.request_uri)}\r\n")
            response = await final(sbc)
            dialer.ack(to_tag(response), for_error=response.status >= 300)
            assert response.status == expected
        await until(lambda: [(c.trunk, c.line) for c in app.agent.core.calls] == [("sbc", "general")])  # type: ignore[union-attr]


async def test_trunk_over_its_call_limit_gets_503(tmp_path: Path) -> None:
    async with running(tmp_path) as app, peer_at("127.0.0.6") as small:
        _, first = await call(app, small)
        _, second = await call(app, small, number="200")
        assert (first.status, second.status) == (200, 503)
        assert second.headers.get("Retry-After") == "30"


async def test_full_line_gets_486_while_other_lines_take_calls(tmp_path: Path) -> None:
    lines = [{"name": "general", "numbers": ["100"], "max_calls": 1}, {"name": "language", "numbers": ["200"]}]
    async with running(tmp_path, lines=lines) as app, peer_at("127.0.0.2") as carrier:
        statuses = [(await call(app, carrier, number))[1].status for number in ("100", "100", "200")]
        assert statuses == [200, 486, 200]


def cli(data_dir: Path, *args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "voiceline", *args, "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


async def until_status(app: VoiceLine, host: str, wanted: int, number: str = "100", seconds: float = 5.0) -> int:
    """Call from `host` until the final status is `wanted` (the server applies changes within its poll interval)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    status = 0
    async with peer_at(host) as peer:
        while loop.time() < end:
            dialer, response = await call(app, peer, number)
            status = response.status
            if status == 200:
                dialer.in_dialog("BYE")
                await peer.response(method="BYE")
            if status == wanted:
                return status
            await asyncio.sleep(0.2)
    return status


async def test_trunks_and_lines_changed_by_the_cli_apply_without_restart(tmp_path: Path) -> None:
    async with running(tmp_path) as app:
        data_dir = tmp_path / "data"
        assert await until_status(app, "127.0.0.7", 403, seconds=1) == 403
        await asyncio.to_thread(cli, data_dir, "trunk", "add", "newcomer", "--source", "127.0.0.7")
        assert await until_status(app, "127.0.0.7", 200) == 200
        # A new line and its number; before, the number is unknown.
        assert await until_status(app, "127.0.0.7", 404, number="300", seconds=1) == 404
        await asyncio.to_thread(cli, data_dir, "line", "add", "night", "--number", "300")
        assert await until_status(app, "127.0.0.7", 200, number="300") == 200
        await asyncio.to_thread(cli, data_dir, "trunk", "disable", "newcomer")
        assert await until_status(app, "127.0.0.7", 403) == 403
        await asyncio.to_thread(cli, data_dir, "trunk", "enable", "newcomer")
        assert await until_status(app, "127.0.0.7", 200) == 200
        await asyncio.to_thread(cli, data_dir, "trunk", "remove", "newcomer")
        assert await until_status(app, "127.0.0.7", 403) == 403
        assert app.agent is not None and app.agent.core.calls == []


async def test_a_call_keeps_its_dialog_when_its_trunk_goes_away(tmp_path: Path) -> None:
    """Removing a trunk stops new calls from it; a call already up still hangs up normally from its own peer."""
    async with running(tmp_path) as app, peer_at("127.0.0.7") as carrier:
        data_dir = tmp_path / "data"
        await asyncio.to_thread(cli, data_dir, "trunk", "add", "leaving", "--source", "127.0.0.7")
        assert await until_status(app, "127.0.0.7", 200) == 200
        dialer, answered = await call(app, carrier)
        assert answered.status == 200
        await asyncio.to_thread(cli, data_dir, "trunk", "remove", "leaving")
        assert await until_status(app, "127.0.0.7", 403) == 403  # the trunk is gone for new calls
        assert app.agent is not None and len(app.agent.core.calls) == 1
        dialer.in_dialog("BYE")
        assert (await carrier.response(method="BYE")).status == 200
        assert app.agent.core.calls == []


@pytest.mark.interop
async def test_sipp_authenticates_with_md5_on_a_trunk_that_offers_it(tmp_path: Path) -> None:
    """An independent digest client (SIPp, MD5 only) gets through a trunk configured for MD5."""
    md5_only = [{**TRUNKS[1], "auth_algorithms": ["MD5"]}]
    async with running(tmp_path, md5_only) as app:
        host, port = address(app)
        scenario = Path(__file__).parent / "sipp" / "uac_digest.xml"
        sipp = await asyncio.to_thread(
            subprocess.run,
            ["sipp", f"{host}:{port}", *("-i", "127.0.0.3", "-p", "0", "-mi", "127.0.0.3", "-mp", "0", "-s", "200"),
             *("-au", "sbc-in", "-ap", "in-secret", "-sf", str(scenario), "-m", "1"),
             # The digest uri must be the Request-URI; SIPp would sign sip:host:port by default (it adds "sip:").
             *("-auth_uri", f"200@{host}:{port}"),
             *("-nostdin", "-timeout", "15s", "-timeout_error")],
            cwd=tmp_path, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert sipp.returncode == 0, sipp.stdout[-2000:]
        assert app.agent is not None and app.agent.counters.calls == 1
        assert app.storage is not None
        await until(app.storage.hourly)
        assert [(r["line"], r["calls"]) for r in await app.storage.hourly()] == [("language", 1)]


def authorization(offered: list[str], password: str, uri: str) -> str:
    client = DigestClient("sbc-in", password)
    client.accept(pick_challenge(offered))  # type: ignore[arg-type]
    return client.authorization("INVITE", uri) or ""


async def test_captured_digest_answer_replayed_with_new_call_ids_and_numbers_is_refused(tmp_path: Path) -> None:
    """Attack 4: a good authenticated INVITE, captured and sent again as new calls to other numbers."""
    trunks = [{**TRUNKS[1], "sources": ["127.0.0.3", "127.0.0.11"]}]
    async with running(tmp_path, trunks) as app, peer_at("127.0.0.3") as sbc, peer_at("127.0.0.11") as neighbour:
        assert app.agent is not None
        dialer, challenge = await call(app, sbc)
        assert challenge.status == 401
        offered = challenge.headers.get_all("WWW-Authenticate")
        captured = authorization(offered, "in-secret", dialer.request_uri)
        dialer.cseq += 1
        dialer.invite(rtp_port=4000, extra=f"Authorization: {captured}\r\n")
        admitted = await final(sbc)
        dialer.ack(to_tag(admitted))
        assert admitted.status == 200
        for number in ("100", "200", "+4930100", "200", "100"):  # new Call-IDs each time
            _, replayed = await call(app, sbc, number, extra=f"Authorization: {captured}\r\n")
            assert replayed.status == 401, number
            assert "stale=true" not in " ".join(replayed.headers.get_all("WWW-Authenticate"))
        # An answer without qop (RFC 2069), right password: this trunk does not take those.
        nonce = parse_digest(offered[-1])["nonce"]
        replay = Dialer(sbc, address(app), to_user="100")
        response = digest_response("MD5", "sbc-in", "voiceline.test", "in-secret", "INVITE", replay.request_uri, nonce)
        old_style = (
            f'Digest username="sbc-in", realm="voiceline.test", nonce="{nonce}", uri="{replay.request_uri}", '
            f'response="{response}", algorithm=MD5'
        )
        replay.invite(rtp_port=4000, extra=f"Authorization: {old_style}\r\n")
        assert (await final(sbc)).status == 401
        # A fresh answer to the nonce 127.0.0.3 was sent, from another address of the same trunk.
        moved = Dialer(neighbour, address(app), to_user="100")
        moved.invite(rtp_port=4000, extra=f"Authorization: {authorization(offered, 'in-secret', moved.request_uri)}\r\n")
        assert (await final(neighbour)).status == 401
        assert len(app.agent.core.calls) == 1 and app.agent.counters.calls == 1
        assert app.trunks is not None and app.trunks.policy.refused["auth_replayed"] == 5


class _TcpDialPeer:
    """A TCP connection standing in for RawPeer under a Dialer: the same requests, over TCP."""

    def __init__(self, tcp: TcpPeer) -> None:
        self.tcp = tcp
        self.port = tcp.port

    def send(self, data: str, dest: tuple[str, int]) -> None:
        self.tcp.send(data.replace("SIP/2.0/UDP", "SIP/2.0/TCP"))

    async def final(self) -> SipResponse:
        while True:
            message = parse_message(await self.tcp.receive())
            if isinstance(message, SipResponse) and message.status >= 200:
                return message


async def invite_over_tcp(app: VoiceLine, host: str) -> int:
    assert app.agent is not None
    tcp = await TcpPeer.connect(app.agent.transports["TCP"].local_address[1], host)
    try:
        peer = _TcpDialPeer(tcp)
        Dialer(peer, address(app), to_user="100").invite(rtp_port=4000)  # type: ignore[arg-type]
        return (await peer.final()).status
    finally:
        tcp.writer.close()


async def test_tcp_from_a_udp_digest_trunk_does_not_fall_through_to_a_broader_trunk(tmp_path: Path) -> None:
    """Attack 5: 127.0.0.3 is a UDP-only digest trunk inside an open UDP+TCP /24; TCP without credentials."""
    trunks = [TRUNKS[1], {"name": "wide", "sources": ["127.0.0.0/24"], "transports": ["udp", "tcp"]}]
    async with running(tmp_path, trunks) as app, peer_at("127.0.0.3") as sbc:
        assert await invite_over_tcp(app, "127.0.0.3") == 403
        assert (await call(app, sbc))[1].status == 401  # over UDP it is the digest trunk, as configured
        assert await invite_over_tcp(app, "127.0.0.12") == 200  # the broad trunk itself takes TCP
        assert app.agent is not None and [c.trunk for c in app.agent.core.calls] == ["wide"]
        assert app.trunks is not None and app.trunks.policy.refused["wrong_transport"] == 1
