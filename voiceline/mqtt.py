"""MQTT: events out, commands in, through aiomqtt (MQTT 5).

Topics under BASE = `mqtt.topic_prefix`/NODE:
- BASE/status: `node.online` / `node.offline`, retained; the broker publishes
  the offline one as our last will when the connection is lost.
- BASE/events/NAME: every event (voiceline.events), JSON.
- BASE/command/NAME: commands (payload: a JSON object of arguments, or empty).
  The reply goes to the request's MQTT 5 response topic with its correlation
  data, else to BASE/reply/NAME.

The broker is optional at run time: while it is away the link reconnects
with doubling waits, and events are dropped and counted (`dropped`), never
queued without bound and never waited for; calls do not notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Callable
from typing import Any, cast

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from voiceline.config import MqttConfig
from voiceline.control import CommandHandler, reply_for, run_command
from voiceline.events import SCHEMA_VERSION, Event, NodeOffline, NodeOnline

log = structlog.get_logger("voiceline.mqtt")

RECONNECT_MIN = 0.5
RECONNECT_MAX = 30.0
CONNECT_TIMEOUT = 5.0
GOODBYE_TIMEOUT = 2.0



def _publish_properties() -> Any:
    """MQTT 5 properties for a PUBLISH (paho's `Properties` has no type hints)."""
    new_properties = cast("Callable[[int], Any]", Properties)
    return new_properties(PacketTypes.PUBLISH)

class MqttLink:
    def __init__(self, config: MqttConfig, node: str, version: str, handle: CommandHandler) -> None:
        self.config = config
        self.node = node
        self.version = version
        self.base = f"{config.topic_prefix}/{node}"
        self._handle = handle
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(config.queue_size)
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self.connected = False
        self.dropped = 0  # events not sent: disconnected, or the queue was full
        self.connections = 0

    def publish(self, event: Event) -> None:
        """Bus subscriber: queue the event for the broker, or drop and count it; never waits."""
        if not self.connected:
            self.dropped += 1
            return
        try:
            self._queue.put_nowait((f"{self.base}/events/{event.name}", json.dumps(event.to_json()).encode()))
        except asyncio.QueueFull:
            self.dropped += 1

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Send what is queued (the last calls' ends), say offline (retained) when connected, then disconnect."""
        client = self._client
        if client is not None and self.connected:
            if self._sender is not None:
                self._sender.cancel()
                await asyncio.wait({self._sender}, timeout=GOODBYE_TIMEOUT)
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(GOODBYE_TIMEOUT):
                    while not self._queue.empty():
                        await client.publish(*self._queue.get_nowait(), qos=1)
                    await client.publish(
                        f"{self.base}/status", self._payload(NodeOffline(self.node)), qos=1, retain=True
                    )
        if self._task is not None:
            self._task.cancel()
            # Bounded: a client stuck in its disconnect must not hold the service's exit.
            await asyncio.wait({self._task}, timeout=GOODBYE_TIMEOUT)

    def _payload(self, event: Event) -> bytes:
        return json.dumps(event.to_json()).encode()

    def _new_client(self) -> aiomqtt.Client:
        config = self.config
        will = aiomqtt.Will(f"{self.base}/status", self._payload(NodeOffline(self.node)), qos=1, retain=True)
        tls = ssl.create_default_context(cafile=config.ca_file or None) if config.tls else None
        return aiomqtt.Client(
            config.host,
            config.port,
            identifier=config.client_id or f"voiceline-{self.node}",
            username=config.username or None,
            password=config.password or None,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            tls_context=tls,
            timeout=CONNECT_TIMEOUT,
            keepalive=30,
        )

    async def _run(self) -> None:
        wait = RECONNECT_MIN
        while True:
            client = self._new_client()
            try:
                async with client:
                    self._client = client
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                if self.connected:
                    log.warning("mqtt.disconnected", error=type(exc).__name__)
                else:
                    log.info("mqtt.unreachable", retry_in=round(wait, 1))
            finally:
                self._client = None
                if self.connected:
                    wait = RECONNECT_MIN
                self.connected = False
                self.dropped += self._queue.qsize()  # queued but never sent
                while not self._queue.empty():
                    self._queue.get_nowait()
            await asyncio.sleep(wait)
            wait = min(wait * 2, RECONNECT_MAX)

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.publish(
            f"{self.base}/status", self._payload(NodeOnline(self.node, self.version)), qos=1, retain=True
        )
        await client.subscribe(f"{self.base}/command/+", qos=1)
        self.connected = True
        self.connections += 1
        log.info("mqtt.connected", base=self.base, dropped=self.dropped)
        sender = self._sender = asyncio.get_running_loop().create_task(self._send_queued(client))
        try:
            async for message in client.messages:
                await self._command(client, message)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await sender

    async def _send_queued(self, client: aiomqtt.Client) -> None:
        this = asyncio.current_task()
        # aiomqtt's publish can swallow a cancellation that lands inside it: look before waiting again.
        while this is None or not this.cancelling():
            topic, payload = await self._queue.get()
            await client.publish(topic, payload, qos=1)

    async def _command(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        name = message.topic.value.rsplit("/", 1)[-1]
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        try:
            args = json.loads(payload) if payload.strip() else {}
        except ValueError:
            reply = reply_for(None, "payload: not JSON")
        else:
            reply = await run_command(self._handle, {"command": name, "args": args})
        body: dict[str, Any] = {"schema": SCHEMA_VERSION, "command": name, **reply}
        request_properties = message.properties
        response_topic = getattr(request_properties, "ResponseTopic", None)
        properties = None
        if response_topic:
            correlation = getattr(request_properties, "CorrelationData", None)
            if correlation is not None:
                properties = _publish_properties()
                properties.CorrelationData = correlation
        topic = response_topic or f"{self.base}/reply/{name}"
        await client.publish(topic, json.dumps(body).encode(), qos=1, properties=properties)
