"""Pytest plugin: fixtures that start a voiceline server and place simulated calls.

Registered through the `pytest11` entry point, so every test run in an
environment with voiceline installed has:

- `voiceline_server`: a factory. `server = voiceline_server()` (or
  `voiceline_server({"sip": {"answer_delay": 0.2}})` to override config keys,
  see config/voiceline.toml) starts `voiceline serve` on loopback (UDP and
  TCP; `host=` picks another loopback address, e.g. "127.0.0.21"), waits for a `sip.listening` log event per transport and for `service.started`, and returns a
  `VoicelineServer`; `server.ports` maps "udp"/"tcp"/"tls" to the bound ports
  (TLS when the overrides set `sip.listen_tls`, e.g. to "127.0.0.1:0" with a
  certificate from `self_signed_certificate`). `port=` chooses the SIP port
  (default 0: the kernel chooses one per transport) and `rtp_ports=(low, high)`
  the RTP range (default: a block of this run's port lane, see
  voiceline.sim.ports). At teardown every server started is sent SIGTERM and
  must exit with status 0. Unless the overrides say otherwise, the server skips
  the welcome and the talk/listen choice (QUICK_JOURNEY), so two callers are
  paired at once. `server.wait_for_event("call.confirmed")` waits
  for the server to log an event.
- `sim_calls`: `sim_calls(specs, timeout=60.0, rtp_ports=None)` places
  simulated calls (see `voiceline.sim.runner.run_calls`) with recordings under
  the test's tmp_path; the callers' RTP ports come from `rtp_ports=(low, high)`
  (default: a block of this run's port lane), their SIP ports from the kernel.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from voiceline.sim.ports import run_lane
from voiceline.sim.runner import CallReport, CallSpec, run_calls

LOOPBACK = "127.0.0.1"
SERVER_READY_SECONDS = 15.0
SERVER_STOP_SECONDS = 10.0
LOG_POLL_SECONDS = 0.05
LOG_TAIL_CHARS = 3000
READY_EVENT = "sip.listening"  # one per transport, with its bound port
STARTED_EVENT = "service.started"  # after the last listening line: control socket and metrics are up too
# Default RTP ranges, from this run's port lane: servers take turns over a few blocks (a test
# rarely runs more than two at once), simulated callers share one block per batch.
SERVER_RTP_PORTS = 100
SERVER_RTP_BLOCKS = 8
SIM_RTP_PORTS = 400

# Servers skip the welcome and the talk/listen choice unless a test asks for them (`{"welcome": {...}}`),
# so callers are paired (after the connect cue and "you're connected") soon after the answer.
QUICK_JOURNEY: dict[str, Any] = {"welcome": {"enabled": False, "offer_choice": False}}

# Tables by name; `trunks` and `lines` take a list of tables ([[trunks]]), which replaces the default list.
ConfigOverrides = Mapping[str, Any]


@dataclass
class VoicelineServer:
    """A running `voiceline serve` process on loopback."""

    host: str
    port: int  # SIP over UDP (or the first transport), once listening
    rtp_ports: tuple[int, int]
    data_dir: Path
    log_path: Path
    config_path: Path
    process: subprocess.Popen[bytes]
    # Bound port per transport ("udp", "tcp", "tls"), from the sip.listening events.
    ports: dict[str, int] = field(default_factory=dict)
    killed: bool = field(default=False, init=False)

    def uri(self, user: str = "voiceline", transport: str = "udp") -> str:
        """A URI that reaches the server over `transport` (TLS as sip:...;transport=tls)."""
        if transport == "udp":
            return f"sip:{user}@{self.host}:{self.port}"
        return f"sip:{user}@{self.host}:{self.ports[transport]};transport={transport}"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        """Every JSON object line of the log (tracebacks and other lines are skipped)."""
        events = []
        for line in self.log_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def log_tail(self) -> str:
        return self.log_text()[-LOG_TAIL_CHARS:]

    def wait_for_event(self, name: str, count: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
        """The log's `name` events once there are `count` of them; fail the test after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while len(events := [event for event in self.log_events() if event.get("event") == name]) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"{len(events)} of {count} {name} events within {timeout:g} s; log ends:\n{self.log_tail()}")
            time.sleep(LOG_POLL_SECONDS)
        return events

    def stop(self) -> int:
        """SIGTERM, wait (bounded; kill after that) and return the exit status. Idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=SERVER_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def self_signed_certificate(directory: Path, host: str = LOOPBACK) -> tuple[Path, Path]:
    """A throw-away certificate and key for `host` (an IP SAN), written by the openssl CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    certificate, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-keyout", str(key), "-out", str(certificate), "-subj", f"/CN={host}"),
            *("-addext", f"subjectAltName=IP:{host}"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return certificate, key


def free_udp_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


_server_rtp_turns = itertools.count()


def default_server_rtp_ports() -> tuple[int, int]:
    """The next of the servers' RTP blocks in this run's lane."""
    first, _ = run_lane().claim("voiceline_server", SERVER_RTP_PORTS * SERVER_RTP_BLOCKS)
    low = first + next(_server_rtp_turns) % SERVER_RTP_BLOCKS * SERVER_RTP_PORTS
    return low, low + SERVER_RTP_PORTS - 1


def default_sim_rtp_ports() -> tuple[int, int]:
    return run_lane().claim("sim_calls", SIM_RTP_PORTS)


def to_toml(tables: Mapping[str, Any], prefix: str = "") -> str:
    """TOML for tables (and lists of tables) of strings, numbers, booleans, lists and nested tables."""
    lines: list[str] = []
    for name, values in tables.items():
        if isinstance(values, list | tuple):
            for table in values:
                lines.append(to_toml({name: table}, prefix).replace(f"[{prefix}{name}]", f"[[{prefix}{name}]]", 1))
            continue
        header = f"{prefix}{name}"
        lines.append(f"[{header}]")
        nested = {key: value for key, value in values.items() if isinstance(value, Mapping)}
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if key not in nested]
        lines.append("")
        if nested:
            lines.append(to_toml(nested, prefix=f"{header}."))
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def merge_config(base: ConfigOverrides, overrides: ConfigOverrides) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for table in {**base, **overrides}:
        value = overrides.get(table, base.get(table))
        merged[table] = value if isinstance(value, list | tuple) else {**base.get(table, {}), **overrides.get(table, {})}
    return merged


def start_server(
    directory: Path,
    overrides: ConfigOverrides,
    port: int = 0,
    rtp_ports: tuple[int, int] | None = None,
    host: str = LOOPBACK,
    wrapper: Sequence[str] = (),
) -> VoicelineServer:
    """Start `voiceline serve` on `host` with its files under `directory` (its `data` may be prepared
    already) on SIP `port` (0: kernel-chosen) and the RTP range `rtp_ports`, run through `wrapper`
    (a command that runs the rest, such as setpriv); fail the test unless it gets ready."""
    directory.mkdir(parents=True, exist_ok=True)
    low, high = rtp_ports or default_server_rtp_ports()
    config_path = directory / "voiceline.toml"
    config = merge_config({"sip": {"public_address": host}, **QUICK_JOURNEY}, overrides)
    config_path.write_text(to_toml(config), encoding="utf-8")
    transports = set(config["sip"].get("transports", ("udp", "tcp")))
    if config["sip"].get("listen_tls"):
        transports.add("tls")
    data_dir = directory / "data"
    log_path = directory / "server.log"
    command = [
        *wrapper,
        *(sys.executable, "-m", "voiceline", "serve"),
        *("--config", str(config_path)),
        *("--listen", f"{host}:{port}"),
        *("--rtp-ports", f"{low}-{high}"),
        *("--data-dir", str(data_dir)),
        *("--log-format", "json"),
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # Log lines must reach the file as they happen, not when a buffer fills.
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = VoicelineServer(host, port, (low, high), data_dir, log_path, config_path, process)
    _wait_until_listening(server, transports)
    return server


def _listening_ports(server: VoicelineServer) -> dict[str, int]:
    return {
        str(event.get("transport")): int(str(event.get("address")).rpartition(":")[2])
        for event in server.log_events()
        if event.get("event") == READY_EVENT
    }


def _started(server: VoicelineServer) -> bool:
    return any(event.get("event") == STARTED_EVENT for event in server.log_events())


def _wait_until_listening(server: VoicelineServer, transports: set[str]) -> None:
    deadline = time.monotonic() + SERVER_READY_SECONDS
    while not transports <= (ports := _listening_ports(server)).keys() or not ports or not _started(server):
        if server.process.poll() is not None:
            pytest.fail(
                f"voiceline serve exited with status {server.process.returncode} before {STARTED_EVENT}; "
                f"log ends:\n{server.log_tail()}"
            )
        if time.monotonic() > deadline:
            server.process.kill()
            server.process.wait()
            pytest.fail(
                f"voiceline serve did not log {STARTED_EVENT} within {SERVER_READY_SECONDS:g} s; "
                f"log ends:\n{server.log_tail()}"
            )
        time.sleep(LOG_POLL_SECONDS)
    server.ports = ports
    server.port = ports.get("udp", next(iter(ports.values())))


@pytest.fixture
def voiceline_server(tmp_path: Path) -> Iterator[Callable[..., VoicelineServer]]:
    """Factory: `voiceline_server(overrides=None, *, port=0, rtp_ports=None, host=LOOPBACK, wrapper=()) -> VoicelineServer`;
    every server is stopped at teardown."""
    servers: list[VoicelineServer] = []

    def start(
        overrides: ConfigOverrides | None = None,
        *,
        port: int = 0,
        rtp_ports: tuple[int, int] | None = None,
        host: str = LOOPBACK,
        wrapper: Sequence[str] = (),
    ) -> VoicelineServer:
        server = start_server(
            tmp_path / f"voiceline-server-{len(servers)}", overrides or {}, port, rtp_ports, host, wrapper
        )
        servers.append(server)
        return server

    yield start
    problems = []
    for server in servers:
        status = server.stop()
        if server.killed:
            problems.append(
                f"{server.uri()} ignored SIGTERM for {SERVER_STOP_SECONDS:g} s and was killed; "
                f"log ends:\n{server.log_tail()}"
            )
        elif status != 0:
            problems.append(f"{server.uri()} exited with status {status}; log ends:\n{server.log_tail()}")
    if problems:
        pytest.fail("\n".join(problems))


@pytest.fixture
def sim_calls(tmp_path: Path) -> Callable[..., list[CallReport]]:
    """`sim_calls(specs, timeout=60.0, analyse_hz=None, tls_ca_file="", rtp_ports=None) -> list[CallReport]`,
    recordings under tmp_path/sim."""
    batches = itertools.count()

    def place(
        specs: Sequence[CallSpec],
        timeout: float = 60.0,
        analyse_hz: Sequence[float] | None = None,
        tls_ca_file: str | Path = "",
        rtp_ports: tuple[int, int] | None = None,
    ) -> list[CallReport]:
        record_dir = tmp_path / "sim" / f"batch-{next(batches)}"
        return run_calls(
            specs,
            record_dir=record_dir,
            timeout=timeout,
            analyse_hz=analyse_hz,
            tls_ca_file=str(tls_ca_file),
            rtp_ports=rtp_ports or default_sim_rtp_ports(),
        )

    return place
