"""SIPp, an independent SIP stack, places calls against the real server."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

SCENARIOS = Path(__file__).parent / "sipp"


def sipp_command(server: object, tmp_path: Path, *args: str, timeout: float = 60) -> list[str]:
    sipp = shutil.which("sipp") or "/usr/bin/sipp"
    return [
        sipp,
        f"{server.host}:{server.port}",  # type: ignore[attr-defined]
        *("-i", "127.0.0.1", "-p", "0", "-mi", "127.0.0.1", "-mp", "0"),
        *("-s", "line", "-nostdin", "-timeout", f"{int(timeout)}s", "-timeout_error"),
        *("-trace_stat", "-stf", str(tmp_path / "stats.csv")),
        *args,
    ]


def run_sipp(server: object, tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = sipp_command(server, tmp_path, *args, timeout=timeout)
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=timeout + 10)


def stat(tmp_path: Path, column: str) -> int:
    """A cumulative counter from the last row of SIPp's statistics file."""
    header, *rows = (tmp_path / "stats.csv").read_text().splitlines()
    names = header.split(";")
    return int(rows[-1].split(";")[names.index(column)])


def test_builtin_uac_completes_20_calls(voiceline_server: Callable[..., object], tmp_path: Path) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.05}})
    result = run_sipp(server, tmp_path, "-sn", "uac", "-m", "20", "-r", "10", "-d", "200", "-l", "10")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert stat(tmp_path, "SuccessfulCall(C)") == 20
    assert stat(tmp_path, "FailedCall(C)") == 0
    # SIPp may exit between our 200 to its last BYE and the log line after it: read the whole log.
    assert server.stop() == 0  # type: ignore[attr-defined]
    events = [e["event"] for e in server.log_events()]  # type: ignore[attr-defined]
    assert events.count("call.confirmed") == 20 and events.count("call.ended") == 20


def test_cancel_while_ringing_gets_487(voiceline_server: Callable[..., object], tmp_path: Path) -> None:
    server = voiceline_server({"sip": {"answer_delay": 3.0}})
    result = run_sipp(server, tmp_path, "-sf", str(SCENARIOS / "uac_cancel.xml"), "-m", "3", "-r", "3")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert stat(tmp_path, "SuccessfulCall(C)") == 3
    ended = [e for e in server.log_events() if e["event"] == "call.ended"]  # type: ignore[attr-defined]
    assert [e["reason"] for e in ended] == ["cancelled"] * 3


def run_scenario(server: object, tmp_path: Path, scenario: str, *args: str, timeout: float = 60) -> None:
    """Run one scenario file; every call must succeed."""
    result = run_sipp(server, tmp_path, "-sf", str(SCENARIOS / scenario), *args, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert stat(tmp_path, "FailedCall(C)") == 0


def ended_reasons(server: object) -> list[str]:
    return [e["reason"] for e in server.log_events() if e["event"] == "call.ended"]  # type: ignore[attr-defined]


def test_basic_call_with_caller_bye(voiceline_server: Callable[..., object], tmp_path: Path) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.05}})
    run_scenario(server, tmp_path, "uac_basic.xml", "-m", "3", "-r", "3")
    assert stat(tmp_path, "SuccessfulCall(C)") == 3
    assert ended_reasons(server) == ["caller hung up"] * 3


def test_server_bye_at_maximum_call_duration(voiceline_server: Callable[..., object], tmp_path: Path) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.05, "max_call_duration": 1.0}})
    run_scenario(server, tmp_path, "uac_server_bye.xml", "-m", "2", "-r", "2")
    assert stat(tmp_path, "SuccessfulCall(C)") == 2
    assert ended_reasons(server) == ["maximum duration"] * 2


def test_hold_and_resume_by_reinvite(voiceline_server: Callable[..., object], tmp_path: Path) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.05}})
    run_scenario(server, tmp_path, "uac_hold_resume.xml", "-m", "2", "-r", "2")
    assert stat(tmp_path, "SuccessfulCall(C)") == 2
    events = server.log_events()  # type: ignore[attr-defined]
    changes = [e["on_hold"] for e in events if e["event"] == "call.media_changed"]
    assert changes == [True, False, True, False] or sorted(changes) == [False, False, True, True]
    assert [e["event"] for e in events].count("pairing.held") == 2


def test_session_timer_refreshed_by_the_caller(voiceline_server: Callable[..., object], tmp_path: Path) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.05}})
    run_scenario(server, tmp_path, "uac_timer_refresher.xml", "-m", "1")
    assert stat(tmp_path, "SuccessfulCall(C)") == 1
    assert ended_reasons(server) == ["caller hung up"]


def test_session_timer_refreshed_by_us(voiceline_server: Callable[..., object], tmp_path: Path) -> None:
    # A 4 s session: we refresh every 2 s with re-INVITE (SIPp allows no UPDATE); SIPp answers two.
    server = voiceline_server({"sip": {"answer_delay": 0.05, "session_expires": 4, "min_session_expires": 1}})
    run_scenario(server, tmp_path, "uac_timer_refreshee.xml", "-m", "1")
    assert stat(tmp_path, "SuccessfulCall(C)") == 1
    events = [e["event"] for e in server.log_events()]  # type: ignore[attr-defined]
    assert events.count("call.refresh") >= 2 and "call.session_expired" not in events


def test_lost_ack_retransmits_200_then_sends_bye(voiceline_server: Callable[..., object], tmp_path: Path) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.05, "t1": 0.05}})  # Timer H = 64 * T1 = 3.2 s
    run_scenario(server, tmp_path, "uac_lost_ack.xml", "-m", "1", "-trace_msg")
    assert stat(tmp_path, "SuccessfulCall(C)") == 1
    [trace] = tmp_path.glob("*_messages.log")
    oks = [line for line in trace.read_text(errors="replace").splitlines() if line.startswith("SIP/2.0 200 OK")]
    assert len(oks) >= 5  # the 200 and its retransmissions (Timer G: 0.05, 0.15, 0.35, 0.75 s ...) before the BYE
    assert ended_reasons(server) == ["no ACK"]


def test_burst_of_100_calls_at_20_per_second(voiceline_server: Callable[..., object], tmp_path: Path) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.05}})
    run_scenario(server, tmp_path, "uac_basic.xml", "-m", "100", "-r", "20", "-l", "100", timeout=90)
    assert stat(tmp_path, "SuccessfulCall(C)") == 100
    events = [e["event"] for e in server.log_events()]  # type: ignore[attr-defined]
    assert events.count("call.confirmed") == 100 and events.count("call.ended") == 100


def test_drain_refuses_new_calls_and_ends_the_rest_at_the_drain_timeout(
    voiceline_server: Callable[..., object], tmp_path: Path
) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.05, "drain_timeout": 2.0}})
    ongoing_dir, refused_dir = tmp_path / "ongoing", tmp_path / "refused"
    ongoing_dir.mkdir()
    refused_dir.mkdir()
    ongoing = subprocess.Popen(
        sipp_command(server, ongoing_dir, "-sf", str(SCENARIOS / "uac_server_bye.xml"), "-m", "1", timeout=30),
        cwd=ongoing_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        server.wait_for_event("call.confirmed", timeout=10.0)  # type: ignore[attr-defined]
        drain = subprocess.run(
            [sys.executable, "-m", "voiceline", "drain", "--data-dir", str(server.data_dir)],  # type: ignore[attr-defined]
            capture_output=True, text=True, timeout=30,
        )
        assert drain.returncode == 0, drain.stderr
        server.wait_for_event("sip.draining")  # type: ignore[attr-defined]
        run_scenario(server, refused_dir, "uac_refused.xml", "-m", "1")  # 503 with Retry-After
        assert stat(refused_dir, "SuccessfulCall(C)") == 1
        assert ongoing.poll() is None  # the call in progress goes on ...
        assert ongoing.wait(timeout=15) == 0  # ... until the drain timeout: BYE, answered by SIPp
        assert server.process.wait(timeout=15) == 0  # type: ignore[attr-defined]
    finally:
        if ongoing.poll() is None:
            ongoing.kill()
            ongoing.wait()
    events = server.log_events()  # type: ignore[attr-defined]
    names = [e["event"] for e in events]
    assert "sip.draining" in names and "service.drained" in names
    assert ended_reasons(server) == ["service stopping"]
    assert (server.data_dir / "voiceline.lock").read_text() == ""  # type: ignore[attr-defined]  # no pid outlives it
