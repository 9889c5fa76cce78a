"""The simulated-caller toolkit against a real, independent SIP peer: SIPp on loopback.

SIPp's built-in `uas` scenario answers with SDP; with `-rtp_echo` it sends our
RTP back, so a caller hears its own tone. Small scenarios below cover a busy
peer and a peer that hangs up first. Nothing here mocks pjsua2 or SIP.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from port_table import port_ranges
from voiceline.sim.cli import add_sim_parser, run_sim
from voiceline.sim.plugin import free_udp_port
from voiceline.sim.runner import CallReport, CallSpec, WorkerJob, run_calls

pytestmark = pytest.mark.interop

CANARY = "+15550001234"
SIPP_READY_SECONDS = 5.0
SIPP_EXIT_SECONDS = 10.0

BUSY_SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="busy">
  <recv request="INVITE" />
  <send>
    <![CDATA[
      SIP/2.0 486 Busy Here
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>
  <recv request="ACK" />
</scenario>
"""

# Answers with PCMU and telephone-event, then hangs up 2.5 s after the ACK.
HANGS_UP_SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="answer then hang up">
  <recv request="INVITE">
    <action>
      <ereg regexp="sip:[^&gt;;]*" search_in="hdr" header="Contact:" assign_to="contact" />
      <ereg regexp=".*" search_in="hdr" header="From:" assign_to="caller" />
    </action>
  </recv>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:line@[local_ip]:[local_port];transport=[transport]>
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=- 1 1 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0 101
      a=rtpmap:0 PCMU/8000
      a=rtpmap:101 telephone-event/8000
      a=fmtp:101 0-15
    ]]>
  </send>
  <recv request="ACK" />
  <pause milliseconds="2500" />
  <send>
    <![CDATA[
      BYE [$contact] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:line@[local_ip]:[local_port]>;tag=[pid]SIPpTag01[call_number]
      To:[$caller]
      Call-ID: [call_id]
      CSeq: 1 BYE
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv response="200" />
</scenario>
"""


@dataclass
class Sipp:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def uri(self, user: str = "line") -> str:
        return f"sip:{user}@127.0.0.1:{self.port}"

    def wait(self) -> int:
        """SIPp exits by itself after its -m calls: 0 when every call followed the scenario."""
        try:
            return self.process.wait(timeout=SIPP_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIPp still running; its screen:\n{self.log_path.read_text(errors='replace')[-2000:]}")


def port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


# Per SIPp: its media ports (audio and echo) from the first, its control port the last.
_sipp_ports = port_ranges("test_sim_caller", 10)
SILENT_PORT, _ = next(_sipp_ports)


def quick_built_in(executable: str, name: str) -> str:
    """SIPp's built-in scenario `name`, keeping a finished call 0.5 s instead of 4 s: that wait is for
    a BYE sent again because the 200 was lost, which loopback does not do, and SIPp exits after it."""
    dumped = subprocess.run([executable, "-sd", name], capture_output=True, text=True, timeout=10).stdout  # exits 99
    assert "</scenario>" in dumped, dumped[-500:]
    return re.sub(r'<timewait milliseconds="\d+"/>', '<timewait milliseconds="500"/>', dumped)


@pytest.fixture
def sipp(tmp_path: Path) -> Iterator[Callable[..., Sipp]]:
    """Factory: `sipp(scenario="uas", calls=1, echo_rtp=False)`; a scenario other than
    a built-in name is XML text. Its SIP and media sockets are on 127.0.0.1."""
    executable = shutil.which("sipp")
    assert executable, "SIPp is missing: run `make system-deps` (Debian package sip-tester)"
    started: list[Sipp] = []

    def start(scenario: str = "uas", *, calls: int = 1, echo_rtp: bool = False) -> Sipp:
        if not scenario.lstrip().startswith("<"):
            scenario = quick_built_in(executable, scenario)
        scenario_file = tmp_path / f"scenario-{len(started)}.xml"
        scenario_file.write_text(scenario)
        scenario_args = ["-sf", str(scenario_file)]
        port = free_udp_port()
        media_port, control_port = next(_sipp_ports)
        command = [
            *(executable, *scenario_args),
            *("-i", "127.0.0.1", "-p", str(port), "-mi", "127.0.0.1"),
            *("-mp", str(media_port), "-cp", str(control_port)),
            *("-m", str(calls), "-timeout", "60s", "-nostdin"),
            *(["-rtp_echo"] if echo_rtp else []),
        ]
        log_path = tmp_path / f"sipp-{len(started)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        instance = Sipp(port, process, log_path)
        started.append(instance)
        deadline = time.monotonic() + SIPP_READY_SECONDS
        while not port_taken(port):
            assert process.poll() is None, f"SIPp exited early: {log_path.read_text(errors='replace')[-2000:]}"
            assert time.monotonic() < deadline, "SIPp did not bind its port"
            time.sleep(0.05)
        return instance

    yield start
    for instance in started:
        if instance.process.poll() is None:
            instance.process.terminate()
            try:
                instance.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                instance.process.kill()
                instance.process.wait()


def connected_seconds(report: CallReport) -> float:
    assert report.connected_at is not None and report.disconnected_at is not None
    return report.disconnected_at - report.connected_at


def test_call_connects_sends_its_tone_and_hangs_up_after_seconds(sipp: Callable[..., Sipp], tmp_path: Path) -> None:
    peer = sipp(echo_rtp=True)
    [report] = run_calls(
        [CallSpec(peer.uri(), seconds=2.0, tone_hz=1000)], record_dir=tmp_path / "rec", analyse_hz=[1000, 697]
    )
    assert report.error is None
    assert report.final_status == 200
    assert report.connected and report.media_started
    assert report.hangup_by == "us"
    assert 1.9 <= connected_seconds(report) <= 3.0
    assert Path(report.recording).is_file()
    assert 1.5 <= report.seconds_heard <= 2.5
    assert len(report.level_dbfs) == int(report.seconds_heard / 0.5)
    # SIPp echoes our RTP: we hear our own tone, and nothing at 697 Hz.
    assert report.tone_db(1000) > -20
    assert report.tone_db(1000) - report.tone_db(697) > 60
    assert json.loads(report.to_json())["tone_energy_db"]["1000"] == report.tone_db(1000)
    assert peer.wait() == 0


def test_peer_hanging_up_first_ends_the_call_and_dtmf_goes_out(sipp: Callable[..., Sipp], tmp_path: Path) -> None:
    peer = sipp(HANGS_UP_SCENARIO)
    [report] = run_calls([CallSpec(peer.uri(), seconds=20.0, dtmf="12#")], record_dir=tmp_path)
    assert report.error is None  # dialDtmf found telephone-event in the answer
    assert report.final_status == 200
    assert report.hangup_by == "remote"
    assert 2.0 <= connected_seconds(report) <= 4.0
    assert report.level_dbfs and max(report.level_dbfs) < -90  # SIPp sends no audio
    assert peer.wait() == 0


def test_busy_peer_is_reported_with_its_status(sipp: Callable[..., Sipp], tmp_path: Path) -> None:
    peer = sipp(BUSY_SCENARIO)
    [report] = run_calls([CallSpec(peer.uri(), seconds=2.0, tone_hz=697)], record_dir=tmp_path)
    assert report.final_status == 486
    assert not report.connected and not report.media_started
    assert report.hangup_by == "none"
    assert report.recording == "" and report.tone_energy_db == {}
    assert report.error is None
    assert peer.wait() == 0


def test_batch_of_five_runs_at_once_across_two_workers(
    sipp: Callable[..., Sipp], sim_calls: Callable[..., list[CallReport]]
) -> None:
    peer = sipp(calls=5)
    specs = [CallSpec(peer.uri(), seconds=2.0, from_user=f"caller{index}") for index in range(5)]
    reports = sim_calls(specs, timeout=30)
    assert [report.index for report in reports] == list(range(5))
    assert all(report.connected and report.error is None for report in reports), reports
    # Five calls up at the same moment: more than one pjsua2 process can hold.
    assert max(report.connected_at or 0 for report in reports) < min(report.disconnected_at or 0 for report in reports)
    assert len({report.recording for report in reports}) == 5
    assert peer.wait() == 0


def test_call_to_a_silent_port_times_out_without_hanging(tmp_path: Path) -> None:
    target = f"sip:line@127.0.0.1:{SILENT_PORT}"  # nothing listens there
    started = time.monotonic()
    [report] = run_calls([CallSpec(target, seconds=1.0)], record_dir=tmp_path, timeout=6.0)
    assert time.monotonic() - started < 6.0
    assert report.final_status in (0, 408)
    assert not report.connected
    assert report.error and "timeout" in report.error


def start_worker(
    calls: tuple[tuple[int, CallSpec], ...], record_dir: Path, end_after: float = 20.0
) -> subprocess.Popen[str]:
    """Start one worker process directly, to see everything it prints (a few lines: pipes do not fill)."""
    now = time.time()
    job = WorkerJob(
        batch_start=now + 0.3,
        end_by=now + end_after,
        bind_host="127.0.0.1",
        record_dir=str(record_dir),
        analyse_hz=(),
        calls=calls,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "voiceline.sim.caller"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None
    process.stdin.write(job.to_json())
    process.stdin.close()
    return process


def finish_worker(process: subprocess.Popen[str], timeout: float = 30.0) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of a worker from start_worker."""
    status = process.wait(timeout=timeout)
    assert process.stdout is not None and process.stderr is not None
    return status, process.stdout.read(), process.stderr.read()


def test_worker_never_prints_the_callers_number(sipp: Callable[..., Sipp], tmp_path: Path) -> None:
    peer = sipp()
    calls = (
        (0, CallSpec(peer.uri(), seconds=1.0, tone_hz=440, from_user=CANARY)),
        # An unroutable target makes pjsua2 log an error: its logs are checked too.
        (1, CallSpec("sip:nobody@", seconds=1.0, from_user=CANARY)),
    )
    process = start_worker(calls, tmp_path)
    status, stdout, stderr = finish_worker(process)
    assert status == 0
    reports = [CallReport.from_json(line) for line in stdout.splitlines()]
    assert sorted(report.index for report in reports) == [0, 1]
    assert "Unable to make call" in stderr
    for needle in (CANARY, CANARY.lstrip("+")):
        assert needle not in stdout
        assert needle not in stderr
    assert peer.wait() == 0


def test_worker_hangs_up_and_reports_on_sigterm(sipp: Callable[..., Sipp], tmp_path: Path) -> None:
    peer = sipp()
    process = start_worker(((0, CallSpec(peer.uri(), seconds=30.0)),), tmp_path, end_after=60.0)
    time.sleep(1.5)
    process.send_signal(signal.SIGTERM)
    status, stdout, _ = finish_worker(process)
    assert status == 0
    [report] = [CallReport.from_json(line) for line in stdout.splitlines()]
    assert report.connected and report.hangup_by == "us"
    assert report.error and "SIGTERM" in report.error
    assert peer.wait() == 0


def sim_command(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="voiceline")
    add_sim_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["sim", "call", *argv])


def test_cli_cycles_tones_and_prints_a_json_report_per_call(
    sipp: Callable[..., Sipp], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer = sipp(calls=2, echo_rtp=True)
    args = sim_command(
        *(peer.uri(), "--calls", "2", "--tone", "697", "1209"),
        *("--seconds", "1.5", "--stagger", "0.3", "--from", CANARY, "--record-dir", str(tmp_path)),
    )
    assert run_sim(args) == 0
    out = capsys.readouterr().out
    assert CANARY not in out
    first, second = (CallReport.from_json(line) for line in out.splitlines())
    assert first.tone_db(697) - first.tone_db(1209) > 40
    assert second.tone_db(1209) - second.tone_db(697) > 40
    assert second.connected_at is not None and first.connected_at is not None
    assert second.connected_at - first.connected_at == pytest.approx(0.3, abs=0.2)
    assert peer.wait() == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["--calls", "0"],
        ["--tone", "5000"],
        ["--seconds", "-1"],
        ["--dtmf", "x"],
        ["--from", "not a user"],
        ["--dtmf", "5", "--seconds", "0.5"],
    ],
)
def test_cli_rejects_bad_arguments_with_status_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_sim(sim_command("sip:line@127.0.0.1:5999", *argv)) == 2
    assert "not a user" not in capsys.readouterr().err


def test_call_spec_rejects_what_a_worker_cannot_place() -> None:
    with pytest.raises(ValueError, match="transport"):
        CallSpec("sip:line@127.0.0.1", seconds=1, transport="sctp")
    with pytest.raises(ValueError, match="sip: URI"):
        CallSpec("tel:+15550001234", seconds=1)
    with pytest.raises(ValueError, match="dtmf"):
        CallSpec("sip:line@127.0.0.1", seconds=1, dtmf="5")
    with pytest.raises(ValueError) as caught:
        CallSpec("sip:line@127.0.0.1", seconds=1, from_user=f"{CANARY} x")
    assert CANARY not in str(caught.value)


@pytest.mark.parametrize("target", ["sip:line@192.0.2.10:5060", "sip:[2001:db8::1]:5060"])
def test_call_targets_stay_on_loopback(target: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        CallSpec(target, seconds=1)
    CallSpec("sip:line@localhost:5060", seconds=1)  # a name is left to pjsua2
    CallSpec("sip:[::1]:5060", seconds=1)


def test_callers_bind_only_to_loopback(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loopback"):
        run_calls([CallSpec("sip:line@127.0.0.1", seconds=1)], record_dir=tmp_path, bind_host="192.0.2.1")
