"""SDES-SRTP with an independent peer: pjsua2 callers offering RTP/SAVP only, signalling over TLS.

Audio is checked by content (each caller's tone in the other's recording) and
the server's per-call media statistics show each leg really ran SRTP.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from test_end_to_end import A_HZ, B_HZ, CONNECTED_AFTER, assert_hears
from test_transport_interop import tls_overrides
from voiceline.sim.runner import CallReport, CallSpec

pytestmark = pytest.mark.interop


def srtp_server(
    voiceline_server: Callable[..., Any], tmp_path: Path, policy: str
) -> Any:
    overrides = tls_overrides(tmp_path)
    trunk = {"name": "loopback", "sources": ["127.0.0.0/8"], "transports": ["udp", "tcp", "tls"], "srtp": policy}
    return voiceline_server({**overrides, "trunks": [trunk]})


def media_stats(server: Any) -> list[dict[str, Any]]:
    assert server.stop() == 0
    return [e for e in server.log_events() if e["event"] == "call.media_stats"]


def test_two_srtp_callers_over_tls_hear_each_other(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]], tmp_path: Path
) -> None:
    server = srtp_server(voiceline_server, tmp_path, "required")
    target = server.uri("line", "tls")
    a, b = sim_calls(
        [
            CallSpec(target, tone_hz=A_HZ, seconds=CONNECTED_AFTER + 4.5, transport="tls", srtp=True),
            CallSpec(target, tone_hz=B_HZ, seconds=CONNECTED_AFTER + 4.0, start_after=0.3, transport="tls", srtp=True),
        ],
        tls_ca_file=tmp_path / "tls" / "cert.pem",
    )
    for report in (a, b):
        assert report.final_status == 200 and report.connected and report.media_started, report
        assert report.error is None
    joined = b.connected_at - a.connected_at
    assert_hears(a, B_HZ, A_HZ, joined + CONNECTED_AFTER, joined + CONNECTED_AFTER + 2.7)
    assert_hears(b, A_HZ, B_HZ, CONNECTED_AFTER, CONNECTED_AFTER + 2.7)
    stats = media_stats(server)
    assert len(stats) == 2
    for leg in stats:  # both legs were SRTP, and what came in authenticated
        assert leg["srtp_suite"] == "AES_CM_128_HMAC_SHA1_80" and leg["packets_in"] > 100, leg
        assert leg["srtp_auth_failures"] == 0, leg


def test_srtp_caller_talks_with_plain_rtp_caller(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]], tmp_path: Path
) -> None:
    server = srtp_server(voiceline_server, tmp_path, "optional")
    a, b = sim_calls(
        [
            CallSpec(server.uri("line", "tls"), tone_hz=A_HZ, seconds=CONNECTED_AFTER + 4.5, transport="tls", srtp=True),
            CallSpec(server.uri("line"), tone_hz=B_HZ, seconds=CONNECTED_AFTER + 4.0, start_after=0.3),
        ],
        tls_ca_file=tmp_path / "tls" / "cert.pem",
    )
    for report in (a, b):
        assert report.final_status == 200 and report.connected and report.media_started, report
        assert report.error is None
    joined = b.connected_at - a.connected_at
    assert_hears(a, B_HZ, A_HZ, joined + CONNECTED_AFTER, joined + CONNECTED_AFTER + 2.7)
    assert_hears(b, A_HZ, B_HZ, CONNECTED_AFTER, CONNECTED_AFTER + 2.7)
    suites = sorted(str(leg["srtp_suite"]) for leg in media_stats(server))
    assert suites == ["AES_CM_128_HMAC_SHA1_80", "None"]


def test_required_trunk_refuses_a_plain_caller(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]], tmp_path: Path
) -> None:
    server = srtp_server(voiceline_server, tmp_path, "required")
    (report,) = sim_calls([CallSpec(server.uri("line"), tone_hz=A_HZ, seconds=2.0)])
    assert report.final_status == 488 and not report.connected, report
