"""Prometheus metrics and the HTTP endpoint that serves them with /healthz and /readyz.

Counters and histograms are fed at call end and by events; gauges (calls by
state and line, registrations, SIP and overload counts) are read from the
service's status at scrape time, so they never drift from `voiceline status`.
Every figure is per line, trunk or reason: none names or links a call.

The endpoint is a small HTTP/1.0-style server on the event loop (one request
per connection), so a scrape never touches the service from another thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

log = structlog.get_logger("voiceline.metrics")

WAIT_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
TALK_BUCKETS = (10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)
JITTER_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
REQUEST_TIMEOUT = 5.0
MAX_REQUEST_HEAD = 8192


class Metrics:
    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls_offered = Counter("voiceline_calls_offered", "INVITEs admitted for a line", ["line"], registry=r)
        self.calls_answered = Counter("voiceline_calls_answered", "Calls up (ACK received)", ["line"], registry=r)
        self.calls_ended = Counter("voiceline_calls_ended", "Answered calls ended, by reason", ["line", "reason"], registry=r)
        self.pairs = Counter("voiceline_pairs", "Pairs formed (two callers started talking)", ["line"], registry=r)
        self.refusals = Counter("voiceline_refusals", "Calls and requests refused, by reason", ["reason"], registry=r)
        self.wait = Histogram(
            "voiceline_wait_seconds", "Time a call spent waiting, at its end", ["line"], buckets=WAIT_BUCKETS, registry=r
        )
        self.talk = Histogram(
            "voiceline_talk_seconds", "Time a call spent talking, at its end", ["line"], buckets=TALK_BUCKETS, registry=r
        )
        self.rtp_received = Counter("voiceline_rtp_packets_received", "RTP packets from callers", ["line"], registry=r)
        self.rtp_expected = Counter(
            "voiceline_rtp_packets_expected", "RTP packets callers sent, by sequence number", ["line"], registry=r
        )
        self.rtp_lost = Counter("voiceline_rtp_packets_lost", "RTP packets from callers lost", ["line"], registry=r)
        self.jitter = Histogram(
            "voiceline_rtp_jitter_seconds", "Interarrival jitter of a call's RTP, at its end", ["line"],
            buckets=JITTER_BUCKETS, registry=r,
        )  # fmt: skip
        self.loop_lag = Histogram(
            "voiceline_event_loop_lag_seconds", "How late the event loop ran a timer", buckets=LAG_BUCKETS, registry=r
        )
        r.register(_StatusCollector(status))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StatusCollector(Collector):
    """Gauges read from the status snapshot at scrape time."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        calls = GaugeMetricFamily("voiceline_calls", "Calls now, by line and state", labels=["line", "state"])
        pairs = GaugeMetricFamily("voiceline_pairs_talking", "Pairs talking now", labels=["line"])
        longest = GaugeMetricFamily("voiceline_longest_wait_seconds", "The longest current wait", labels=["line"])
        line_open = GaugeMetricFamily("voiceline_line_open", "1 when the line takes calls", labels=["line"])
        for name, line in status["lines"].items():
            for state in ("in_welcome", "waiting", "connecting", "talking", "ending"):
                calls.add_metric([name, state], line[state])
            pairs.add_metric([name], line["pairs"])
            longest.add_metric([name], line["longest_wait"])
            line_open.add_metric([name], int(line["open"]))
        yield from (calls, pairs, longest, line_open)
        trunk_calls = GaugeMetricFamily("voiceline_trunk_calls", "Calls now, by trunk", labels=["trunk"])
        registration = GaugeMetricFamily(
            "voiceline_registration_state", "1 for the trunk's registration state", labels=["trunk", "state"]
        )
        for name, trunk in status["trunks"].items():
            trunk_calls.add_metric([name], trunk["calls"])
            if trunk["registration"] is not None:
                registration.add_metric([name, trunk["registration"]], 1)
        yield from (trunk_calls, registration)
        yield GaugeMetricFamily("voiceline_draining", "1 while draining", value=int(status["draining"]))
        yield GaugeMetricFamily("voiceline_uptime_seconds", "Seconds since the service started", value=status["uptime"])
        for section in ("sip", "overload"):
            for key, value in status[section].items():
                yield CounterMetricFamily(f"voiceline_{section}_{key}", f"{section} counter: {key}", value=value)
        mqtt = status.get("mqtt")
        if mqtt is not None:
            yield GaugeMetricFamily("voiceline_mqtt_connected", "1 while connected to the broker", value=int(mqtt["connected"]))
            yield CounterMetricFamily("voiceline_mqtt_events_dropped", "Events not sent to the broker", value=mqtt["dropped"])


class MetricsEndpoint:
    """GET /metrics, /healthz (the loop answers) and /readyz (503 while draining or not started)."""

    def __init__(self, metrics: Metrics, ready: Callable[[], bool]) -> None:
        self._metrics = metrics
        self._ready = ready
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST_HEAD)
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            status, content_type, body = self._answer(method, path)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n".encode("latin-1")
            )
            if method != "HEAD":
                writer.write(body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError, ValueError):
            pass  # a broken or slow request: close it
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, method: str, path: str) -> tuple[str, str, bytes]:
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", text, b"GET only\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self._metrics.render()
        if path == "/healthz":
            return "200 OK", text, b"ok\n"
        if path == "/readyz":
            return ("200 OK", text, b"ready\n") if self._ready() else ("503 Service Unavailable", text, b"not ready\n")
        return "404 Not Found", text, b"not found\n"
