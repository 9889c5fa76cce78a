"""Calls we place, through the call core's asyncio edge on loopback, to SIPp acting as the callee.

Answered (and ended by us or by the callee), challenged then answered, refused
(486), cancelled while ringing, and transferred by our REFER (a carrier accepting it): each against an independent SIP stack,
whose own scenario checks what we send (SIPp fails a call on a message it
did not expect).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from voiceline.sip.auth import DigestClient
from voiceline.sip.core import CoreSettings
from voiceline.sip.events import Answered, CallEnded, Cancelled, Refused, Ringing, TimedOut, TransferProgress, Transferred
from voiceline.sip.transaction import Timers
from voiceline.sip.transport import open_udp
from voiceline.sip.useragent import OutboundCall, UserAgent

from port_table import port_block
from test_sim_caller import quick_built_in

pytestmark = pytest.mark.interop

SCENARIOS = Path(__file__).parent / "sipp"
HOST = "127.0.0.1"
_first, _last = port_block("test_client_invite")
_ports = iter(range(_first, _last - 4, 4))  # this file's SIP ports (ours, SIPp's)
OUR_RTP_PORT = _last  # only named in our SDP: SIPp sends no media in these scenarios


class Callee:
    """A SIPp UAS process, run for one call."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, tmp_path: Path) -> None:
        self.process = process
        self.port = port
        self.tmp_path = tmp_path

    @classmethod
    async def start(cls, started: list[Callee], tmp_path: Path, port: int, *scenario: str) -> Callee:
        sipp = shutil.which("sipp") or "/usr/bin/sipp"
        process = await asyncio.create_subprocess_exec(
            sipp, *scenario, "-i", HOST, "-p", str(port), "-m", "1", "-nostdin",
            "-timeout", "20s", "-timeout_error", "-trace_err", "-trace_msg",
            cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        callee = cls(process, port, tmp_path)
        started.append(callee)
        return callee

    @property
    def uri(self) -> str:
        return f"sip:help@{HOST}:{self.port}"

    async def finished(self) -> int:
        """SIPp's exit status: 0 when its one call went as the scenario says."""
        await asyncio.wait_for(self.process.wait(), 25)
        return self.process.returncode or 0

    def errors(self) -> str:
        return "".join(path.read_text(errors="replace") for path in self.tmp_path.glob("*_errors.log"))


@pytest.fixture
async def callees() -> AsyncIterator[list[Callee]]:
    """The SIPp processes a test starts: none outlives it, whatever the test's outcome."""
    started: list[Callee] = []
    yield started
    for callee in started:
        if callee.process.returncode is None:
            callee.process.kill()
            await callee.process.wait()


@pytest.fixture
async def agent() -> AsyncIterator[tuple[UserAgent, int]]:
    """Our user agent on UDP, with a short T1 so no scenario waits long on a retransmission."""
    port = next(_ports)
    agent = UserAgent(CoreSettings(HOST, timers=Timers(t1=0.1)))
    transport = await open_udp(HOST, port, agent.message_received)
    agent.attach(transport)
    try:
        yield agent, port + 1
    finally:
        await agent.shutdown(timeout=1.0)
        transport.close()


async def place(agent: UserAgent, callee: Callee, **options: object) -> OutboundCall:
    return agent.invite(callee.uri, (HOST, callee.port), OUR_RTP_PORT, **options)  # type: ignore[arg-type]


async def test_answered_and_ended_by_us(agent: tuple[UserAgent, int], callees: list[Callee], tmp_path: Path) -> None:
    ua, sipp_port = agent
    uas = tmp_path / "uas.xml"
    uas.write_text(quick_built_in(shutil.which("sipp") or "sipp", "uas"))
    callee = await Callee.start(callees, tmp_path, sipp_port, "-sf", str(uas))
    call = await place(ua, callee)
    answered = await asyncio.wait_for(call.outcome, 10)
    assert isinstance(answered, Answered) and answered.call.media is not None
    assert answered.call.media.remote[0] == HOST and answered.call.media.codec.name == "PCMU"
    ua.hangup(call.id, "done")
    ended = await asyncio.wait_for(call.ended, 5)
    assert ended.reason == "done"
    assert await callee.finished() == 0, callee.errors()
    assert ua.calls == []


async def test_answered_and_ended_by_the_callee(agent: tuple[UserAgent, int], callees: list[Callee], tmp_path: Path) -> None:
    ua, sipp_port = agent
    callee = await Callee.start(callees, tmp_path, sipp_port, "-sf", str(SCENARIOS / "uas_bye.xml"))
    call = await place(ua, callee)
    assert isinstance(await asyncio.wait_for(call.outcome, 10), Answered)
    ended = await asyncio.wait_for(call.ended, 10)
    assert isinstance(ended, CallEnded) and ended.reason == "peer hung up"
    assert await callee.finished() == 0, callee.errors()  # it got our 200 for its BYE


async def test_challenged_then_answered(agent: tuple[UserAgent, int], callees: list[Callee], tmp_path: Path) -> None:
    ua, sipp_port = agent
    callee = await Callee.start(callees, tmp_path, sipp_port, "-sf", str(SCENARIOS / "uas_digest.xml"))
    call = await place(ua, callee, credentials=DigestClient("alice", "secret"))
    outcome = await asyncio.wait_for(call.outcome, 10)
    assert isinstance(outcome, Answered), outcome  # SIPp answers 403 when our digest is wrong
    ua.hangup(call.id, "done")
    await asyncio.wait_for(call.ended, 5)
    assert await callee.finished() == 0, callee.errors()


async def test_wrong_credentials_are_refused(agent: tuple[UserAgent, int], callees: list[Callee], tmp_path: Path) -> None:
    ua, sipp_port = agent
    callee = await Callee.start(callees, tmp_path, sipp_port, "-sf", str(SCENARIOS / "uas_digest.xml"))
    call = await place(ua, callee, credentials=DigestClient("alice", "wrong"))
    assert await asyncio.wait_for(call.outcome, 10) == Refused(call.id, 403)
    assert await callee.finished() == 0, callee.errors()


async def test_refused_busy(agent: tuple[UserAgent, int], callees: list[Callee], tmp_path: Path) -> None:
    ua, sipp_port = agent
    callee = await Callee.start(callees, tmp_path, sipp_port, "-sf", str(SCENARIOS / "uas_busy.xml"))
    call = await place(ua, callee)
    assert await asyncio.wait_for(call.outcome, 10) == Refused(call.id, 486)
    assert await callee.finished() == 0, callee.errors()  # it got our ACK for the 486
    assert ua.calls == []


async def test_cancelled_while_ringing(agent: tuple[UserAgent, int], callees: list[Callee], tmp_path: Path) -> None:
    ua, sipp_port = agent
    callee = await Callee.start(callees, tmp_path, sipp_port, "-sf", str(SCENARIOS / "uas_ring_forever.xml"))
    call = await place(ua, callee)
    assert await asyncio.wait_for(call.events.get(), 10) == Ringing(call.id, 180)
    ua.hangup(call.id, "caller gave up")
    assert await asyncio.wait_for(call.outcome, 10) == Cancelled(call.id)
    assert await callee.finished() == 0, callee.errors()  # CANCEL, 200, 487 and our ACK, as scripted


async def test_ringing_past_the_ring_timeout_is_cancelled(agent: tuple[UserAgent, int], callees: list[Callee], tmp_path: Path) -> None:
    ua, sipp_port = agent
    callee = await Callee.start(callees, tmp_path, sipp_port, "-sf", str(SCENARIOS / "uas_ring_forever.xml"))
    call = await place(ua, callee, ring_timeout=0.5)
    outcome = await asyncio.wait_for(call.outcome, 10)
    assert outcome == TimedOut(call.id)
    assert await callee.finished() == 0, callee.errors()


async def test_a_refer_the_callee_accepts_and_reports_answered(
    agent: tuple[UserAgent, int], callees: list[Callee], tmp_path: Path
) -> None:
    ua, sipp_port = agent
    callee = await Callee.start(callees, tmp_path, sipp_port, "-sf", str(SCENARIOS / "uas_refer.xml"))
    call = await place(ua, callee)
    assert isinstance(await asyncio.wait_for(call.outcome, 10), Answered)
    transfer = ua.refer(call.id, f"sip:help@{HOST}:{sipp_port + 2}")
    assert transfer is not None
    assert await asyncio.wait_for(transfer.progress.get(), 10) == TransferProgress(call.id, 202)
    assert await asyncio.wait_for(transfer.progress.get(), 10) == TransferProgress(call.id, 180)
    assert await asyncio.wait_for(transfer.outcome, 10) == Transferred(call.id)
    ua.hangup(call.id, "transferred")
    await asyncio.wait_for(call.ended, 5)
    assert await callee.finished() == 0, callee.errors()  # Refer-To as asked, no Referred-By, our 200s


async def test_a_help_call_says_nothing_of_anyone(agent: tuple[UserAgent, int], callees: list[Callee], tmp_path: Path) -> None:
    ua, sipp_port = agent
    callee = await Callee.start(callees, tmp_path, sipp_port, "-sf", str(SCENARIOS / "uas_busy_anonymous.xml"))
    call = await place(ua, callee, assert_identity_of="c-no-such-call")  # asked for nobody's identity: none goes
    assert await asyncio.wait_for(call.outcome, 10) == Refused(call.id, 486)
    assert await callee.finished() == 0, callee.errors()  # anonymous From, Privacy: id, no asserted identity
