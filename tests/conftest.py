"""Fixtures shared by several test files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import Broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A real Mosquitto on a loopback port of its own, killed at teardown."""
    broker = Broker(tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.kill()
