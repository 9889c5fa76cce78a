"""Running as a service: sd_notify messages on a NOTIFY_SOCKET the test provides, the unit
file checked by systemd-analyze, SIGHUP reloading lines, and --version."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from voiceline import __version__
from voiceline.control import CONTROL_SOCKET, CommandError, request

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "config" / "voiceline.service"


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's; servers started after this report to it."""
    path = tmp_path / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    yield receiver
    receiver.close()


def next_message(receiver: socket.socket) -> set[str]:
    return set(receiver.recv(4096).decode().split("\n"))


def test_ready_watchdog_and_stopping_reach_systemd(
    voiceline_server: Callable[..., Any], notify_socket: socket.socket
) -> None:
    server = voiceline_server()
    ready = next_message(notify_socket)
    assert {"READY=1", "STATUS=taking calls"} <= ready
    assert (Path(server.data_dir) / CONTROL_SOCKET).exists()  # ready means every part is up
    # WATCHDOG_USEC is 0.4 s: pings keep coming (every 0.2 s) while the loop runs.
    assert next_message(notify_socket) == {"WATCHDOG=1"}
    assert next_message(notify_socket) == {"WATCHDOG=1"}
    server.process.send_signal(signal.SIGTERM)
    while (message := next_message(notify_socket)) == {"WATCHDOG=1"}:
        pass
    assert "STOPPING=1" in message
    assert server.process.wait(timeout=10) == 0


def test_the_unit_file_passes_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")  # `make test` installs it (Debian systemd)
    assert analyze is not None, "systemd-analyze is missing: run the tests through `make test`"
    text = UNIT.read_text(encoding="utf-8")
    assert "Type=notify" in text and "AmbientCapabilities=CAP_NET_BIND_SERVICE" in text and "User=voiceline" in text
    # verify checks that ExecStart exists: point it at this environment's command.
    unit = tmp_path / "voiceline.service"
    unit.write_text(text.replace("/opt/voiceline/bin/voiceline", str(Path(sys.executable).parent / "voiceline")))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr  # unknown keys only warn: none allowed


def test_sighup_reloads_the_config_files_lines(voiceline_server: Callable[..., Any]) -> None:
    server = voiceline_server({"lines": [{"name": "one", "numbers": ["100"]}]})
    socket_path = Path(server.data_dir) / CONTROL_SOCKET
    assert sorted(request(socket_path, "status")["lines"]) == ["one"]
    config = Path(server.config_path)
    config.write_text(config.read_text() + '\n[[lines]]\nname = "two"\nnumbers = ["200"]\n')
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while sorted(request(socket_path, "status")["lines"]) != ["one", "two"]:
        assert time.monotonic() < deadline, "SIGHUP did not reload the lines"
        time.sleep(0.1)
    # A broken file leaves trunks and lines as they were, and the service running.
    config.write_text(config.read_text() + "\n[[lines]]\nnumbers = 3\n")
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not any(e["event"] == "provisioning.reload_failed" for e in server.log_events()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert sorted(request(socket_path, "status")["lines"]) == ["one", "two"]
    # The same through the control socket's reload command: the error comes back as the answer.
    with pytest.raises(CommandError, match="config file"):
        request(socket_path, "reload")
    config.write_text(config.read_text().replace("\n[[lines]]\nnumbers = 3\n", ""))
    assert request(socket_path, "reload")["lines"] == ["one", "two"]


def test_version() -> None:
    done = subprocess.run([sys.executable, "-m", "voiceline", "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == f"voiceline {__version__}"
