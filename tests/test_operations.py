"""Seeing the line live: `voiceline status`, the metrics endpoint and the control commands
against a real server with real pjsua2 callers, and the event bus's own rules."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from broker import free_port
from rawsip import Dialer, RawPeer, address, serving
from voiceline.config import Config, MediaConfig, SipConfig, StorageConfig
from voiceline.routing import Line
from voiceline.control import CONTROL_SOCKET, CommandError, request
from voiceline.app import VoiceLine
from voiceline.events import CallEnded, Event, EventBus, LinePaired, RegistrationChanged
from voiceline.metrics import Metrics
from voiceline.sim.runner import CallReport, CallSpec

pytestmark = pytest.mark.integration

TWO_LINES = [{"name": "one", "numbers": ["100"]}, {"name": "two", "numbers": ["200"]}]


def voiceline_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "voiceline", *args], capture_output=True, text=True, timeout=30)


def status_json(data_dir: Path) -> dict[str, Any]:
    done = voiceline_cli("status", "--json", "--data-dir", str(data_dir))
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def wait_for_status(data_dir: Path, wanted: Callable[[dict[str, Any]], bool], timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = status_json(data_dir)
        if wanted(status):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.2)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text `text`; fails when it is absent."""
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name}{labels} not in metrics"
    return float(match.group(1))


def table_row(text: str, first: str) -> list[str]:
    return next(line.split() for line in text.splitlines() if line.split()[:1] == [first])


@pytest.mark.interop
def test_status_and_metrics_show_two_talking_and_two_waiting_on_two_lines(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]]
) -> None:
    metrics_port = free_port()
    server = voiceline_server(
        {"sip": {"answer_delay": 0.1}, "metrics": {"listen": f"127.0.0.1:{metrics_port}"}, "lines": TWO_LINES}
    )
    specs = [
        *(CallSpec(server.uri("100"), tone_hz=697.0, seconds=9.0, start_after=0.4 * i) for i in range(3)),
        CallSpec(server.uri("200"), tone_hz=697.0, seconds=9.0, start_after=1.2),
    ]
    assert http_get(metrics_port, "/readyz") == (200, "ready\n")
    with ThreadPoolExecutor(1) as pool:
        calls = pool.submit(sim_calls, specs)
        # The pair on line one is bridged once both heard the connect cue.
        status = wait_for_status(
            server.data_dir,
            lambda s: s["calls"] == 4 and s["lines"]["two"]["waiting"] == 1 and s["lines"]["one"]["talking"] == 2,
        )
        assert status["lines"] == {
            "one": {"open": True, "waiting": 1, "talking": 2, "in_welcome": 0, "connecting": 0, "ending": 0, "pairs": 1, "longest_wait": status["lines"]["one"]["longest_wait"]},
            "two": {"open": True, "waiting": 1, "talking": 0, "in_welcome": 0, "connecting": 0, "ending": 0, "pairs": 0, "longest_wait": status["lines"]["two"]["longest_wait"]},
        }  # fmt: skip
        assert 0 <= status["lines"]["two"]["longest_wait"] <= 9
        assert status["trunks"]["loopback"]["calls"] == 4 and status["draining"] is False

        table = voiceline_cli("status", "--data-dir", str(server.data_dir))
        assert table.returncode == 0, table.stderr
        assert table_row(table.stdout, "one")[:8] == ["one", "yes", "1", "2", "0", "0", "0", "1"]
        assert table_row(table.stdout, "two")[:8] == ["two", "yes", "1", "0", "0", "0", "0", "0"]
        assert table_row(table.stdout, "loopback")[:3] == ["loopback", "yes", "4"]

        code, text = http_get(metrics_port, "/metrics")
        assert code == 200
        assert metric(text, "voiceline_calls", line="one", state="talking") == 2
        assert metric(text, "voiceline_calls", line="one", state="waiting") == 1
        assert metric(text, "voiceline_calls", line="two", state="waiting") == 1
        assert metric(text, "voiceline_calls_answered_total", line="one") == 3
        assert metric(text, "voiceline_calls_answered_total", line="two") == 1
        assert metric(text, "voiceline_pairs_total", line="one") == 1
        assert metric(text, "voiceline_trunk_calls", trunk="loopback") == 4

        # Drain flips readiness while the calls go on; undoing it takes calls again.
        assert voiceline_cli("drain", "--data-dir", str(server.data_dir)).returncode == 0
        assert http_get(metrics_port, "/readyz")[0] == 503
        assert status_json(server.data_dir)["draining"] is True
        assert voiceline_cli("drain", "--undo", "--data-dir", str(server.data_dir)).returncode == 0
        assert http_get(metrics_port, "/readyz") == (200, "ready\n")
        reports = calls.result(timeout=60)
    assert all(r.connected for r in reports), reports

    wait_for_status(server.data_dir, lambda s: s["calls"] == 0)
    code, text = http_get(metrics_port, "/metrics")
    assert metric(text, "voiceline_calls_ended_total", line="one", reason="caller hung up") == 3
    assert metric(text, "voiceline_calls_ended_total", line="two", reason="caller hung up") == 1
    assert metric(text, "voiceline_wait_seconds_count", line="one") == 3
    assert metric(text, "voiceline_talk_seconds_count", line="one") == 3
    assert metric(text, "voiceline_talk_seconds_sum", line="two") == 0  # alone on its line: never talked
    assert metric(text, "voiceline_rtp_packets_expected_total", line="one") > 3 * 8 * 40  # 50 a second each
    assert metric(text, "voiceline_event_loop_lag_seconds_count") > 0
    assert http_get(metrics_port, "/healthz") == (200, "ok\n")
    assert http_get(metrics_port, "/nothing")[0] == 404


def in_process_config(tmp_path: Path) -> Config:
    low = free_port(22000, 29000) // 2 * 2
    return Config(
        sip=SipConfig(listen="127.0.0.1:0", answer_delay=0.05, shutdown_timeout=1.0),  # unanswered BYEs: 1 s at stop
        media=MediaConfig(rtp_ports=f"{low}-{low + 19}"),
        storage=StorageConfig(data_dir=str(tmp_path / "data")),
    ).validate()


async def test_a_closed_line_refuses_calls_with_480_until_opened(tmp_path: Path) -> None:
    async with serving(in_process_config(tmp_path)) as app:
        socket_path = tmp_path / "data" / CONTROL_SOCKET
        assert socket_path.stat().st_mode & 0o777 == 0o600
        seen: list[Event] = []
        app.ops.bus.subscribe(seen.append)

        def command(name: str, **args: Any) -> Any:
            return asyncio.to_thread(request, socket_path, name, args)

        assert await command("close_line", line="default") == {"line": "default", "open": False}
        peer = await RawPeer.open()
        dialer = Dialer(peer, address(app))
        dialer.invite(rtp_port=4000)
        refused = await peer.response(480)
        assert refused.status == 480
        assert (await command("status"))["lines"]["default"]["open"] is False

        assert await command("open_line", line="default") == {"line": "default", "open": True}
        again = Dialer(peer, address(app))
        again.invite(rtp_port=4000)
        assert (await peer.response(200, timeout=5)).status == 200
        names = [event.name for event in seen]
        assert names[:4] == ["line.closed", "call.offered", "call.refused", "line.opened"], names
        assert names[4] == "call.offered"

        with pytest.raises(CommandError, match="line"):
            await command("close_line", line="no such line")
        with pytest.raises(CommandError, match="unknown command"):
            await command("reboot")


def test_the_bus_survives_a_failing_subscriber() -> None:
    bus = EventBus()
    got: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("subscriber bug")

    bus.subscribe(broken)
    unsubscribe = bus.subscribe(got.append)
    event = LinePaired("one", waiting=0, talking=2)
    bus.emit(event)
    assert got == [event]
    unsubscribe()
    bus.emit(event)
    assert got == [event]


def test_event_json_has_schema_whole_seconds_and_no_partner() -> None:
    ended = CallEnded("c-1", "one", "caller hung up", duration=61, paired=True).to_json(now=1700000000.75)
    assert ended == {
        "schema": 1, "event": "call.ended", "time": 1700000000, "call": "c-1", "line": "one",
        "reason": "caller hung up", "duration": 61, "paired": True,
    }  # fmt: skip
    # A pair's start carries no call id at all: only the line and its counts.
    assert set(LinePaired("one", 0, 2).to_json()) == {"schema", "event", "time", "line", "waiting", "talking"}


async def test_options_answer_503_while_draining_and_200_after_undrain(tmp_path: Path) -> None:
    """What a dispatcher's probe sees: a draining node is out of rotation until undrained."""
    async with serving(in_process_config(tmp_path)) as app:
        peer = await RawPeer.open()

        async def probe() -> int:
            Dialer(peer, address(app)).out_of_dialog("OPTIONS")  # a new Call-ID each time, as probes do
            return (await peer.response(method="OPTIONS")).status

        assert await probe() == 200
        app.request_drain()
        draining = asyncio.get_running_loop().create_task(app.drain(asyncio.Event()))
        await asyncio.sleep(0)  # the drain starts
        assert await probe() == 503
        app.undrain()
        await asyncio.wait_for(draining, 5)
        assert await probe() == 200


async def test_a_disabled_line_refuses_calls_with_480(tmp_path: Path) -> None:
    config = replace(in_process_config(tmp_path), lines=(Line("default", ("*",), enabled=False),))
    async with serving(config) as app:
        assert app.ops.status()["lines"]["default"]["open"] is False
        peer = await RawPeer.open()
        Dialer(peer, address(app)).invite(rtp_port=4000)
        assert (await peer.response(480)).status == 480


def test_status_watch_redraws_until_interrupted(voiceline_server: Callable[..., Any], tmp_path: Path) -> None:
    server = voiceline_server()
    watch = subprocess.Popen(
        [sys.executable, "-m", "voiceline", "status", "--watch", "0.2", "--data-dir", str(server.data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert watch.stdout is not None
    frames = 0
    while frames < 3:  # each frame starts by moving home and clearing the screen
        line = watch.stdout.readline()
        assert line, watch.stderr.read() if watch.stderr else ""
        frames += line.startswith(b"\x1b[H\x1b[Jvoiceline ")
    watch.send_signal(signal.SIGINT)
    assert watch.wait(timeout=10) == 0
    gone = voiceline_cli("status", "--data-dir", str(tmp_path / "nowhere"))
    assert gone.returncode == 1 and "no running service" in gone.stderr


async def test_metrics_show_registration_states_and_the_bus_reports_changes_once(tmp_path: Path) -> None:
    app = await VoiceLine.open(in_process_config(tmp_path))  # not started: the hooks and views work on their own
    await app.stop()
    seen: list[Event] = []
    app.ops.bus.subscribe(seen.append)
    for state in ("registering", "registered", "registered", "failed"):
        app.ops.registration_changed("carrier", state)
    assert [(e.trunk, e.state) for e in seen if isinstance(e, RegistrationChanged)] == [
        ("carrier", "registering"), ("carrier", "registered"), ("carrier", "failed"),
    ]  # fmt: skip
    status = app.ops.status()
    status["trunks"] = {"carrier": {"enabled": True, "calls": 3, "registration": "registered"}}
    text = Metrics(lambda: status).render().decode()
    assert metric(text, "voiceline_registration_state", state="registered", trunk="carrier") == 1
    assert metric(text, "voiceline_trunk_calls", trunk="carrier") == 3
