"""An INVITE flood from one source: the server stays responsive and a call from elsewhere completes."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rawsip import OFFER
from test_end_to_end import A_HZ, assert_hold_audio
from voiceline.sim.runner import CallSpec, run_calls
from voiceline.sip.transaction import Timers

pytestmark = pytest.mark.interop

FLOOD_RATE = 2000  # INVITEs per second
FLOOD_SECONDS = 5.0
FLOOD_SOURCE = "127.0.0.1"
CALLER_SOURCE = "127.0.0.2"
PROBE_SOURCE = "127.0.0.3"
# The server's per-source INVITE limit in this test.
INVITE_RATE, INVITE_BURST = 2.0, 5


def flood_invite(server: tuple[str, int], port: int) -> bytes:
    body = OFFER.format(port=9, formats="0", direction="sendrecv")  # discard port: these calls never get media
    return (
        f"INVITE sip:line@{server[0]}:{server[1]} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {FLOOD_SOURCE}:{port};branch=z9hG4bK{secrets.token_hex(8)};rport\r\n"
        f"From: <sip:flood@{FLOOD_SOURCE}>;tag={secrets.token_hex(4)}\r\nTo: <sip:line@{server[0]}>\r\n"
        f"Call-ID: {secrets.token_hex(8)}\r\nCSeq: 1 INVITE\r\nContact: <sip:flood@{FLOOD_SOURCE}:{port}>\r\n"
        f"Max-Forwards: 70\r\nContent-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


def flood(server: tuple[str, int], stop: threading.Event) -> int:
    """Send FLOOD_RATE INVITEs a second (in 10 ms batches) for FLOOD_SECONDS; return how many went out."""
    sent = 0
    batch = FLOOD_RATE // 100
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((FLOOD_SOURCE, 0))
        port = sock.getsockname()[1]
        start = time.monotonic()
        for tick in range(int(FLOOD_SECONDS * 100)):
            if stop.is_set():
                break
            for _ in range(batch):
                sock.sendto(flood_invite(server, port), server)
                sent += 1
            delay = start + (tick + 1) / 100 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    return sent


def options_answered(server: tuple[str, int], timeout: float = Timers().t2) -> bool:
    """Whether an OPTIONS from PROBE_SOURCE is answered within `timeout`, sent again after T1, then
    twice as long, as a UDP client does (RFC 3261 Timer E). The server answers within milliseconds
    while it gets the CPU; on a starved machine the flood's backlog in its socket buffer (4 MB,
    seconds of flood) delays the probe behind it, and a full buffer drops datagrams whoever sent them."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((PROBE_SOURCE, 0))
        port = sock.getsockname()[1]
        branch = f"z9hG4bK{secrets.token_hex(8)}"
        request = (
            f"OPTIONS sip:line@{server[0]}:{server[1]} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {PROBE_SOURCE}:{port};branch={branch};rport\r\n"
            f"From: <sip:probe@{PROBE_SOURCE}>;tag=1\r\nTo: <sip:line@{server[0]}>\r\n"
            f"Call-ID: {secrets.token_hex(8)}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        deadline = time.monotonic() + timeout
        interval = Timers().t1
        while (left := deadline - time.monotonic()) > 0:
            sock.sendto(request, server)
            sock.settimeout(min(interval, left))
            interval *= 2
            try:
                while True:
                    data = sock.recv(65535)
                    if branch.encode() in data and data.startswith(b"SIP/2.0 200"):
                        return True
            except TimeoutError:
                continue
        return False


def test_invite_flood_from_one_source(voiceline_server: Callable[..., object], tmp_path: Path) -> None:
    server = voiceline_server(
        {"sip": {"answer_delay": 0.1, "invite_rate": INVITE_RATE, "invite_burst": INVITE_BURST}}
    )
    address = (server.host, server.port)  # type: ignore[attr-defined]
    stop = threading.Event()
    caller = CallSpec(server.uri("line"), tone_hz=A_HZ, seconds=2.5, start_after=1.0)  # type: ignore[attr-defined]
    with ThreadPoolExecutor(max_workers=2) as pool:
        flooding = pool.submit(flood, address, stop)
        placing = pool.submit(
            run_calls, [caller], record_dir=tmp_path / "sim", bind_host=CALLER_SOURCE, timeout=30.0
        )
        try:
            probes = []
            while not flooding.done():
                probes.append(options_answered(address))
                time.sleep(0.3)
            sent = flooding.result()
            (report,) = placing.result(timeout=40)
        finally:
            stop.set()
    assert sent == FLOOD_RATE * FLOOD_SECONDS
    assert len(probes) >= 3 and all(probes), probes
    assert report.final_status == 200 and report.connected and report.media_started, report
    assert_hold_audio(report, 0.3, 2.2, not_hz=(A_HZ,))  # alone in the pool: it hears hold audio
    assert server.process.poll() is None  # type: ignore[attr-defined]
    assert server.stop() == 0  # type: ignore[attr-defined]
    events = server.log_events()  # type: ignore[attr-defined]
    # The limit let through the burst and the rate, plus the one real caller; nothing more became a call.
    offered = [e for e in events if e["event"] == "call.offered"]
    assert len(offered) <= INVITE_BURST + INVITE_RATE * (FLOOD_SECONDS + 2) + 1
    (totals,) = [e for e in events if e["event"] == "sip.totals"]
    assert totals["rate_limited"] >= sent * 0.8 and totals["rejected"] <= FLOOD_SECONDS / 5 + 2
    assert any(e["event"] == "sip.overload" for e in events)
