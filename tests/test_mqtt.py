"""Events and commands through a real Mosquitto broker, with real pjsua2 callers.

The broker is started by the test on a loopback port; a recording client
subscribes to everything. Killing the broker mid-call must leave the call
talking (checked by what each caller heard) and events must resume.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from broker import Broker, Received, Recorder
from test_end_to_end import A_HZ, B_HZ, CONNECTED_AFTER, assert_hears
from voiceline.control import CONTROL_SOCKET, request
from voiceline.sim.runner import CallReport, CallSpec

pytestmark = pytest.mark.interop

NODE = "node-a"
BASE = f"voiceline/{NODE}"


def mqtt_server(voiceline_server: Callable[..., Any], broker: Broker) -> Any:
    return voiceline_server(
        {
            "sip": {"answer_delay": 0.1},
            "mqtt": {"enabled": True, "port": broker.port, "node": NODE, "gauge_interval": 1.0},
        }
    )


def online(messages: list[Received]) -> bool:
    return any(m.topic == f"{BASE}/status" and m.json()["event"] == "node.online" for m in messages)


def count(name: str, wanted: int) -> Callable[[list[Received]], bool]:
    return lambda messages: sum(m.topic == f"{BASE}/events/{name}" for m in messages) >= wanted


def test_a_pairs_life_and_commands_with_replies(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]], broker: Broker
) -> None:
    recorder = Recorder(broker.port)
    try:
        server = mqtt_server(voiceline_server, broker)
        recorder.wait_for(online)
        status_message = next(m for m in recorder.messages if m.topic == f"{BASE}/status")
        assert status_message.json()["version"] and status_message.json()["schema"] == 1

        target = server.uri("line")
        talk = CONNECTED_AFTER + 2.0  # bridged after the connect prompts, then two seconds together
        reports = sim_calls([CallSpec(target, seconds=talk + 0.5), CallSpec(target, seconds=talk, start_after=0.3)])
        assert all(r.connected for r in reports), reports
        recorder.wait_for(count("call.ended", 2))
        recorder.wait_for(count("line.gauge", 1))

        offered, answered, ended = (recorder.events(n) for n in ("call.offered", "call.answered", "call.ended"))
        calls = {event["call"] for event in offered}
        assert len(calls) == 2 and {event["call"] for event in answered} == calls == {e["call"] for e in ended}
        assert all(e["line"] == "default" and e["trunk"] == "loopback" for e in offered)
        assert all(e["reason"] == "caller hung up" and e["paired"] is True and e["duration"] >= 2 for e in ended)
        assert [e["waiting"] for e in recorder.events("line.waiting")][:1] == [1]
        paired = recorder.events("line.paired")
        assert len(paired) == 1 and paired[0] == {**paired[0], "line": "default", "waiting": 0, "talking": 2}
        assert "call" not in paired[0]  # the pair's start names no call
        order = [m.json()["event"] for m in recorder.messages if "/events/call." in m.topic or "/events/line.paired" in m.topic]
        assert order.index("line.paired") > order.index("call.answered")
        gauge = recorder.events("line.gauge")[-1]
        assert gauge["line"] == "default" and gauge["open"] is True and isinstance(gauge["time"], int)

        # A scanner is dropped by the overload guard: the next gauges come with an overload summary.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as scanner:
            scanner.sendto(
                b"OPTIONS sip:100@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKscan\r\n"
                b"From: <sip:s@127.0.0.1>;tag=1\r\nTo: <sip:100@127.0.0.1>\r\nCall-ID: scan\r\nCSeq: 1 OPTIONS\r\n"
                b"User-Agent: friendly-scanner\r\nContent-Length: 0\r\n\r\n",
                (server.host, server.port),
            )
        recorder.wait_for(count("sip.overload", 1))
        assert recorder.events("sip.overload")[0] == {**recorder.events("sip.overload")[0], "scanners": 1, "rate_limited": 0}

        # Commands: the reply goes to the MQTT 5 response topic with the correlation data.
        def command(name: str, args: dict[str, Any], correlation: bytes) -> dict[str, Any]:
            recorder.request(f"{BASE}/command/{name}", args, "test/replies", correlation)
            messages = recorder.wait_for(
                lambda ms: any(m.topic == "test/replies" and m.correlation == correlation for m in ms)
            )
            return dict(next(m for m in messages if m.topic == "test/replies" and m.correlation == correlation).json())

        status = command("status", {}, b"one")
        assert status["ok"] and status["result"]["lines"]["default"]["waiting"] == 0
        assert status["result"]["mqtt"] == {"connected": True, "dropped": 0}
        closed = command("close_line", {"line": "default"}, b"two")
        assert closed["ok"] and closed["result"] == {"line": "default", "open": False}
        recorder.wait_for(count("line.closed", 1))
        refused = command("close_line", {"line": "nowhere"}, b"three")
        assert refused["ok"] is False and "line" in refused["error"]

        drained = command("drain", {}, b"four")
        assert drained["ok"] and drained["result"] == {"draining": True}
        recorder.wait_for(count("service.drain", 1))
        assert recorder.events("service.drain")[0]["draining"] is True
        # No calls: the drained service exits, saying so first on its retained status.
        recorder.wait_for(
            lambda ms: any(m.topic == f"{BASE}/status" and m.json()["event"] == "node.offline" for m in ms)
        )
        server.process.wait(timeout=10)
        assert server.process.returncode == 0
    finally:
        recorder.close()


def test_the_broker_restarting_mid_call_leaves_the_call_talking(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]], broker: Broker
) -> None:
    recorder = Recorder(broker.port)
    server = mqtt_server(voiceline_server, broker)
    recorder.wait_for(online)
    target = server.uri("line")
    specs = [
        CallSpec(target, tone_hz=A_HZ, seconds=CONNECTED_AFTER + 9.0),
        CallSpec(target, tone_hz=B_HZ, seconds=CONNECTED_AFTER + 8.5, start_after=0.3),
    ]
    with ThreadPoolExecutor(1) as pool:
        calls = pool.submit(sim_calls, specs)
        recorder.wait_for(count("line.paired", 1))
        recorder.close()
        broker.kill()
        time.sleep(1.5)  # the broker stays away across gauge intervals: those events are dropped
        broker.start()
        recorder = Recorder(broker.port)
        recorder.wait_for(online, timeout=20)
        recorder.wait_for(count("line.gauge", 1))
        status = request(server.data_dir / CONTROL_SOCKET, "status")
        assert status["mqtt"]["connected"] is True and status["mqtt"]["dropped"] > 0
        assert status["lines"]["default"]["talking"] == 2
        a, b = calls.result(timeout=60)
    try:
        recorder.wait_for(count("call.ended", 2))
        assert all(event["paired"] for event in recorder.events("call.ended"))
    finally:
        recorder.close()
    for report in (a, b):
        assert report.connected and report.hangup_by == "us", report
    # Heard the partner throughout, across the broker's absence.
    assert_hears(a, B_HZ, A_HZ, CONNECTED_AFTER + 1.0, CONNECTED_AFTER + 8.0)
    assert_hears(b, A_HZ, B_HZ, CONNECTED_AFTER + 1.0, CONNECTED_AFTER + 7.5)
    assert json.dumps(status)  # the status is plain JSON


def test_stopping_sends_the_last_calls_ends_before_going_offline(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]], broker: Broker
) -> None:
    recorder = Recorder(broker.port)
    try:
        server = mqtt_server(voiceline_server, broker)
        recorder.wait_for(online)
        target = server.uri("line")
        with ThreadPoolExecutor(1) as pool:
            placing = pool.submit(sim_calls, [CallSpec(target, seconds=20.0), CallSpec(target, seconds=20.0, start_after=0.3)])
            recorder.wait_for(count("line.paired", 1))
            assert server.stop() == 0
            placing.result(timeout=60)
        messages = recorder.wait_for(
            lambda ms: any(m.topic == f"{BASE}/status" and m.json()["event"] == "node.offline" for m in ms)
        )
        names = [m.json()["event"] for m in messages if m.topic.startswith(BASE)]
        ended = [i for i, name in enumerate(names) if name == "call.ended"]
        assert len(ended) == 2 and max(ended) < names.index("node.offline"), names
        assert {e["reason"] for e in recorder.events("call.ended")} == {"service stopping"}
    finally:
        recorder.close()
