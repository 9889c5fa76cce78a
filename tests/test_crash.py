"""After a crash: `voiceline serve` killed with -9 while calls are up, then started again on the
same data dir and ports. The calls that were up are counted once, their callers' requests get
481 and are counted as orphans, new calls are taken at once and the trunk registers again at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from port_table import port_block
from rawsip import Dialer, RawPeer, to_tag
from voiceline.sim.plugin import VoicelineServer, default_server_rtp_ports, start_server
from voiceline.sip.message import SipRequest, response_to, serialize
from voiceline.storage import DB_NAME
from waiting import until

pytestmark = pytest.mark.integration

SIP_PORT = port_block("test_crash")[0]  # the same for both processes: the callers' requests reach the second
SDP_PORT = port_block("test_crash")[0] + 1  # named in our offers, bound by nobody
CALLS_UP = 4
CALLER = "+15550100987"  # a number that must not reach the restarted service's log


class Registrar:
    """A registrar on loopback: answers every REGISTER with 200 and notes when each came."""

    def __init__(self, peer: RawPeer) -> None:
        self.peer = peer
        self.arrivals: list[float] = []

    @property
    def uri(self) -> str:
        return f"sip:127.0.0.1:{self.peer.port}"

    async def answer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            request = await self.peer.request("REGISTER", timeout=3600)
            assert isinstance(request, SipRequest)
            self.arrivals.append(loop.time())
            contact = f"{request.headers.get('Contact')};expires=600"
            ok = response_to(request, 200, "OK", to_tag="registrar", headers=[("Contact", contact)])
            via = request.headers.get("Via") or ""
            host_port = via.split()[1].split(";")[0]
            host, _, port = host_port.rpartition(":")
            self.peer.send(serialize(ok), (host, int(port)))


@contextlib.asynccontextmanager
async def registrar() -> AsyncIterator[Registrar]:
    registrar = Registrar(await RawPeer.open())
    answering = asyncio.get_running_loop().create_task(registrar.answer())
    try:
        yield registrar
    finally:
        answering.cancel()
        await asyncio.gather(answering, return_exceptions=True)
        registrar.peer.close()


def calls_counted(data_dir: Path) -> int:
    with contextlib.closing(sqlite3.connect(data_dir / DB_NAME)) as db:
        return int(db.execute("SELECT coalesce(sum(calls), 0) FROM hourly_stats").fetchone()[0])


def status(data_dir: Path) -> dict[str, Any]:
    """What `voiceline status --json` says."""
    result = subprocess.run(
        [sys.executable, "-m", "voiceline", "status", "--json", "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def registration_state(data_dir: Path) -> object:
    return status(data_dir)["trunks"]["loopback"]["registration"]


def stored_registration(data_dir: Path) -> str:
    with contextlib.closing(sqlite3.connect(data_dir / DB_NAME)) as db:
        return str(db.execute("SELECT state FROM registration_status WHERE trunk = 'loopback'").fetchone()[0])


async def answered_call(peer: RawPeer, server: tuple[str, int]) -> Dialer:
    dialer = Dialer(peer, server, from_user=CALLER)
    dialer.invite(rtp_port=SDP_PORT)
    ok = await peer.response(status=200, timeout=5)
    dialer.ack(to_tag(ok))
    return dialer


async def test_after_kill_9_calls_up_are_counted_once_their_byes_are_orphans_and_service_resumes_at_once(
    tmp_path: Path,
) -> None:
    async with registrar() as carrier:
        overrides = {
            "sip": {"answer_delay": 0.0},
            "storage": {"flush_interval": 0.1},
            "trunks": [{
                "name": "loopback", "sources": ["127.0.0.0/8"], "transports": ["udp", "tcp"],
                "registration": {"registrar": carrier.uri, "username": "voiceline", "password": "pw", "expiry": 600},
            }],
        }  # fmt: skip
        rtp_ports = default_server_rtp_ports()
        first = await asyncio.to_thread(start_server, tmp_path / "node", overrides, SIP_PORT, rtp_ports)
        server = (first.host, SIP_PORT)
        callers = [await RawPeer.open() for _ in range(CALLS_UP)]
        second: VoicelineServer | None = None
        try:
            dialers = [await answered_call(peer, server) for peer in callers]
            await until(lambda: registration_state(first.data_dir) == "registered", timeout=10)
            # Counted at answer and written within a flush interval: what a crash cannot lose.
            await until(lambda: calls_counted(first.data_dir) == CALLS_UP, timeout=10)

            first.process.kill()
            await asyncio.to_thread(first.process.wait)
            registered_before = len(carrier.arrivals)
            loop = asyncio.get_running_loop()
            restarted = loop.time()
            second = await asyncio.to_thread(start_server, tmp_path / "node", overrides, SIP_PORT, rtp_ports)
            data_dir = second.data_dir
            [unclean] = [e for e in second.log_events() if e.get("event") == "service.unclean_stop_before"]
            assert unclean["pid"] == first.process.pid

            # The trunk registers again at once (not after a retry interval), and status says so.
            await until(lambda: len(carrier.arrivals) > registered_before, timeout=3)
            assert carrier.arrivals[registered_before] - restarted < 3.0
            await until(lambda: registration_state(data_dir) == "registered", timeout=5)
            await until(lambda: stored_registration(data_dir) == "registered")  # what `voiceline trunk list` shows

            # The callers of the calls that were up hang up, or press a key, or re-INVITE: 481 each.
            for dialer in dialers:
                dialer.in_dialog("BYE")
            dialers[0].in_dialog("INFO", body="Signal=5\r\nDuration=160\r\n", content_type="application/dtmf-relay")
            dialers[1].in_dialog("INVITE", sdp_port=SDP_PORT)
            for peer in callers:
                assert (await peer.response(method="BYE")).status == 481
            assert (await callers[0].response(method="INFO")).status == 481
            assert (await callers[1].response(method="INVITE")).status == 481
            assert status(data_dir)["sip"]["orphans"] == CALLS_UP + 2

            # A new call is taken at once, and ends normally.
            newcomer = await answered_call(callers[2], server)
            newcomer.in_dialog("BYE")
            assert (await callers[2].response(method="BYE")).status == 200
        finally:
            for peer in callers:
                peer.close()
            first.stop()
            if second is not None:
                assert await asyncio.to_thread(second.stop) == 0
        assert second is not None
        # Once each: the calls that were up (counted by the killed process) and the new one.
        assert calls_counted(data_dir) == CALLS_UP + 1
        [totals] = [e for e in second.log_events() if e.get("event") == "sip.totals"]
        assert totals["orphans"] == CALLS_UP + 2
        log = second.log_text()
        assert CALLER not in log and not any(dialer.call_id in log for dialer in dialers)
