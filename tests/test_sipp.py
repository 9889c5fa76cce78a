"""SIPp, an independent SIP stack, places calls against the real server."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

SCENARIOS = Path(__file__).parent / "sipp"


def run_sipp(server: object, tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    sipp = shutil.which("sipp") or "/usr/bin/sipp"
    command = [
        sipp,
        f"{server.host}:{server.port}",  # type: ignore[attr-defined]
        *("-i", "127.0.0.1", "-p", "0", "-mi", "127.0.0.1", "-mp", "0"),
        *("-s", "line", "-nostdin", "-timeout", f"{int(timeout)}s", "-timeout_error"),
        *("-trace_stat", "-stf", str(tmp_path / "stats.csv")),
        *args,
    ]
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
