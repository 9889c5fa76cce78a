"""Run simulated calls: specs in, reports out, across pjsua2 worker processes.

pjsua2 holds at most 4 calls per process, and codec priorities are per
process too, so a batch is grouped by codec, split into groups of 4, and
each group runs in its own `python -m voiceline.sim.caller` process. All
workers share one absolute batch start time (`time.time()`), so `start_after`
and the report timestamps mean the same thing in every process.

This module never imports pjsua2: the command line and the pytest plugin import it.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import KW_ONLY, asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

# pjsua2's compiled-in PJSUA_MAX_CALLS.
MAX_CALLS_PER_WORKER = 4
# SIP transports a simulated caller can use; the target URI should name the same
# (`;transport=tcp` or `;transport=tls`, see VoicelineServer.uri).
TRANSPORTS = ("udp", "tcp", "tls")
# What a simulated caller may offer: pjsua2 codec ids (the rest are disabled) and the clock its
# audio runs at. "G711" offers both laws, as a PSTN trunk would.
CALLER_CODECS: dict[str, tuple[tuple[str, ...], int]] = {
    "G711": (("PCMU/8000/1", "PCMA/8000/1"), 8000),
    "PCMU": (("PCMU/8000/1",), 8000),
    "PCMA": (("PCMA/8000/1",), 8000),
    "G722": (("G722/16000/1",), 16000),
}
# DTMF goes out this long after connect, once the media path has settled.
DTMF_DELAY_SECONDS = 1.0
WORKER_MODULE = "voiceline.sim.caller"
# Time for a worker to import pjsua2 and start its endpoint before the first call.
WORKER_STARTUP_SECONDS = 0.5
# Time a worker keeps after its own deadline to hang up, finish recordings and report.
WORKER_TEARDOWN_SECONDS = 3.0
# Time a worker gets after SIGTERM before it is killed.
KILL_GRACE_SECONDS = 3.0
# Characters a SIP URI user part may hold (RFC 3261 section 25: unreserved, escaped, user-unreserved).
_SIP_USER = re.compile(r"[A-Za-z0-9\-_.!~*'()%&=+$,;?/]+")
_DTMF_DIGITS = re.compile(r"[0-9*#A-Da-d]*")
# Host of a sip: URI (IPv6 in brackets), for the loopback check.
_URI_HOST = re.compile(r"sip:(?:[^@]*@)?(\[[^\]]+\]|[^:;?>]+)")

HangupBy = Literal["us", "remote", "none"]


@dataclass(frozen=True)
class CallSpec:
    """One simulated caller: whom it calls, what it sends and for how long."""

    target: str
    _: KW_ONLY
    # Seconds to stay connected after the call is confirmed; then we hang up.
    seconds: float
    # Continuous sine tone sent into the call (whole hertz: pjsua2's tone generator); None sends silence.
    tone_hz: float | None = None
    # User part of From (the "number"); never printed by the toolkit.
    from_user: str = "anonymous"
    # Seconds after the batch start at which the call is placed.
    start_after: float = 0.0
    # Digits sent as RFC 4733 events DTMF_DELAY_SECONDS after connect.
    dtmf: str = ""
    # More digits at given times: (seconds after connect, digits), each sent as RFC 4733 events.
    dtmf_at: tuple[tuple[float, str], ...] = ()
    transport: str = "udp"
    # (hold_at, resume_at): seconds after connect to put the call on hold (re-INVITE with
    # sendonly) and to resume it (re-INVITE with sendrecv).
    hold: tuple[float, float] | None = None
    # The only codec offered (a key of CALLER_CODECS); the tone must fit its clock.
    codec: str = "G711"
    # Offer SRTP only (RTP/SAVP keyed by SDES a=crypto, RFC 4568) and refuse plain RTP.
    srtp: bool = False

    def __post_init__(self) -> None:
        if not self.target.startswith("sip:"):
            raise ValueError(f"target must be a sip: URI, got {self.target!r}")
        _check_loopback_target(self.target)
        if self.seconds < 0 or self.start_after < 0:
            raise ValueError("seconds and start_after must not be negative")
        if self.codec not in CALLER_CODECS:
            raise ValueError(f"codec must be one of {', '.join(CALLER_CODECS)}, got {self.codec!r}")
        nyquist = CALLER_CODECS[self.codec][1] / 2
        if self.tone_hz is not None and not 0 < self.tone_hz < nyquist:
            raise ValueError(f"tone_hz must lie between 0 and {nyquist:g} Hz for {self.codec}, got {self.tone_hz:g}")
        # Deliberately no value in this message: from_user is the caller's identity.
        if not _SIP_USER.fullmatch(self.from_user):
            raise ValueError("from_user must be a non-empty SIP user part (letters, digits, +-_.!~*'()&=$,;?/)")
        if not _DTMF_DIGITS.fullmatch(self.dtmf):
            raise ValueError(f"dtmf may hold only 0-9, *, # and A-D, got {self.dtmf!r}")
        if self.dtmf and self.seconds <= DTMF_DELAY_SECONDS:
            raise ValueError(f"dtmf is sent {DTMF_DELAY_SECONDS:g} s after connect: seconds must be longer")
        for at, digits in self.dtmf_at:
            if not 0 <= at < self.seconds or not digits or not _DTMF_DIGITS.fullmatch(digits):
                raise ValueError("dtmf_at: expected (seconds after connect, digits 0-9*#A-D), within the call")
        if self.hold is not None and not 0 < self.hold[0] < self.hold[1] < self.seconds:
            raise ValueError("hold: expected (hold_at, resume_at) with 0 < hold_at < resume_at < seconds")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")


def _check_loopback_target(target: str) -> None:
    """Callers bind to loopback and cannot reach other addresses: say so instead of timing out."""
    match = _URI_HOST.match(target)
    host = match.group(1).strip("[]") if match else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return  # a host name: pjsua2 resolves it
    if not address.is_loopback:
        raise ValueError(f"simulated callers stay on loopback and cannot reach {target}")


def hz_key(hz: float) -> str:
    """Key of a frequency in `CallReport.tone_energy_db` (JSON object keys are strings)."""
    return f"{hz:g}"


@dataclass
class CallReport:
    """What one simulated caller saw and heard. Times are seconds since the batch start."""

    index: int
    # Last final status received for the INVITE; 0 when none arrived.
    final_status: int = 0
    connected: bool = False
    media_started: bool = False
    # Length of the recording of what the caller heard.
    seconds_heard: float = 0.0
    # Goertzel energy (dB re full-scale sine) over the whole recording, keyed by hz_key().
    tone_energy_db: dict[str, float] = field(default_factory=dict)
    # Level of each 0.5 s window of the recording.
    level_dbfs: list[float] = field(default_factory=list)
    # Who ended a connected call; "none" when it never connected.
    hangup_by: HangupBy = "none"
    # WAV of what the caller heard; empty when media never started.
    recording: str = ""
    connected_at: float | None = None
    disconnected_at: float | None = None
    error: str | None = None

    def tone_db(self, hz: float) -> float:
        return self.tone_energy_db[hz_key(hz)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> CallReport:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class WorkerJob:
    """What one worker process is told on stdin: its calls and the shared clock."""

    batch_start: float
    # Absolute time at which the worker hangs up whatever is still running.
    end_by: float
    bind_host: str
    record_dir: str
    analyse_hz: tuple[float, ...]
    calls: tuple[tuple[int, CallSpec], ...]  # all in one codec
    codec: str = "G711"
    # PEM CA bundle that TLS callers verify the server with; empty: no verification.
    tls_ca_file: str = ""
    # RTP ports rtp_port to rtp_port + rtp_port_range (pjsua's port and portRange); 0: pjsua chooses.
    rtp_port: int = 0
    rtp_port_range: int = 0

    def to_json(self) -> str:
        data: dict[str, Any] = asdict(self)
        data["calls"] = [{"index": index, "spec": asdict(spec)} for index, spec in self.calls]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> WorkerJob:
        data = json.loads(text)
        data["analyse_hz"] = tuple(data["analyse_hz"])
        data["calls"] = tuple((call["index"], CallSpec(**call["spec"])) for call in data["calls"])
        return cls(**data)


def run_calls(
    specs: Sequence[CallSpec],
    *,
    record_dir: Path,
    bind_host: str = "127.0.0.1",
    timeout: float = 60.0,
    analyse_hz: Sequence[float] | None = None,
    tls_ca_file: str = "",
    rtp_ports: tuple[int, int] | None = None,
) -> list[CallReport]:
    """Place every call, wait (at most `timeout` seconds) and return reports in spec order.

    `rtp_ports` (low, high) is shared out among the worker processes; None: pjsua2 chooses.

    `analyse_hz` lists the frequencies measured in every recording; by default
    every tone of the batch. A call that did not finish in time, or whose
    worker died, comes back with `error` set.
    """
    if not ipaddress.ip_address(bind_host).is_loopback:
        raise ValueError(f"simulated callers stay on loopback; {bind_host} is not a loopback address")
    if not specs:
        return []
    record_dir.mkdir(parents=True, exist_ok=True)
    if analyse_hz is None:
        analyse_hz = sorted({spec.tone_hz for spec in specs if spec.tone_hz is not None})
    now = time.time()
    deadline = time.monotonic() + timeout
    by_codec: dict[str, list[tuple[int, CallSpec]]] = {}
    for index, spec in enumerate(specs):
        by_codec.setdefault(spec.codec, []).append((index, spec))
    jobs = [
        WorkerJob(
            batch_start=now + WORKER_STARTUP_SECONDS,
            end_by=max(now + timeout - WORKER_TEARDOWN_SECONDS, now + WORKER_STARTUP_SECONDS),
            bind_host=bind_host,
            record_dir=str(record_dir.resolve()),
            analyse_hz=tuple(analyse_hz),
            calls=tuple(indexed[first : first + MAX_CALLS_PER_WORKER]),
            codec=codec,
            tls_ca_file=str(Path(tls_ca_file).resolve()) if tls_ca_file else "",
        )
        for codec, indexed in by_codec.items()
        for first in range(0, len(indexed), MAX_CALLS_PER_WORKER)
    ]
    if rtp_ports is not None:
        jobs = _share_rtp_ports(jobs, rtp_ports)
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="sim-worker") as pool:
        results = list(pool.map(functools.partial(_run_worker, deadline=deadline, timeout=timeout), jobs))
    by_index = {report.index: report for reports in results for report in reports}
    return [by_index[index] for index in range(len(specs))]


def _share_rtp_ports(jobs: list[WorkerJob], rtp_ports: tuple[int, int]) -> list[WorkerJob]:
    """An even-aligned slice of `rtp_ports` per job, two ports (RTP, RTCP) per call at least."""
    low, high = rtp_ports
    start = low + low % 2
    share = (high - start + 1) // len(jobs) // 2 * 2
    needed = 2 * max(len(job.calls) for job in jobs)
    if share < needed:
        raise ValueError(f"RTP ports {low}-{high} are too few for {len(jobs)} workers of up to {needed // 2} calls")
    return [replace(job, rtp_port=start + n * share, rtp_port_range=share - 2) for n, job in enumerate(jobs)]


def _run_worker(job: WorkerJob, *, deadline: float, timeout: float) -> list[CallReport]:
    """Run one worker process to completion (or kill it) and return a report per call."""
    process = subprocess.Popen(
        [sys.executable, "-m", WORKER_MODULE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    problem = ""
    try:
        stdout, stderr = process.communicate(job.to_json(), timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        problem = f"worker did not finish within {timeout:g} s"
        process.terminate()
        try:
            stdout, stderr = process.communicate(timeout=KILL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            problem += " and was killed"
    reports: dict[int, CallReport] = {}
    for line in stdout.splitlines():
        try:
            report = CallReport.from_json(line)
        except ValueError:  # a line cut short when the worker was killed
            continue
        reports[report.index] = report
    if len(reports) < len(job.calls) and not problem:
        problem = f"worker exited with status {process.returncode} before reporting this call"
    missing_error = f"{problem}; worker stderr ends: {stderr[-600:].strip()!r}"
    return [reports.get(index) or CallReport(index=index, error=missing_error) for index, _ in job.calls]
