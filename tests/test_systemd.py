"""Running as a service: sd_notify messages on a NOTIFY_SOCKET the test provides, the unit
file checked by systemd-analyze, the kernel path under exactly the unit's capabilities (setpriv;
needs root, as the kernel path's tests do), SIGHUP reloading lines (and SIGHUP and SIGUSR1 during
start-up acted on once started), and --version."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from test_end_to_end import A_HZ, B_HZ, CONNECTED_AFTER
from test_lifecycle import seed_database, serve_args
from voiceline import __version__
from voiceline.control import CONTROL_SOCKET, CommandError, request
from voiceline.datadir_lock import owner_of
from voiceline.sim.runner import CallReport, CallSpec
from voiceline.storage import DB_NAME

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


def unit_settings() -> dict[str, list[str]]:
    """The unit's `Key=value` lines: every value of each key, each split at spaces."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        key, equals, value = line.partition("=")
        if equals and not line.startswith(("#", "[")):
            settings.setdefault(key, []).extend(value.split())
    return settings


def test_the_unit_file_passes_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")  # `make test` installs it (Debian systemd)
    assert analyze is not None, "systemd-analyze is missing: run the tests through `make test`"
    text = UNIT.read_text(encoding="utf-8")
    assert "Type=notify" in text and "User=voiceline" in text
    # verify checks that ExecStart exists: point it at this environment's command.
    unit = tmp_path / "voiceline.service"
    unit.write_text(text.replace("/opt/voiceline/bin/voiceline", str(Path(sys.executable).parent / "voiceline")))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr  # unknown keys only warn: none allowed


def test_the_unit_grants_what_the_kernel_path_and_realtime_priority_need_and_no_more() -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing: run the tests through `make test`"
    settings = unit_settings()
    # Port 5060, the kernel path (its program and maps; its filters, attached over netlink), SCHED_RR.
    assert set(settings["AmbientCapabilities"]) == set(settings["CapabilityBoundingSet"]) == set(UNIT_CAPABILITIES)
    assert "AF_NETLINK" in settings["RestrictAddressFamilies"]
    allowed = system_calls(analyze, settings["SystemCallFilter"])
    assert {"bpf", "sched_setscheduler", "setsockopt", "sendmsg"} <= allowed
    assert not {"init_module", "mount", "kexec_load"} & allowed  # the allow list still keeps the rest out
    assert settings["NoNewPrivileges"] == ["yes"] and settings["ProtectSystem"] == ["strict"]


def system_calls(analyze: str, entries: list[str]) -> set[str]:
    """The system calls an allow list admits, its groups (and theirs) expanded by systemd-analyze."""
    calls: set[str] = set()
    for entry in entries:
        if not entry.startswith("@"):
            calls.add(entry)
            continue
        listed = subprocess.run([analyze, "syscall-filter", entry], capture_output=True, text=True, timeout=60)
        members = [line.strip() for line in listed.stdout.splitlines() if line.startswith(" ")]
        assert members, listed.stderr
        calls |= system_calls(analyze, [member for member in members if not member.startswith("#")])
    return calls


UNIT_CAPABILITIES = ("CAP_NET_BIND_SERVICE", "CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_NICE")


def as_the_unit(capabilities: tuple[str, ...]) -> list[str]:
    """setpriv: the rest runs with exactly `capabilities`, granted as the unit grants them (ambient),
    and no way to gain more. It keeps uid 0 (this environment's Python is root's) but uid 0 counts
    for nothing (securebits noroot), as for the unit's `voiceline` user."""
    names = ",".join(f"+{name.removeprefix('CAP_').lower()}" for name in capabilities)
    return [
        shutil.which("setpriv") or "/usr/bin/setpriv",  # Debian util-linux
        "--securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked",
        *(f"--{kind}=-all,{names}" for kind in ("inh-caps", "ambient-caps", "bounding-set")),
        "--no-new-privs",
    ]


def effective_capabilities(pid: int) -> set[str]:
    """The process's effective capabilities by name (capsh decodes the mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    [mask] = [line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")]
    capsh = shutil.which("capsh") or "/usr/sbin/capsh"  # `make test` installs it (Debian libcap2-bin)
    decoded = subprocess.run([capsh, f"--decode={mask}"], capture_output=True, text=True, timeout=30, check=True)
    names = decoded.stdout.strip().partition("=")[2]
    return {name.upper() for name in names.split(",") if name}


def test_under_the_units_capabilities_calls_go_through_the_kernel_path(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server(
        {"sip": {"answer_delay": 0.1}, "media": {"kernel_forwarding": "auto"}}, wrapper=as_the_unit(UNIT_CAPABILITIES)
    )
    assert effective_capabilities(server.process.pid) == set(UNIT_CAPABILITIES)
    target = server.uri("line")
    reports = sim_calls(
        [
            CallSpec(target, tone_hz=A_HZ, seconds=4.0 + CONNECTED_AFTER),
            CallSpec(target, tone_hz=B_HZ, seconds=3.5 + CONNECTED_AFTER, start_after=0.5),
        ]
    )
    for report in reports:
        assert report.connected and report.media_started and report.error is None, report
    assert server.stop() == 0
    events = server.log_events()
    assert [event["event"] for event in events].count("media.kernel_path_on") == 1
    assert not [event for event in events if event["event"] == "media.kernel_path_unavailable"]
    stats = [event for event in events if event["event"] == "call.media_stats"]
    assert len(stats) == 2 and all(leg["packets_in_kernel"] > 100 for leg in stats), stats


def test_without_cap_bpf_and_cap_net_admin_the_service_says_so_and_takes_calls_in_userspace(
    voiceline_server: Callable[..., Any],
) -> None:
    granted = tuple(name for name in UNIT_CAPABILITIES if name not in ("CAP_BPF", "CAP_NET_ADMIN"))
    server = voiceline_server({"media": {"kernel_forwarding": "auto"}}, wrapper=as_the_unit(granted))
    assert effective_capabilities(server.process.pid) == set(granted)
    [unavailable] = server.wait_for_event("media.kernel_path_unavailable")
    assert "CAP_BPF and CAP_NET_ADMIN" in unavailable["reason"]


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


def test_a_reload_and_a_drain_asked_for_during_start_up_are_done_once_it_has_started(tmp_path: Path) -> None:
    data_dir, config = tmp_path / "data", tmp_path / "voiceline.toml"
    seed_database(data_dir)
    config.write_text('[[lines]]\nname = "one"\nnumbers = ["100"]\n')
    holder = sqlite3.connect(data_dir / DB_NAME, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # start-up waits for the database (within its 5 s busy timeout)
    process = subprocess.Popen(
        [sys.executable, "-m", "voiceline", *serve_args(data_dir), "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while owner_of(data_dir) != process.pid:  # the data dir is ours: start-up is under way
            assert process.poll() is None and time.monotonic() < deadline, process.returncode
            time.sleep(0.01)
        process.send_signal(signal.SIGHUP)
        process.send_signal(signal.SIGUSR1)
        holder.rollback()
        out, _ = process.communicate(timeout=30)  # drained, with no calls: it exits by itself
    finally:
        holder.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, out
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert "sip.listening" in events and "provisioning.reloaded" in events and "service.drained" in events, events
    assert events.index("sip.listening") < events.index("service.drained") and "Traceback" not in out


def test_version() -> None:
    done = subprocess.run([sys.executable, "-m", "voiceline", "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == f"voiceline {__version__}"
