"""A real Kamailio as the carrier: registrar with digest auth, and proxy to our registered contact.

Each test writes its own kamailio.cfg (loopback only) and runs Kamailio in the
foreground (`-DD -E`), stopping it at the end. The carrier lives on 127.0.0.3;
voiceline registers there and takes the calls Kamailio forwards to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from port_table import port_block
from test_end_to_end import CONNECTED_AFTER
from voiceline.sim.analysis import tone_levels
from voiceline.storage import DB_NAME, MIGRATIONS
from voiceline.sim.runner import CallReport, CallSpec

pytestmark = pytest.mark.interop

CARRIER_HOST = "127.0.0.3"
USERNAME = "voiceline-a"
PASSWORD = "carrier-s3cret"
READY_SECONDS = 10.0
STOP_SECONDS = 5.0
KAMAILIO_PORTS = port_block("test_kamailio")
_ports = iter(range(KAMAILIO_PORTS[0], KAMAILIO_PORTS[1] + 1))  # Kamailio's SIP ports

KAMAILIO_CFG = """#!KAMAILIO
debug=2
log_stderror=yes
children=1
listen=udp:{host}:{port}
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "auth.so"
loadmodule "rr.so"
modparam("usrloc", "db_mode", 0)
modparam("registrar", "min_expires", 5)
modparam("auth", "algorithm", "{algorithm}")
modparam("auth", "nonce_count", 1)
modparam("auth", "qop", "auth")

request_route {{
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    # Requests inside a call pass through the carrier, as with any carrier (voiceline takes them only from the trunk).
    if (has_totag()) {{
        if (loose_route() || (is_method("ACK") && t_check_trans())) {{ t_relay(); exit; }}
        sl_send_reply("404", "Not Here");
        exit;
    }}
    if (is_method("REGISTER")) {{
        if (!pv_www_authenticate("$td", "{password}", "0")) {{
            xlog("L_NOTICE", "carrier: challenged\\n");
            www_challenge("$td", "1");
            exit;
        }}
        if ($au != "{username}") {{ sl_send_reply("403", "Forbidden"); exit; }}
        if (!save("location")) {{ sl_reply_error(); exit; }}
        xlog("L_NOTICE", "carrier: registered expires=$hdr(Expires)\\n");
        exit;
    }}
    if (!lookup("location")) {{ sl_send_reply("404", "Not Found"); exit; }}
    xlog("L_NOTICE", "carrier: forwarding $rm\\n");
    record_route();
    t_relay();
}}
"""


@dataclass
class Kamailio:
    host: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count(self, marker: str) -> int:
        return self.log().count(f"carrier: {marker}")


def _answers(host: str, port: int) -> bool:
    """Kamailio answers an OPTIONS (404 from this config) once it is up."""
    options = (
        f"OPTIONS sip:probe@{host}:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {host}:9;branch=z9hG4bKprobe{time.monotonic_ns()}\r\n"
        f"From: <sip:probe@{host}>;tag=p\r\nTo: <sip:probe@{host}>\r\nCall-ID: probe\r\nCSeq: 1 OPTIONS\r\n"
        "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.3)
        sock.sendto(options.replace(f"{host}:9", f"127.0.0.1:{sock.getsockname()[1]}").encode(), (host, port))
        try:
            return sock.recv(4096).startswith(b"SIP/2.0")
        except OSError:
            return False


@pytest.fixture
def kamailio(tmp_path: Path) -> Iterator[Callable[..., Kamailio]]:
    started: list[Kamailio] = []

    def start(password: str = PASSWORD, algorithm: str = "SHA-256") -> Kamailio:
        port = next(_ports)
        directory = tmp_path / f"kamailio-{port}"
        directory.mkdir()
        cfg = directory / "kamailio.cfg"
        cfg.write_text(KAMAILIO_CFG.format(host=CARRIER_HOST, port=port, password=password, username=USERNAME, algorithm=algorithm))
        check = subprocess.run(["kamailio", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=20)
        assert check.returncode == 0, check.stderr[-2000:]
        log_path = directory / "kamailio.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                ["kamailio", "-f", str(cfg), "-DD", "-E", "-w", str(directory), "-P", str(directory / "kamailio.pid")],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopping it stops its workers too
            )  # fmt: skip
        carrier = Kamailio(CARRIER_HOST, port, log_path, process)
        started.append(carrier)
        deadline = time.monotonic() + READY_SECONDS
        while not _answers(CARRIER_HOST, port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"kamailio did not start; log ends:\n{carrier.log()[-2000:]}")
            time.sleep(0.1)
        return carrier

    yield start
    for carrier in started:
        os.killpg(carrier.process.pid, signal.SIGTERM)
        try:
            carrier.process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # workers that outlived the main process
            os.killpg(carrier.process.pid, signal.SIGKILL)
        carrier.process.wait()


def carrier_config(carrier: Kamailio, password: str = PASSWORD, expiry: int = 3600) -> dict[str, Any]:
    """Only the carrier trunk (no loopback trunk): a call is admitted only when it comes through Kamailio."""
    return {
        "sip": {"answer_delay": 0.1, "register_retry_min": 1.0, "register_retry_max": 4.0},
        "storage": {"poll_interval": 0.5},
        "trunks": [
            {
                "name": "carrier",
                "registration": {
                    "registrar": f"sip:{carrier.host}:{carrier.port}",
                    "username": USERNAME,
                    "password": password,
                    "expiry": expiry,
                },
            }
        ],
        "lines": [{"name": "carrier-line", "numbers": [USERNAME]}],
    }


def trunk_show(server: Any) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "voiceline", "trunk", "show", "carrier", "--json",
         "--config", str(server.config_path), "--data-dir", str(server.data_dir)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def registrations(server: Any) -> list[dict[str, Any]]:
    return [e for e in server.log_events() if e.get("event") == "trunk.registration"]


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
def test_register_is_challenged_accepted_and_refreshed_before_expiry(
    voiceline_server: Callable[..., Any], kamailio: Callable[..., Kamailio], algorithm: str
) -> None:
    carrier = kamailio(algorithm=algorithm)
    server = voiceline_server(carrier_config(carrier, expiry=6))
    assert wait_for(lambda: carrier.count("registered") >= 1, 10), carrier.log()[-2000:]
    assert carrier.count("challenged") >= 1  # the first REGISTER had no credentials
    shown = trunk_show(server)
    assert wait_for(lambda: trunk_show(server)["registration_status"]["state"] == "registered", 5), shown
    assert PASSWORD not in json.dumps(shown) and shown["registration"]["password"] == "set"
    # Granted 6 s: refreshed before the binding runs out, again and again.
    first = time.monotonic()
    assert wait_for(lambda: carrier.count("registered") >= 3, 12), carrier.log()[-2000:]
    assert time.monotonic() - first < 12
    events = registrations(server)
    assert all(e["state"] in ("registering", "registered") for e in events), events
    # Each refresh went out well before the 6 s binding ran out.
    times = [datetime.fromisoformat(e["timestamp"].rstrip("Z")) for e in events if e["state"] == "registered"]
    gaps = [(later - earlier).total_seconds() for earlier, later in zip(times, times[1:])]
    assert len(gaps) >= 2 and all(gap < 5 for gap in gaps), gaps
    assert all(e.get("expires_in") in (None, 6) for e in events)
    assert PASSWORD not in server.log_text()


def test_wrong_password_shows_failed_and_backs_off(voiceline_server: Callable[..., Any], kamailio: Callable[..., Kamailio]) -> None:
    carrier = kamailio()
    server = voiceline_server(carrier_config(carrier, password="not-the-password"))
    assert wait_for(lambda: any(e["state"] == "failed" for e in registrations(server)), 10), server.log_tail()
    status = trunk_show(server)["registration_status"]
    assert status["state"] == "failed" and "credentials rejected" in status["detail"] and status["next_attempt"]
    assert carrier.count("registered") == 0
    # Retries back off: 1 s, 2 s, 4 s ... (bounded by register_retry_max).
    assert wait_for(lambda: sum(e["state"] == "failed" for e in registrations(server)) >= 3, 12)
    waits = [e["next_attempt_in"] for e in registrations(server) if e["state"] == "failed"]
    assert waits[:3] == [1.0, 2.0, 4.0], waits
    assert "not-the-password" not in server.log_text()
    # `trunk test` reaches the registrar (OPTIONS; this Kamailio answers 404 to it).
    probe = subprocess.run(
        [sys.executable, "-m", "voiceline", "trunk", "test", "carrier", "--timeout", "3",
         "--config", str(server.config_path), "--data-dir", str(server.data_dir)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert probe.returncode == 0 and f"sip:{carrier.host}:{carrier.port}: answered 404" in probe.stdout, probe


def test_invite_through_kamailio_reaches_the_line_and_is_paired(
    voiceline_server: Callable[..., Any], kamailio: Callable[..., Kamailio], sim_calls: Callable[..., list[CallReport]]
) -> None:
    carrier = kamailio()
    server = voiceline_server(carrier_config(carrier))
    assert wait_for(lambda: carrier.count("registered") >= 1, 10), carrier.log()[-2000:]
    # Directly from 127.0.0.1 (not a trunk in this config) a call is refused ...
    direct, = sim_calls([CallSpec(server.uri(USERNAME), seconds=0.5)], timeout=20)
    assert direct.final_status == 403
    # ... through the carrier's proxy it reaches the line, and two such callers talk.
    via_carrier = f"sip:{USERNAME}@{carrier.host}:{carrier.port}"
    a, b = sim_calls(
        [
            CallSpec(via_carrier, tone_hz=697.0, seconds=CONNECTED_AFTER + 4.0),
            CallSpec(via_carrier, tone_hz=1209.0, seconds=CONNECTED_AFTER + 3.5, start_after=0.5),
        ],
        analyse_hz=(697.0, 1209.0),
    )
    assert a.connected and b.connected, (a, b)
    joined = b.connected_at - a.connected_at
    heard = tone_levels(a.recording, (1209.0, 697.0), joined + CONNECTED_AFTER, joined + CONNECTED_AFTER + 2.0)
    assert heard[1209.0] - heard[697.0] > 30, heard
    assert carrier.count("forwarding INVITE") >= 2
    offered = [e for e in server.log_events() if e.get("event") == "call.offered"]
    assert [(e["trunk"], e["line"]) for e in offered] == [("carrier", "carrier-line")] * 2


def old_database(data_dir: Path, trunks: dict[str, dict[str, Any]]) -> None:
    """A database as voiceline wrote it before migration 4: schema 3, trunk passwords in the clear."""
    data_dir.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(data_dir / DB_NAME)) as db, db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version (version) VALUES (3)")
        for script in MIGRATIONS[:3]:
            assert isinstance(script, str)
            db.executescript(script)
        for name, settings in trunks.items():
            db.execute("INSERT INTO trunks (name, enabled, settings) VALUES (?, 1, ?)", (name, json.dumps(settings)))


def test_registration_stored_in_plain_text_by_an_older_version_still_registers_after_migration(
    voiceline_server: Callable[..., Any], kamailio: Callable[..., Kamailio], tmp_path: Path
) -> None:
    """The password Kamailio checks is the one migrated into ciphertext and read back through the key file."""
    carrier = kamailio()
    registration = {
        "registrar": f"sip:{carrier.host}:{carrier.port}", "username": USERNAME, "password": PASSWORD,
        "realm": "", "expiry": 3600, "contact_user": "",
    }  # fmt: skip
    stored = {
        "transports": ["udp"], "sources": [], "username": "", "password": "", "realm": "voiceline",
        "auth_algorithms": ["SHA-256", "MD5"], "registration": registration, "codecs": [], "max_calls": 0,
    }  # fmt: skip
    data_dir = tmp_path / "voiceline-server-0" / "data"  # where the fixture's first server keeps its data
    old_database(data_dir, {"carrier": stored})
    key_file = tmp_path / "keys" / "voiceline.key"  # kept away from the database, as the README advises
    key_file.parent.mkdir(mode=0o700)
    config = carrier_config(carrier)
    del config["trunks"]  # the carrier trunk comes from the database only
    config["storage"]["secret_key_file"] = str(key_file)
    server = voiceline_server(config)
    assert server.data_dir == data_dir
    assert wait_for(lambda: carrier.count("registered") >= 1, 10), carrier.log()[-2000:]
    shown = trunk_show(server)  # the CLI reads the key file named in the config too
    assert shown["origin"] == "database" and shown["registration"]["password"] == "set"
    assert wait_for(lambda: trunk_show(server)["registration_status"]["state"] == "registered", 5)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    for path in data_dir.iterdir():  # the database, its -wal and -shm: no password, no key
        if path.is_file():  # not the control socket
            assert PASSWORD.encode() not in path.read_bytes(), path.name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert PASSWORD not in server.log_text()
