"""Starting and stopping the real `voiceline serve` process: one owner per data dir, `drain` and
`status` that never signal a pid from a file, start-up failures that say what is wrong and exit,
and a stop that keeps its deadline while the database is locked."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from port_table import port_block
from rawsip import Dialer, RawPeer, to_tag
from voiceline.app import STOP_GRACE
from voiceline.datadir_lock import LOCK_FILE, RETIRED_PID_FILE, DataDirLock, owner_of
from voiceline.sim.plugin import VoicelineServer, start_server
from voiceline.startup import ExitCode
from voiceline.storage import DB_NAME, Storage

pytestmark = pytest.mark.integration

BOUND = 30.0  # a command that takes longer than this hangs
RTP_PORTS = "{}-{}".format(port_block("test_lifecycle")[0], port_block("test_lifecycle")[0] + 49)
SDP_PORT = port_block("test_lifecycle")[0] + 50  # named in our offers, bound by nobody


def voiceline(*args: str, timeout: float = BOUND) -> subprocess.CompletedProcess[str]:
    """Run a voiceline command; fail the test (rather than wait) if it hangs."""
    try:
        command = [sys.executable, "-m", "voiceline", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`voiceline {' '.join(args)}` still ran after {timeout:g} s")


def serve_args(data_dir: Path) -> list[str]:
    return [
        "serve", "--listen", "127.0.0.1:0", "--rtp-ports", RTP_PORTS,
        "--data-dir", str(data_dir), "--log-format", "json",
    ]  # fmt: skip


def refused_start(result: subprocess.CompletedProcess[str], code: ExitCode, words: str) -> None:
    """The process exited with `code` and said why in one line on stderr."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("voiceline: cannot start: ") and words in lines[0], lines


def seed_database(data_dir: Path) -> None:
    """A valid voiceline database, as a stopped service leaves it."""

    async def create() -> None:
        storage = await Storage.open(data_dir)
        await storage.close()

    asyncio.run(create())


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process whose pid a stale file names: SIGUSR1 (or any signal voiceline might send) ends it."""
    process = subprocess.Popen(["sleep", "120"])
    yield process
    process.kill()
    process.wait()


def test_a_second_serve_on_the_same_data_dir_is_refused_and_the_first_goes_on(
    voiceline_server: Callable[..., VoicelineServer],
) -> None:
    server = voiceline_server()
    second = voiceline(*serve_args(server.data_dir))
    refused_start(second, ExitCode.ALREADY_RUNNING, f"another voiceline (pid {server.process.pid}) already serves")
    assert server.process.poll() is None
    status = voiceline("status", "--json", "--data-dir", str(server.data_dir))
    assert status.returncode == 0 and json.loads(status.stdout)["draining"] is False
    assert (server.data_dir / LOCK_FILE).read_text() == f"{server.process.pid}\n"


def test_drain_and_status_with_no_service_and_stale_files_signal_nothing(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    empty = voiceline("drain", "--data-dir", str(tmp_path / "never-used"))
    assert empty.returncode == 1 and "no running service" in empty.stderr
    assert not (tmp_path / "never-used").exists()  # asking creates nothing
    # What a service killed with -9 (of this or an older version) leaves: both files name a pid
    # that now belongs to an unrelated process.
    (tmp_path / RETIRED_PID_FILE).write_text(f"{bystander.pid}\n")
    (tmp_path / LOCK_FILE).write_text(f"{bystander.pid}\n")
    for command in (["drain"], ["drain", "--undo"], ["status"], ["status", "--json"]):
        result = voiceline(*command, "--data-dir", str(tmp_path))
        assert result.returncode == 1 and "no running service" in result.stderr, (command, result.stderr)
    with pytest.raises(subprocess.TimeoutExpired):
        bystander.wait(timeout=0.3)  # still running: nothing was signalled
    assert (tmp_path / RETIRED_PID_FILE).read_text() == f"{bystander.pid}\n"  # and nothing was touched


def test_drain_and_status_name_an_owner_whose_control_socket_does_not_answer(tmp_path: Path) -> None:
    owner = DataDirLock.acquire(tmp_path)  # this process, as a service still starting would
    try:
        for command in ("drain", "status"):
            result = voiceline(command, "--data-dir", str(tmp_path))
            assert result.returncode == 1
            assert f"a service (pid {os.getpid()}) holds {tmp_path} but its control socket does not answer" in (
                result.stderr
            )
    finally:
        owner.release()


def test_after_kill_9_a_restart_takes_the_data_dir_and_drain_finds_it(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    first = start_server(tmp_path / "node", {})
    first.process.kill()
    first.process.wait()
    assert (first.data_dir / LOCK_FILE).read_text() == f"{first.process.pid}\n"  # stale, and harmless
    (first.data_dir / RETIRED_PID_FILE).write_text(f"{bystander.pid}\n")
    assert "no running service" in voiceline("drain", "--data-dir", str(first.data_dir)).stderr

    second = start_server(tmp_path / "node", {})
    try:
        assert (second.data_dir / LOCK_FILE).read_text() == f"{second.process.pid}\n"
        assert not (second.data_dir / RETIRED_PID_FILE).exists()  # a stale pid file does not survive a start
        drained = voiceline("drain", "--data-dir", str(second.data_dir))
        assert drained.returncode == 0 and "draining" in drained.stdout
        assert second.process.wait(timeout=BOUND) == 0  # no calls: the drain ends at once
    finally:
        second.stop()
    assert bystander.poll() is None
    assert (second.data_dir / LOCK_FILE).read_text() == ""


def in_mount_namespace(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`script` (sh, arguments $1 ...) as root of a user and mount namespace of its own: its mounts
    vanish with it and need no privileges outside. Fails the test if it hangs."""
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *args]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {BOUND:g} s: a start-up that hangs")


READ_ONLY_SERVE = """
set -e
mount --bind "$1" "$1"
mount -o remount,bind,ro "$1"
shift
exec "$@"
"""


@pytest.mark.parametrize("existing", [False, True], ids=["new data dir", "data dir with a database"])
def test_a_read_only_data_dir_is_named_and_the_process_exits(tmp_path: Path, existing: bool) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    if existing:
        seed_database(data_dir)
    before = sorted(os.listdir(data_dir))
    serve = [sys.executable, "-m", "voiceline", *serve_args(data_dir)]
    result = in_mount_namespace(READ_ONLY_SERVE, str(tmp_path), *serve)
    refused_start(result, ExitCode.READ_ONLY, f"{data_dir} is on a read-only file system")
    assert sorted(os.listdir(data_dir)) == before


FULL_DISK_SERVE = """
set -e
mount -t tmpfs -o size=512k voiceline-test "$1"
mkdir -m 0700 "$1/data"
cp -a "$2/." "$1/data/"
dd if=/dev/zero of="$1/filler" bs=4k 2>/dev/null || true
shift 2
code=0
"$@" || code=$?
ls -A "$1/data" > "$3"
exit $code
"""


def test_a_full_disk_is_named_and_leaves_no_stray_file(tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    seed.mkdir(mode=0o700)
    seed_database(seed)
    (seed / LOCK_FILE).write_text("1\n")  # a page of its own, freed when the next owner rewrites it
    mount_point, listing = tmp_path / "mnt", tmp_path / "listing"
    mount_point.mkdir()
    data_dir = mount_point / "data"
    script = FULL_DISK_SERVE.replace('ls -A "$1/data" > "$3"', f'ls -A "{data_dir}" > "{listing}"')
    result = in_mount_namespace(
        script, str(mount_point), str(seed), sys.executable, "-m", "voiceline", *serve_args(data_dir)
    )
    refused_start(result, ExitCode.DISK_FULL, "no space left")
    assert sorted(listing.read_text().split()) == [DB_NAME, LOCK_FILE]  # no -shm or -wal left behind


def test_a_corrupt_database_is_named_and_left_untouched(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    garbage = b"this was never a database\n" * 200
    (data_dir / DB_NAME).write_bytes(garbage)
    result = voiceline(*serve_args(data_dir))
    refused_start(result, ExitCode.DATABASE_CORRUPT, "is damaged or not a voiceline database")
    assert (data_dir / DB_NAME).read_bytes() == garbage
    assert sorted(os.listdir(data_dir)) == [DB_NAME, LOCK_FILE]


def test_a_database_locked_by_another_process_is_named_after_the_busy_timeout(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    seed_database(data_dir)
    holder = sqlite3.connect(data_dir / DB_NAME, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        result = voiceline(*serve_args(data_dir))
    finally:
        holder.close()
    refused_start(result, ExitCode.DATABASE_LOCKED, "is locked by another process")


def test_sigterm_during_a_start_held_up_by_a_locked_database_ends_it_within_the_deadline(tmp_path: Path) -> None:
    data_dir, config = tmp_path / "data", tmp_path / "voiceline.toml"
    seed_database(data_dir)
    config.write_text("[sip]\nshutdown_timeout = 1.0\n")
    holder = sqlite3.connect(data_dir / DB_NAME, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        process = subprocess.Popen(
            [sys.executable, "-m", "voiceline", *serve_args(data_dir), "--config", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            end = time.monotonic() + BOUND
            while owner_of(data_dir) != process.pid:  # the data dir is ours: start-up is under way
                assert process.poll() is None and time.monotonic() < end, process.returncode
                time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            out, err = process.communicate(timeout=BOUND)
            took = time.monotonic() - sent
        finally:
            process.kill()
            process.wait()
    finally:
        holder.close()
    assert process.returncode == 0, err
    assert took < 1.0 + STOP_GRACE, took  # not the 5 s busy timeout of the statement under way
    assert "Traceback" not in out + err and "sip.listening" not in out


async def answered_call(peer: RawPeer, server: tuple[str, int]) -> Dialer:
    dialer = Dialer(peer, server)
    dialer.invite(rtp_port=SDP_PORT)
    ok = await peer.response(status=200, timeout=5)
    dialer.ack(to_tag(ok))
    return dialer


async def test_sigterm_while_the_database_is_locked_keeps_the_deadline_and_answers_503_meanwhile(
    voiceline_server: Callable[..., VoicelineServer],
) -> None:
    shutdown_timeout = 3.0
    server = voiceline_server({"sip": {"answer_delay": 0.0, "shutdown_timeout": shutdown_timeout}})
    address = (server.host, server.port)
    caller, latecomer = await RawPeer.open(), await RawPeer.open()
    holder = sqlite3.connect(server.data_dir / DB_NAME, isolation_level=None)
    try:
        await answered_call(caller, address)
        server.wait_for_event("call.confirmed")
        holder.execute("BEGIN EXCLUSIVE")  # the call's statistics cannot be written now
        server.process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        bye = await caller.request("BYE", timeout=3)  # stopping has begun: every call gets its BYE
        assert bye.headers.get("Call-ID")
        # New calls during the stop are refused with 503, again and again until the process is gone.
        refusals = 0
        while server.process.poll() is None:
            Dialer(latecomer, address).invite(rtp_port=SDP_PORT)
            try:
                refusal = await latecomer.response(timeout=0.5)
            except TimeoutError:
                break  # the process ended meanwhile
            assert refusal.status == 503 and refusal.headers.get("Retry-After"), refusal.status
            refusals += 1
            await asyncio.sleep(0.3)
        assert await asyncio.to_thread(server.process.wait, shutdown_timeout + 5) == 0
        took = time.monotonic() - sent
    finally:
        holder.close()
        caller.close()
        latecomer.close()
    assert refusals >= 3, refusals  # 503s over most of the 3 s
    # Within the deadline (and its grace, past which the process would have ended itself with
    # another status), not after the 5 s busy timeout of each pending write.
    assert took < shutdown_timeout + STOP_GRACE, took
    # The call's statistics, held while the database was locked, are given up at the deadline and counted.
    [deadline] = [event for event in server.log_events() if event.get("event") == "service.stop_deadline"]
    assert deadline["abandoned_records"] >= 1 and "storage" in deadline["unfinished"]
    assert "Traceback" not in server.log_text()
