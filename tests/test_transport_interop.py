"""Independent SIP stacks over TCP and TLS: pjsua2 callers talk (audio checked by content), SIPp calls."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from test_end_to_end import A_HZ, B_HZ, CONNECTED_AFTER, assert_hears
from test_sipp import run_sipp, stat
from voiceline.sim.plugin import self_signed_certificate
from voiceline.sim.runner import CallReport, CallSpec

pytestmark = pytest.mark.interop


def tls_overrides(tmp_path: Path) -> dict[str, dict[str, object]]:
    certificate, key = self_signed_certificate(tmp_path / "tls")
    return {
        "sip": {
            "answer_delay": 0.1,
            "listen_tls": "127.0.0.1:0",
            "tls_certificate": str(certificate),
            "tls_private_key": str(key),
        }
    }


def test_tcp_and_tls_callers_are_paired_and_hear_each_other(
    voiceline_server: Callable[..., object], sim_calls: Callable[..., list[CallReport]], tmp_path: Path
) -> None:
    server = voiceline_server(tls_overrides(tmp_path))
    a, b = sim_calls(
        [
            CallSpec(server.uri("line", "tcp"), tone_hz=A_HZ, seconds=CONNECTED_AFTER + 4.5, transport="tcp"),  # type: ignore[attr-defined]
            CallSpec(server.uri("line", "tls"), tone_hz=B_HZ, seconds=CONNECTED_AFTER + 4.0, start_after=0.3, transport="tls"),  # type: ignore[attr-defined]
        ],
        tls_ca_file=tmp_path / "tls" / "cert.pem",  # the callers verify the server's certificate
    )
    for report in (a, b):
        assert report.final_status == 200 and report.connected and report.media_started, report
        assert report.error is None
    joined = b.connected_at - a.connected_at
    assert_hears(a, B_HZ, A_HZ, joined + CONNECTED_AFTER, joined + CONNECTED_AFTER + 2.7)
    assert_hears(b, A_HZ, B_HZ, CONNECTED_AFTER, CONNECTED_AFTER + 2.7)
    # The calls really used the stream transports: the server's connections counted them at shutdown.
    assert server.stop() == 0  # type: ignore[attr-defined]
    accepted = {
        e["transport"]: e["accepted"]
        for e in server.log_events()  # type: ignore[attr-defined]
        if e["event"] == "sip.connections"
    }
    assert accepted["tcp"] >= 1 and accepted["tls"] >= 1, accepted


def test_server_bye_reaches_a_tcp_caller_over_its_connection(
    voiceline_server: Callable[..., object], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.1}})
    spec = CallSpec(server.uri("line", "tcp"), tone_hz=A_HZ, seconds=30.0, transport="tcp")  # type: ignore[attr-defined]
    with ThreadPoolExecutor(max_workers=1) as pool:
        placing = pool.submit(sim_calls, [spec], 45.0)
        server.wait_for_event("call.confirmed")  # type: ignore[attr-defined]
        assert server.stop() == 0  # type: ignore[attr-defined]
        (report,) = placing.result(timeout=40)
    assert report.connected and report.hangup_by == "remote", report
    assert report.disconnected_at - report.connected_at < 15


def test_sipp_basic_call_over_tcp(voiceline_server: Callable[..., object], tmp_path: Path) -> None:
    server = voiceline_server({"sip": {"answer_delay": 0.05}})
    result = run_sipp(
        server, tmp_path, "-t", "t1", "-sn", "uac", "-m", "10", "-r", "5", "-d", "200", "-l", "5", timeout=40
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert stat(tmp_path, "SuccessfulCall(C)") == 10
    assert stat(tmp_path, "FailedCall(C)") == 0
    assert server.stop() == 0  # type: ignore[attr-defined]  # the whole log, as in test_sipp
    events = [e["event"] for e in server.log_events()]  # type: ignore[attr-defined]
    assert events.count("call.confirmed") == 10 and events.count("call.ended") == 10
