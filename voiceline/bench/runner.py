"""The bench run: start a server, ramp the pair count level by level, report each level.

Levels add pairs to those already up (calls are placed once and held), so a
run also measures how fast calls are set up. After a level's calls are up
and every leg hears its partner, a window of `hold_seconds` is measured.

`compare` runs the same generator against voiceline and against rtpengine
(userspace, set up over its ng protocol), alternating which goes first,
scenario by scenario, and prints CPU per relayed packet side by side. Each
repetition starts with a baseline: the same generator with no relay (each
leg sends straight to its partner's port), whose whole-machine busy time
is what a relay's run is compared with (`whole us/pkt`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from voiceline.bench.generator import DIRECT_PAIRS, NG_PAIRS, SIP_CALLS, generator_main, raise_open_file_limit
from voiceline.bench.ng import NgClient, NgError
from voiceline.bench.measure import (
    LOSS_BUDGET,
    MIN_OFFERED,
    P99_BUDGET_MS,
    LatencyHistogram,
    LevelResult,
    WindowCounts,
    largest_within_budget,
)
from voiceline.bench.uac import PCMU_WITH_EVENTS, Scenario

LOOPBACK = "127.0.0.1"
LEG_IDS_PER_WORKER = 1_000_000
SETUP_TIMEOUT_SECONDS = 120.0
# After setup, before measuring: a setup burst keeps the server busy enough that the kernel's
# real-time throttling (5 % of each second left to other processes) stalls it for tens of ms
# just after; the window measures the relay once that has passed.
SETTLE_SECONDS = 3.0  # at least, after a level's calls are set up
SETTLE_LIMIT_SECONDS = 30.0  # at most: then the window starts anyway
# A relay has caught up with the set-up burst once its sockets hold less than this per leg (a
# datagram takes about 1 KiB of a socket's buffer): a few milliseconds of traffic at most.
CAUGHT_UP_BYTES_PER_LEG = 256
WINDOW_DELAY_SECONDS = 0.2  # every worker has the window before it starts
REPLY_MARGIN_SECONDS = 15.0
SERVER_READY_SECONDS = 15.0
SERVER_STOP_SECONDS = 15.0
GIVE_UP_LOSS = 0.05  # a level this bad means higher levels only waste time
BENCH_MAX_CALLS = 10_000  # the server's sip.max_calls for a bench: never the limit measured
BENCH_INVITE_RATE = 10_000  # its per-source INVITE rate and burst
GIVE_UP_P99_MS = 50.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class BenchOptions:
    levels: Sequence[int]
    hold_seconds: float = 8.0
    workers: int = 2
    host: str = LOOPBACK
    realtime_priority: int = 0  # SCHED_RR for the server, one lower for the generator; 0: normal scheduling
    scenario: Scenario = PCMU_WITH_EVENTS


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0.0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def busy_seconds() -> float:
    """CPU time the whole machine spent busy so far (all CPUs: user, system, interrupts, softirq):
    time since boot on every CPU less the idle time. Not the sum of /proc/stat's busy fields: those
    are sampled at each scheduler tick (4 ms here), and the generator's 1 ms send grid keeps a
    steady phase to the tick, so what they catch swung from run to run. The idle time is counted
    exactly (a tickless kernel clocks each idle stretch)."""
    lines = Path("/proc/stat").read_text().splitlines()
    fields = [int(field) for field in lines[0].split()[1:]]
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu"))
    idle, iowait = fields[3], fields[4]
    return cpus * time.clock_gettime(time.CLOCK_BOOTTIME) - (idle + iowait) / _CLOCK_TICKS


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets `pid` has open."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def queued_bytes(inodes: set[int]) -> int:
    """What the UDP sockets with these inodes hold received and not yet read, in buffer bytes."""
    total = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()  # sl local remote st tx_queue:rx_queue tr:when retrnsmt uid timeout inode
            if int(fields[9]) in inodes:
                total += int(fields[4].partition(":")[2], 16)
    return total


def wait_until_caught_up(pid: int, legs: int) -> float:
    """Wait (up to SETTLE_LIMIT_SECONDS) until relay `pid` has read the backlog a set-up burst left in
    its sockets; return the seconds waited. A relay still reading it would be measured behind."""
    inodes, start = socket_inodes(pid), time.monotonic()
    below = 0
    while below < 2 and time.monotonic() - start < SETTLE_LIMIT_SECONDS:
        below = below + 1 if queued_bytes(inodes) < CAUGHT_UP_BYTES_PER_LEG * legs else 0
        time.sleep(0.1)
    return time.monotonic() - start


def rss_mb(pid: int) -> float:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except OSError:
        return 0.0
    return pages * _PAGE_BYTES / 2**20


class _Workers:
    """The generator processes and their command pipes."""

    def __init__(
        self, count: int, server: tuple[str, int], host: str, realtime_priority: int, scenario: Scenario, pairing: str
    ) -> None:
        context = multiprocessing.get_context("fork")
        self.pipes: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for index in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=generator_main,
                args=(theirs, server, host, 1 + index * LEG_IDS_PER_WORKER, realtime_priority, scenario, pairing),
                daemon=True,
            )
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes if process.pid is not None]

    def send(self, commands: Sequence[tuple[Any, ...]]) -> None:
        for pipe, command in zip(self.pipes, commands):
            pipe.send(command)

    def broadcast(self, command: tuple[Any, ...]) -> None:
        self.send([command] * len(self.pipes))

    def replies(self, kind: str, timeout: float) -> list[tuple[Any, ...]]:
        deadline = time.monotonic() + timeout
        return [_reply(pipe, kind, deadline) for pipe in self.pipes]

    def in_turn(self, commands: Sequence[tuple[Any, ...]], kind: str, timeout: float) -> list[tuple[Any, ...]]:
        """Each process its command once the one before has answered it with `kind`."""
        replies = []
        for pipe, command in zip(self.pipes, commands):
            pipe.send(command)
            replies.append(_reply(pipe, kind, time.monotonic() + timeout))
        return replies

    def stop(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()


def _reply(pipe: Connection, kind: str, deadline: float) -> tuple[Any, ...]:
    if not pipe.poll(max(0.0, deadline - time.monotonic())):
        raise RuntimeError(f"a generator process sent no {kind!r} in time")
    reply: tuple[Any, ...] = pipe.recv()
    if reply[0] != kind:
        raise RuntimeError(f"a generator process answered {reply[0]!r}, expected {kind!r}")
    return reply


def run_levels(
    server: tuple[str, int],
    server_pid: int | None,
    options: BenchOptions,
    report: Callable[[LevelResult], None] = lambda result: None,
    on_workers: Callable[[list[int]], None] = lambda pids: None,
    pairing: str = SIP_CALLS,
) -> list[LevelResult]:
    """Ramp through `options.levels` (pair counts, ascending) against a running server (with
    `NG_PAIRS`: a running rtpengine, `server` its ng address; with `DIRECT_PAIRS` none: the legs
    send to each other)."""
    raise_open_file_limit()
    # The generator stands in for callers elsewhere: one real-time step below the server, so it
    # never delays the relay it measures (SCHED_RR alternates equal priorities every 100 ms).
    workers = _Workers(
        options.workers, server, options.host, max(0, options.realtime_priority - 1), options.scenario, pairing
    )
    time.sleep(0.2)  # let the generator processes set themselves up
    on_workers(workers.pids)
    results: list[LevelResult] = []
    pairs = 0
    try:
        for level in options.levels:
            if level <= pairs:
                continue
            result = _run_level(workers, server_pid, options, level, level - pairs, pairing)
            pairs = level
            results.append(result)
            report(result)
            if result.loss > GIVE_UP_LOSS or result.p99_ms > GIVE_UP_P99_MS or result.pairs_held < level:
                break
        workers.broadcast(("hangup",))
        workers.replies("hung_up", REPLY_MARGIN_SECONDS)
    finally:
        workers.stop()
    return results


def _run_level(
    workers: _Workers, server_pid: int | None, options: BenchOptions, level: int, pairs: int, pairing: str
) -> LevelResult:
    count = len(workers.pipes)
    # Two calls per pair in each process: rtpengine's pairs are made within one process.
    commands = [("calls", 2 * (pairs // count + (1 if index < pairs % count else 0))) for index in range(count)]
    if options.scenario.transcoded_to is not None and pairing == SIP_CALLS:
        # One process after the other: each places its calls one at a time, so the pool pairs them
        # in order, each caller with the next (of the other codec); two at once would mix them.
        ready = workers.in_turn(commands, "ready", SETUP_TIMEOUT_SECONDS)
    else:
        workers.send(commands)
        ready = workers.replies("ready", SETUP_TIMEOUT_SECONDS)
    answered = sum(reply[1] for reply in ready)
    started = min(reply[3] for reply in ready)
    last_answer = max(reply[4] for reply in ready)
    setup_rate = answered / (last_answer - started) if answered and last_answer > started else 0.0
    legs_heard = sum(reply[6] for reply in ready)
    legs_own_codec = sum(reply[7] for reply in ready)
    time.sleep(SETTLE_SECONDS)
    settle = SETTLE_SECONDS + (wait_until_caught_up(server_pid, 2 * level) if server_pid else 0.0)

    window_start = time.time_ns() + int(WINDOW_DELAY_SECONDS * 1e9)
    window_end = window_start + int(options.hold_seconds * 1e9)
    workers.broadcast(("window", window_start, window_end))
    time.sleep(max(0.0, (window_start - time.time_ns()) / 1e9))
    server_before = cpu_seconds(server_pid) if server_pid else 0.0
    generator_before = sum(cpu_seconds(pid) for pid in workers.pids)
    busy_before = busy_seconds()
    wall_before = time.monotonic()
    time.sleep(max(0.0, (window_end - time.time_ns()) / 1e9))
    wall = time.monotonic() - wall_before
    busy = busy_seconds() - busy_before
    server_cpu = 100 * (cpu_seconds(server_pid) - server_before) / wall if server_pid else 0.0
    generator_cpu = 100 * (sum(cpu_seconds(pid) for pid in workers.pids) - generator_before) / wall
    server_rss = rss_mb(server_pid) if server_pid else 0.0

    stats = workers.replies("stats", options.hold_seconds + REPLY_MARGIN_SECONDS)
    counts = WindowCounts()
    latency = LatencyHistogram()
    for _, worker_counts, worker_latency in stats:
        counts.merge(worker_counts)
        latency.merge(LatencyHistogram(worker_latency))
    return LevelResult(
        pairs=level,
        pairs_held=min(level, legs_heard // 2),
        counts=counts,
        latency=latency,
        setup_rate=setup_rate,
        server_cpu=server_cpu,
        server_rss_mb=server_rss,
        generator_cpu=generator_cpu,
        seconds=options.hold_seconds,
        system_cpu=max(0.0, 100 * busy / wall - generator_cpu),
        machine_cpu=100 * busy / wall,
        settle_seconds=settle,
        own_codec_legs=legs_own_codec,
    )


# -- the server and the report ----------------------------------------------------


def _free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def start_server(
    directory: Path,
    rtp_ports: str,
    host: str = LOOPBACK,
    realtime_priority: int = 0,
    media_options: Sequence[tuple[str, str]] = (),
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """`voiceline serve` on loopback, answering at once; returns it once it listens. `media_options`
    are more `[media]` settings (key, TOML value)."""
    media = "".join(f"{key} = {value}\n" for key, value in media_options)
    port = _free_udp_port(host)
    config = directory / "voiceline.toml"
    config.write_text(
        f'[sip]\nlisten = "{host}:{port}"\npublic_address = "{host}"\nanswer_delay = 0.0\ntransports = ["udp"]\n'
        # Every generated call comes from one address, as from one carrier: room for all of them.
        f"max_calls = {BENCH_MAX_CALLS}\ninvite_rate = {BENCH_INVITE_RATE}\ninvite_burst = {BENCH_INVITE_RATE}\n\n"
        f'[media]\nrtp_ports = "{rtp_ports}"\nrealtime_priority = {realtime_priority}\n{media}\n'
        f'[storage]\ndata_dir = "{directory / "data"}"\n\n'
        # Callers who know the line: no welcome, no choice; a pair talks after the connect prompts.
        "[welcome]\nenabled = false\noffer_choice = false\n\n"
        '[log]\nformat = "json"\nlevel = "info"\n',
        encoding="utf-8",
    )
    log_path = directory / "server.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "voiceline", "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    deadline = time.monotonic() + SERVER_READY_SECONDS
    while b'"sip.listening"' not in log_path.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"voiceline serve did not start; see {log_path}")
        time.sleep(0.05)
    return process, port, log_path


def stop_server(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(SERVER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


_COLUMNS = (
    f"{'pairs':>6} {'held':>5} {'load %':>6} {'pkts in':>9} {'pkts out':>9} {'loss %':>7} {'p50 ms':>7} {'p99 ms':>7} "
    f"{'setup/s':>8} {'srv CPU%':>8} {'/100p':>6} {'RSS MB':>7} {'/100p':>6} {'gen CPU%':>8}  budget"
)


def format_result(result: LevelResult, idle_rss_mb: float = 0.0) -> str:
    """One table row; RSS per 100 pairs is what the server grew beyond `idle_rss_mb`."""
    per_100 = 100 / result.pairs
    return (
        f"{result.pairs:>6} {result.pairs_held:>5} {100 * result.offered:>6.1f} {result.counts.sent:>9} {result.counts.received:>9} "
        f"{100 * result.loss:>7.3f} {result.p50_ms:>7.2f} {result.p99_ms:>7.2f} {result.setup_rate:>8.0f} "
        f"{result.server_cpu:>8.1f} {result.server_cpu * per_100:>6.1f} {result.server_rss_mb:>7.1f} "
        f"{(result.server_rss_mb - idle_rss_mb) * per_100:>6.1f} {result.generator_cpu:>8.1f}  {'ok' if result.within_budget else 'MISS'}"
    )


def bench(options: BenchOptions, rtp_ports: str) -> int:
    """`make bench`: the whole run with its printed report. Returns the exit status."""
    raise_open_file_limit()
    print(f"voiceline bench: {os.cpu_count()} CPUs, load average {_loadavg()}, "
          f"{options.workers} generator processes, {options.hold_seconds:g} s per level")
    print(f"budget: loss < {100 * LOSS_BUDGET:g} %, p99 added latency < {P99_BUDGET_MS:g} ms, "
          f"load >= {100 * MIN_OFFERED:g} %")
    print("load %: share of the full load (50 packets/s per leg) the generator sent; pkts in: probes sent to "
          "the server in the window; pkts out: those relayed back; CPU % of one core; RSS /100p: growth over "
          "idle per 100 pairs")
    with tempfile.TemporaryDirectory(prefix="voiceline-bench-") as directory:
        process, port, log_path = start_server(Path(directory), rtp_ports, options.host, options.realtime_priority)
        try:
            idle_rss = rss_mb(process.pid)
            print(f"server pid {process.pid}, SIP {options.host}:{port}, RTP {rtp_ports}, idle RSS {idle_rss:.1f} MB, "
                  f"scheduling {_policy(process.pid)}")
            results = run_levels(
                (options.host, port),
                process.pid,
                options,
                lambda result: print(format_result(result, idle_rss), flush=True),
                on_workers=lambda pids: print(f"generator scheduling {_policy(pids[0])}\n{_COLUMNS}", flush=True),
            )
        finally:
            status = stop_server(process)
        if status != 0:
            print(f"voiceline serve exited with status {status}; log:\n{log_path.read_text()[-3000:]}")
            return 1
    best = largest_within_budget(results)
    print(f"load average {_loadavg()}")
    print(f"largest N within budget (loss < {100 * LOSS_BUDGET:g} %, p99 < {P99_BUDGET_MS:g} ms, "
          f"every level up to it too): {best} pairs")
    return 0


def _policy(pid: int) -> str:
    try:
        if os.sched_getscheduler(pid) == os.SCHED_RR:
            return f"SCHED_RR {os.sched_getparam(pid).sched_priority}"
        return f"normal (SCHED_OTHER), nice {os.getpriority(os.PRIO_PROCESS, pid)}"
    except OSError:
        return "unknown"


def _loadavg() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


# -- side by side with rtpengine ---------------------------------------------------

RTPENGINE = "rtpengine"  # Debian rtpengine-daemon (`make bench` installs it)
VOICELINE = "voiceline"
BASELINE = "no relay"  # the generator's legs sending straight to each other


def start_rtpengine(
    directory: Path, rtp_ports: str, host: str = LOOPBACK, ng_port: int | None = None
) -> tuple[subprocess.Popen[bytes], tuple[str, int]]:
    """rtpengine on loopback, userspace only (no kernel table), its ng port `ng_port` (any free one
    when None); returns it once that port answers."""
    low, high = (int(port) for port in rtp_ports.split("-"))
    ng = (host, ng_port or _free_udp_port(host))
    log_path = directory / "rtpengine.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                RTPENGINE, "--config-file=none", "--table=-1", f"--interface={host}", f"--listen-ng={ng[0]}:{ng[1]}",
                f"--port-min={low}", f"--port-max={high}", "--foreground", "--log-stderr", "--log-level=4",
                "--delete-delay=0", f"--pidfile={directory / 'rtpengine.pid'}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    client = NgClient(ng)
    deadline = time.monotonic() + SERVER_READY_SECONDS
    try:
        while True:
            try:
                client.command("ping")
                return process, ng
            except NgError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    raise RuntimeError(f"rtpengine did not start: {log_path.read_text()[-2000:]}") from None
    finally:
        client.close()


def _set_realtime(pid: int, priority: int) -> None:
    """SCHED_RR for every thread of `pid` (rtpengine runs worker threads)."""
    if not priority:
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setscheduler(int(task.name), os.SCHED_RR, os.sched_param(priority))
        except OSError:
            return


def media_options(relay: str) -> list[tuple[str, str]]:
    """The `[media]` settings of a relay named `voiceline:key=value,...` (a string value is quoted)."""
    options = []
    for setting in relay.partition(":")[2].split(","):
        key, equals, value = setting.partition("=")
        if not setting:
            continue
        if not equals or not key.strip():
            raise ValueError(f"not a key=value media setting: {setting!r}")
        value = value.strip()
        literal = value in ("true", "false") or value.replace(".", "", 1).isdigit()
        options.append((key.strip(), value if literal else '"' + value.replace('"', "") + '"'))
    return options


def run_relay(relay: str, options: BenchOptions, rtp_ports: str, rtpengine_ports: str) -> list[LevelResult]:
    """One relay, started for this run and stopped after it, under `options`' load: `rtpengine`, or
    `voiceline` optionally with media settings (`voiceline:kernel_forwarding=off`)."""
    with tempfile.TemporaryDirectory(prefix="voiceline-bench-") as directory:
        if relay.partition(":")[0] == VOICELINE:
            process, port, log_path = start_server(
                Path(directory), rtp_ports, options.host, options.realtime_priority, media_options(relay)
            )
            address, pairing = (options.host, port), SIP_CALLS
        else:
            process, address = start_rtpengine(Path(directory), rtpengine_ports, options.host)
            _set_realtime(process.pid, options.realtime_priority)
            log_path, pairing = Path(directory) / "rtpengine.log", NG_PAIRS
        try:
            return run_levels(address, process.pid, options, pairing=pairing)
        finally:
            if stop_server(process) not in (0, -signal.SIGTERM):
                print(f"{relay} exited with status {process.returncode}; log:\n{log_path.read_text()[-3000:]}")


def run_baseline(options: BenchOptions) -> list[LevelResult]:
    """`options`' load with no relay: the generator's legs in pairs, each sending to its partner."""
    return run_levels((options.host, 0), None, options, pairing=DIRECT_PAIRS)


_SIDE_BY_SIDE_COLUMNS = (
    f"{'scenario':<12} {'relay':<12} {'pairs':>5} {'held':>5} {'load %':>6} {'pkts out':>9} {'loss %':>7} {'p50 ms':>7} {'p99 ms':>7} "
    f"{'p99.9 ms':>8} {'proc us/pkt':>11} {'sys us/pkt':>10} {'whole us/pkt':>12} {'attr us/pkt':>11} {'gen us/pkt':>10} {'settle s':>8}"
)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_side_by_side(scenario: str, relay: str, result: LevelResult) -> str:
    """One row: CPU per relayed packet of the relay process, of the whole machine without the
    generator, and of the whole machine beyond the no-relay baseline; held: the pairs up and hearing
    each other (transcoding: each leg its partner's tone, transcoded), and any legs that were paired
    with a leg of their own codec."""
    own_codec = f"  {result.own_codec_legs} legs heard their own codec, untranscoded" if result.own_codec_legs else ""
    return (
        f"{scenario:<12} {relay:<12} {result.pairs:>5} {result.pairs_held:>5} {100 * result.offered:>6.1f} {result.counts.received:>9} {100 * result.loss:>7.3f} "
        f"{result.p50_ms:>7.2f} {result.p99_ms:>7.2f} {result.p999_ms:>8.2f} "
        f"{result.per_packet_us(result.server_cpu):>11.2f} {result.per_packet_us(result.system_cpu):>10.2f} "
        f"{_figure(result.whole_us):>12} {_figure(result.attributed_us):>11} {result.per_packet_us(result.generator_cpu):>10.2f} {result.settle_seconds:>8.1f}{own_codec}"
    )


def compare(
    options: BenchOptions,
    scenarios: Sequence[Scenario],
    repetitions: int,
    rtp_ports: str,
    rtpengine_ports: str,
    relays: Sequence[str] = (VOICELINE, RTPENGINE),
    scenario_levels: bool = False,
) -> dict[tuple[str, str, int], list[LevelResult]]:
    """Every scenario at every level (with `scenario_levels`, a scenario's own levels where it has
    them) against every relay, `repetitions` times, rotating which relay goes first, each repetition
    after its no-relay baseline at all those levels; prints each row as it is measured. Results by
    (scenario, relay, pairs), each with its repetition's baseline."""
    results: dict[tuple[str, str, int], list[LevelResult]] = {}
    levels = {
        scenario.name: (scenario.levels if scenario_levels and scenario.levels else options.levels)
        for scenario in scenarios
    }
    baseline_options = replace(options, levels=sorted({pairs for each in levels.values() for pairs in each}))
    print(_SIDE_BY_SIDE_COLUMNS, flush=True)
    for repetition in range(repetitions):
        baseline = {result.pairs: result for result in run_baseline(baseline_options)}
        for pairs, base in baseline.items():
            print(
                f"{'-':<12} {BASELINE:<12} {pairs:>5} machine busy {base.machine_cpu:.1f} % of a core, generator "
                f"{base.generator_cpu:.1f} %",
                flush=True,
            )
        for index, scenario in enumerate(scenarios):
            first = (repetition + index) % len(relays)
            for relay in [*relays[first:], *relays[:first]]:
                scenario_options = replace(options, scenario=scenario, levels=levels[scenario.name])
                for result in run_relay(relay, scenario_options, rtp_ports, rtpengine_ports):
                    measured = baseline.get(result.pairs)
                    if measured is not None:
                        result = replace(
                            result, baseline_cpu=measured.machine_cpu, baseline_generator_cpu=measured.generator_cpu
                        )
                    results.setdefault((scenario.name, relay, result.pairs), []).append(result)
                    print(format_side_by_side(scenario.name, relay, result), flush=True)
    return results


def summarise(results: dict[tuple[str, str, int], list[LevelResult]]) -> list[str]:
    """Per scenario, level and relay: the median CPU per packet, and each voiceline relay's ratio to
    rtpengine's."""
    lines = [
        f"{'scenario':<12} {'pairs':>5} {'relay':<12} {'proc us/pkt':>11} {'sys us/pkt':>10} {'whole us/pkt':>12} "
        f"{'attr us/pkt':>11} {'ratio proc/sys/whole/attr':>25}"
    ]
    medians = {
        key: (
            _median([run.per_packet_us(run.server_cpu) for run in runs]),
            _median([run.per_packet_us(run.system_cpu) for run in runs]),
            _median([whole for run in runs if (whole := run.whole_us) is not None]),
            _median([attributed for run in runs if (attributed := run.attributed_us) is not None]),
        )
        for key, runs in results.items()
    }
    for (scenario, relay, pairs), figures in sorted(medians.items(), key=lambda item: (item[0][0], item[0][2])):
        theirs = medians.get((scenario, RTPENGINE, pairs))
        ratio = "-" if relay == RTPENGINE or theirs is None else "/".join(
            f"{ours / base:.2f}" if base else "-" for ours, base in zip(figures, theirs)
        )
        proc, system, whole, attributed = figures
        lines.append(
            f"{scenario:<12} {pairs:>5} {relay:<12} {proc:>11.2f} {system:>10.2f} {whole:>12.2f} {attributed:>11.2f} {ratio:>25}"
        )
    return lines


def _median(values: list[float]) -> float:
    """The median, 0 when nothing was measured."""
    return statistics.median(values) if values else 0.0


def bench_side_by_side(
    options: BenchOptions,
    scenarios: Sequence[Scenario],
    repetitions: int,
    rtp_ports: str,
    rtpengine_ports: str,
    relays: Sequence[str] = (VOICELINE, RTPENGINE),
    scenario_levels: bool = False,
) -> int:
    """`make bench`'s side-by-side run with its printed report. Returns the exit status."""
    raise_open_file_limit()
    print(f"voiceline and rtpengine side by side: {os.cpu_count()} CPUs, load average {_loadavg()}, "
          f"{options.workers} generator processes, {options.hold_seconds:g} s per level, {repetitions} repetitions")
    print("proc us/pkt: the relay process's CPU (user + system, all threads) per relayed packet; sys us/pkt: the "
          "whole machine's busy time (softirq included) less the generator's, per relayed packet (includes any "
          "other load on the machine); whole us/pkt: the whole machine's busy time less that of the same load "
          "with no relay (the legs sending straight to each other, measured first in each repetition), per "
          "relayed packet: the relay and the kernel's work for it wherever it ran, also in the generator's "
          "context (on loopback the kernel path forwards there); attr us/pkt: the same by process, the relay's "
          "CPU plus the generator's beyond its baseline (unmoved by other processes); gen us/pkt: the "
          "generator's own, excluded")
    results = compare(options, scenarios, repetitions, rtp_ports, rtpengine_ports, relays, scenario_levels)
    print(f"load average {_loadavg()}")
    print("\n".join(summarise(results)))
    return 0
