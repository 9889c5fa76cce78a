"""Test layers, by marker: `interop` (independent SIP stacks, subprocess servers), `integration`
(the service in this process on loopback sockets, or its command line) and `unit` (everything
else: no sockets, no processes). A module's `pytestmark` or a test's own marker names its layer;
unmarked tests are `unit`, and a unit test that binds or connects a socket or starts a process
fails, so `make test-fast` (`-m unit`) stays fast whoever adds tests."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest

from broker import Broker

SLOW_LAYERS = ("integration", "interop")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(layer) for layer in SLOW_LAYERS):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _unit_tests_stay_in_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if request.node.get_closest_marker("unit") is not None:

        def refuse(*args: object, **kwargs: object) -> NoReturn:
            raise AssertionError("a unit test uses no sockets and no processes: mark it integration or interop")

        def start_only_library_lookups(process: subprocess.Popen[bytes], args: Sequence[str], **kwargs: Any) -> None:
            if os.path.basename(args[0]) != "ldconfig":  # ctypes.util.find_library, e.g. for libopus
                refuse()
            popen_init(process, args, **kwargs)

        popen_init = subprocess.Popen.__init__
        monkeypatch.setattr(socket.socket, "bind", refuse)
        monkeypatch.setattr(socket.socket, "connect", refuse)
        monkeypatch.setattr(subprocess.Popen, "__init__", start_only_library_lookups)
    yield


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A real Mosquitto on a loopback port of its own, killed at teardown."""
    broker = Broker(tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.kill()
