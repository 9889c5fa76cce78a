"""Two voiceline nodes behind Kamailio with the example dispatcher configuration.

The nodes listen on 127.0.0.21 and 127.0.0.22, Kamailio on 127.0.0.20 with
config/kamailio-dispatcher.cfg as shipped (only its listen address and nodes
file given on the command line). Calls to one number land on one node and
pair there; once that node is killed, the number's calls reach the other
node and pair there; a drained node takes no new call and exits when its
calls end, while the other node takes the number's new calls.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from broker import free_port
from test_end_to_end import CONNECTED_AFTER
from test_kamailio import _answers
from voiceline.control import CONTROL_SOCKET, request
from voiceline.sim.plugin import VoicelineServer, start_server
from voiceline.sim.runner import CallReport, CallSpec

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "kamailio-dispatcher.cfg"
PROXY = "127.0.0.20"
NODE_HOSTS = ("127.0.0.21", "127.0.0.22")
NUMBER = "100"
READY_SECONDS = 10.0


def node_config() -> dict[str, Any]:
    # Requests come only through the proxy; media goes straight between callers and the node.
    return {"sip": {"answer_delay": 0.1}, "trunks": [{"name": "proxy", "sources": [PROXY]}]}


def status(node: VoicelineServer) -> dict[str, Any]:
    return dict(request(node.data_dir / CONTROL_SOCKET, "status"))


def wait_until(condition: Callable[[], bool], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[VoicelineServer]]:
    """Two nodes this test may kill; any still running at the end are stopped and must exit 0."""
    started = [start_server(tmp_path / f"node-{i}", node_config(), host=host) for i, host in enumerate(NODE_HOSTS)]
    yield started
    for node in started:
        if node.process.poll() is None:
            assert node.stop() == 0, node.log_tail()


@pytest.fixture
def dispatcher(tmp_path: Path, nodes: list[VoicelineServer]) -> Iterator[str]:
    """Kamailio with the example config in front of `nodes`; yields the URI callers dial."""
    port = free_port(host=PROXY, kind=socket.SOCK_DGRAM)
    directory = tmp_path / "kamailio"
    directory.mkdir()
    node_list = directory / "nodes.list"
    node_list.write_text("".join(f"1 sip:{node.host}:{node.port}\n" for node in nodes))
    defines = ["-A", f"LISTEN=udp:{PROXY}:{port}", "-A", f'NODES="{node_list}"']
    check = subprocess.run(["kamailio", "-c", "-f", str(EXAMPLE), *defines], capture_output=True, text=True, timeout=20)
    assert check.returncode == 0, check.stderr[-2000:]
    log_path = directory / "kamailio.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            ["kamailio", "-f", str(EXAMPLE), *defines, "-DD", "-E", "-w", str(directory), "-P", str(directory / "pid")],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until(lambda: _answers(PROXY, port) or process.poll() is not None, READY_SECONDS)
        assert process.poll() is None, log_path.read_text(errors="replace")[-2000:]
        yield f"sip:{NUMBER}@{PROXY}:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_a_numbers_calls_stay_on_one_node_fail_over_and_avoid_a_drained_node(
    nodes: list[VoicelineServer], dispatcher: str, sim_calls: Callable[..., list[CallReport]]
) -> None:
    # 1. Both nodes up: the number's calls all land on one node and pair there.
    first_pair = sim_calls(
        [CallSpec(dispatcher, seconds=CONNECTED_AFTER + 2.0), CallSpec(dispatcher, seconds=CONNECTED_AFTER + 2.0, start_after=0.3)]
    )
    assert all(r.connected for r in first_pair), first_pair
    calls = [status(node)["sip"]["calls"] for node in nodes]
    assert sorted(calls) == [0, 2], calls
    home, other = (nodes[0], nodes[1]) if calls[0] == 2 else (nodes[1], nodes[0])
    assert [e["event"] for e in home.log_events()].count("pairing.talking") == 1

    # 2. The home node dies: the number's next calls reach the other node and pair there.
    home.process.kill()
    home.process.wait()
    with ThreadPoolExecutor(1) as pool:
        placing = pool.submit(
            sim_calls, [CallSpec(dispatcher, seconds=9.0), CallSpec(dispatcher, seconds=9.0, start_after=0.3)], 60.0
        )
        wait_until(lambda: status(other)["lines"]["default"]["talking"] == 2, 30)

        # 3. The other node drains: it takes no new call (none is left to take it: 503) ...
        request(other.data_dir / CONTROL_SOCKET, "drain")
        late, = sim_calls([CallSpec(dispatcher, seconds=1.0)], 30.0)
        assert late.final_status == 503 and not late.connected, late
        assert status(other)["sip"]["calls"] == 2
        second_pair = placing.result(timeout=60)
    assert all(r.connected for r in second_pair), second_pair
    # ... and exits by itself once its calls have ended.
    assert other.process.wait(timeout=15) == 0
    events = [e["event"] for e in other.log_events()]
    assert events.count("pairing.talking") == 1 and "service.drained" in events


def test_a_drained_node_hands_new_calls_to_the_other_node_and_finishes_its_own(
    nodes: list[VoicelineServer], dispatcher: str, sim_calls: Callable[..., list[CallReport]]
) -> None:
    """A rolling upgrade: the number's node drains while another is up; new calls go to the other node."""
    with ThreadPoolExecutor(1) as pool:
        placing = pool.submit(sim_calls, [CallSpec(dispatcher, seconds=8.0)], 60.0)
        wait_until(lambda: sum(status(node)["sip"]["calls"] for node in nodes) == 1, 30)
        home, other = sorted(nodes, key=lambda node: -status(node)["sip"]["calls"])
        request(home.data_dir / CONTROL_SOCKET, "drain")
        late, = sim_calls([CallSpec(dispatcher, seconds=1.0)], 30.0)
        assert late.connected, late
        assert [e["event"] for e in other.log_events()].count("call.confirmed") == 1  # it took the new call
        assert status(home)["sip"]["calls"] == 1  # and the drained node kept its caller
        first, = placing.result(timeout=60)
    assert first.connected and first.hangup_by == "us", first
    assert home.process.wait(timeout=15) == 0  # it exits by itself once its call has ended
    assert other.process.poll() is None
