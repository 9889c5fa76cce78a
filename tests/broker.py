"""A real Mosquitto broker on loopback for tests, and a recording MQTT 5 client.

`Broker` writes its own config (one loopback listener on a port below the
ephemeral range, anonymous, no persistence) and can be killed and started
again on the same port. `Recorder` (paho-mqtt, which aiomqtt is built on)
subscribes, keeps every message and waits for the ones a test expects.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

LOOPBACK = "127.0.0.1"
START_SECONDS = 10.0


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError("mosquitto is missing: `make test` installs the Debian package")
    return found


def free_port(low: int = 16000, high: int = 19999, host: str = LOOPBACK, kind: int = socket.SOCK_STREAM) -> int:
    """A free loopback port (TCP, or UDP with kind=SOCK_DGRAM) below the kernel's ephemeral range (32768+)."""
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port")


class Broker:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.config = directory / "mosquitto.conf"
        directory.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f"listener {self.port} {LOOPBACK}\nallow_anonymous true\npersistence false\n"
            f"log_dest file {directory / 'mosquitto.log'}\n",
            encoding="utf-8",
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.config)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}")
            try:
                socket.create_connection((LOOPBACK, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not listen")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@dataclass
class Received:
    topic: str
    payload: bytes
    correlation: bytes | None
    retained: bool

    def json(self) -> Any:
        return json.loads(self.payload)


class Recorder:
    """An MQTT 5 client that subscribes to `topic` and keeps every message it receives."""

    def __init__(self, port: int, topic: str = "#") -> None:
        self.messages: list[Received] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(LOOPBACK, port)
        self.client.loop_start()
        if not self._subscribed.wait(START_SECONDS):
            raise RuntimeError("the recorder did not subscribe")

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        with self._changed:
            self.messages.append(Received(message.topic, message.payload, correlation, bool(message.retain)))
            self._changed.notify_all()

    def wait_for(self, found: Callable[[list[Received]], bool], timeout: float = 15.0) -> list[Received]:
        """Block until `found(messages)` holds; fail the test with what came when it does not in time."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not found(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"not received in {timeout:g} s; got {[m.topic for m in self.messages]}")
                self._changed.wait(remaining)
            return list(self.messages)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Payloads of the event messages (.../events/NAME), in arrival order."""
        with self._changed:
            return [
                m.json() for m in self.messages
                if "/events/" in m.topic and (name is None or m.topic.endswith(f"/events/{name}"))
            ]  # fmt: skip

    def request(self, topic: str, args: dict[str, Any], reply_topic: str, correlation: bytes) -> None:
        """Publish a command with an MQTT 5 response topic and correlation data."""
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = reply_topic
        properties.CorrelationData = correlation
        self.client.publish(topic, json.dumps(args), qos=1, properties=properties).wait_for_publish(START_SECONDS)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
