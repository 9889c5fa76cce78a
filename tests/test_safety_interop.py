"""Safety in the running service, heard by real pjsua2 callers: the help key's call, reports across
calls, repeat avoidance, the per-caller rate and withheld callers.

The help line is an independent user agent: pjsua2 answering with a tone and recording what it
hears (`voiceline.sim.help_line`), or SIPp refusing, ringing without end, challenging, or (as the
caller's carrier) taking a REFER. Prompts are found by content (`find_sound`), tones by Goertzel.
Times are seconds of a caller's recording, which starts when its call is confirmed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from test_end_to_end import A_HZ, B_HZ, C_HZ, CONNECTED_AFTER, SEPARATION_DB, assert_hears, prompt_seconds
from test_journey_interop import TOLERANCE, assert_heard_once, chirp_wav, heard_at

from voiceline.audio.prompts import PromptSet
from voiceline.sim.analysis import tone_levels
from voiceline.sim.runner import CallReport, CallSpec

from port_table import port_block

pytestmark = pytest.mark.interop

HOST = "127.0.0.1"
_first, _last = port_block("test_safety_interop")
HELP_SIP_PORT, HELP_RTP_PORT = _first, _first + 2  # the help line: SIP, then RTP/RTCP (4 ports)
SIPP_PORT, SIPP_MEDIA_PORT = _first + 10, _first + 12  # SIPp as a help line or a carrier; its media port
NOBODY_PORT = _first + 20  # a registrar nobody answers on
HELP_HZ, D_HZ = 1633.0, 852.0  # the help line's tone; a fourth caller's
RINGBACK_HZ = 425.0  # PlayRingback's default
SCENARIOS = Path(__file__).parent / "sipp"
HELP_PROMPTS = prompt_seconds("help_message", "help_connecting")


class HelpLine:
    """The pjsua2 help line process: answers one call with HELP_HZ and records what it hears."""

    def __init__(self, tmp_path: Path, ring_seconds: float, hang_up_after: float | None) -> None:
        self.recording = tmp_path / "help-line.wav"
        options = ["--ring-seconds", str(ring_seconds)]
        if hang_up_after is not None:
            options += ["--hang-up-after", str(hang_up_after)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "voiceline.sim.help_line", str(HELP_SIP_PORT), str(HELP_RTP_PORT), str(HELP_HZ),
             str(self.recording), *options],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def ready(self) -> None:
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "ready"

    @property
    def uri(self) -> str:
        return f"sip:help@{HOST}:{HELP_SIP_PORT}"

    def finished(self) -> str:
        assert self.process.stdout is not None
        ended = self.process.stdout.readline().strip()
        self.process.wait(10)
        return ended


@pytest.fixture
def help_line(tmp_path: Path) -> Iterator[Callable[..., HelpLine]]:
    started: list[HelpLine] = []

    def start(ring_seconds: float = 0.3, hang_up_after: float | None = None) -> HelpLine:
        line = HelpLine(tmp_path, ring_seconds, hang_up_after)
        started.append(line)
        line.ready()
        return line

    yield start
    for line in started:
        if line.process.poll() is None:
            line.process.kill()
            line.process.wait()


class Sipp:
    """One SIPp process running one call of a scenario, as a help line (UAS) or a carrier calling in (UAC)."""

    def __init__(self, tmp_path: Path, *arguments: str) -> None:
        self.tmp_path = tmp_path
        sipp = shutil.which("sipp") or "/usr/bin/sipp"
        self.process = subprocess.Popen(
            [sipp, *arguments, "-i", HOST, "-p", str(SIPP_PORT), "-mp", str(SIPP_MEDIA_PORT), "-m", "1", "-nostdin",
             "-timeout", "40s", "-timeout_error", "-trace_err"],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def finished(self) -> int:
        return self.process.wait(45)

    def errors(self) -> str:
        return "".join(path.read_text(errors="replace") for path in self.tmp_path.glob("*_errors.log"))


@pytest.fixture
def sipp(tmp_path: Path) -> Iterator[Callable[..., Sipp]]:
    started: list[Sipp] = []

    def start(*arguments: str) -> Sipp:
        process = Sipp(tmp_path, *arguments)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait()


def help_config(destination: str, recordings: Path | None = None, **help: Any) -> dict[str, Any]:
    """The help line at `destination`; with `recordings`, the one line plays its own recordings there."""
    config: dict[str, Any] = {
        "sip": {"answer_delay": 0.1},
        "welcome": {"enabled": False, "offer_choice": False},
        "help": {"destination": destination, "ring_timeout": 10.0, **help},
    }
    if recordings is not None:
        config["lines"] = [{"name": "default", "numbers": ["*"], "prompts": str(recordings)}]
    return config


class ShortHelpPrompts:
    """The line's own short recordings of the help message and the connecting notice (two sweeps in
    different bands, found by content), for tests of what happens around them: the built-in ones
    (15 s together) are heard in the tests of a talking caller's help call and of a REFER."""

    def __init__(self, tmp_path: Path) -> None:
        self.recordings = tmp_path / "recordings"
        self.recordings.mkdir()
        chirp_wav(self.recordings / "help_message.wav", seconds=1.0)
        chirp_wav(self.recordings / "help_connecting.wav", seconds=0.6, start_hz=2400.0, hz_per_second=-1000.0)
        self.prompts = PromptSet.load("en", self.recordings)
        self.seconds = prompt_seconds("help_message", "help_connecting", prompts=self.prompts)


@pytest.fixture
def short_help(tmp_path: Path) -> ShortHelpPrompts:
    return ShortHelpPrompts(tmp_path)


def alone_presses_help(
    server: Any, sim_calls: Callable[..., list[CallReport]], seconds: float, *more: tuple[float, str], prompts: PromptSet
) -> CallReport:
    """One caller waiting alone presses the help key 1 s in (and `more` keys later)."""
    (caller,) = sim_calls([CallSpec(server.uri("100"), tone_hz=A_HZ, seconds=seconds, from_user="5550101", dtmf_at=((1.0, "0"), *more))])
    assert caller.connected and caller.media_started and caller.error is None, caller
    assert_heard_once(caller, "help_message", 1.0, prompts)
    assert_heard_once(caller, "help_connecting", 1.0 + prompt_seconds("help_message", prompts=prompts), prompts)
    return caller


def test_the_help_key_connects_a_talking_caller_to_the_help_line_and_its_partner_to_the_next_caller(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]], help_line: Callable[..., HelpLine]
) -> None:
    ring = 1.5
    line = help_line(ring_seconds=ring)
    server = voiceline_server(help_config(line.uri))
    target = server.uri("100")
    press = CONNECTED_AFTER + 2.5  # A, talking with B, presses the help key
    answered = press + HELP_PROMPTS + ring  # about when the help line answers, on A's recording
    # B is told A stepped away, that it looks again and that nobody else is here (D comes later); then
    # it is paired with D and hears D a while.
    with_d = press + prompt_seconds("stepped_away", "looking_again", "nobody_else_here") + CONNECTED_AFTER + 3.0
    a, b, d = sim_calls(
        [
            CallSpec(target, tone_hz=A_HZ, seconds=answered + 6.0, from_user="5550101", dtmf_at=((press, "0"),)),
            CallSpec(target, tone_hz=B_HZ, seconds=with_d + 2.0, from_user="5550102", start_after=0.3),
            CallSpec(target, tone_hz=D_HZ, seconds=with_d - press, from_user="5550104", start_after=press + 2.0),
        ]
    )
    for report in (a, b, d):
        assert report.connected and report.media_started and report.error is None, report
    assert a.connected_at is not None and b.connected_at is not None and d.connected_at is not None
    # A: B, then the safety message over silence, a ringing tone while the help line rings, then the help line.
    assert_hears(a, B_HZ, A_HZ, press - 2.0, press - 0.2)
    assert_heard_once(a, "help_message", press)
    ringing = tone_levels(a.recording, (RINGBACK_HZ, HELP_HZ, B_HZ), press + HELP_PROMPTS + 0.2, press + HELP_PROMPTS + 0.9)
    assert ringing[RINGBACK_HZ] - max(ringing[HELP_HZ], ringing[B_HZ]) > SEPARATION_DB, ringing
    assert_hears(a, HELP_HZ, B_HZ, answered + 1.0, answered + 5.0)
    # The help line heard A (its recording starts at its answer), and nobody else.
    assert line.finished() == "ended"  # A hung up: we ended the help call too
    heard = tone_levels(line.recording, (A_HZ, B_HZ, D_HZ), 1.0, 4.0)
    assert heard[A_HZ] - max(heard[B_HZ], heard[D_HZ]) > SEPARATION_DB, heard
    # B heard that A stepped away, and was paired with D, who came later.
    offset = b.connected_at - a.connected_at
    assert_heard_once(b, "stepped_away", press - offset)
    cues = heard_at(b, "connect_cue", threshold=0.9)
    assert len(cues) == 2 and cues[1] > press - offset, cues  # paired with A, then with D
    assert_hears(b, D_HZ, B_HZ, cues[1] + CONNECTED_AFTER + 0.5, cues[1] + CONNECTED_AFTER + 3.0)
    assert "help.connected" in server.log_text()


def test_a_busy_help_line_is_a_kind_message_and_back_to_waiting(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]], sipp: Callable[..., Sipp],
    short_help: ShortHelpPrompts,
) -> None:
    busy = sipp("-sf", str(SCENARIOS / "uas_busy_anonymous.xml"))  # also checks: nothing of the caller in our INVITE
    server = voiceline_server(help_config(f"sip:help@{HOST}:{SIPP_PORT}", short_help.recordings))
    caller = alone_presses_help(server, sim_calls, 1.0 + short_help.seconds + 6.0, prompts=short_help.prompts)
    found = heard_at(caller, "help_unreachable")
    assert len(found) == 1 and 1.0 + short_help.seconds < found[0] < 1.0 + short_help.seconds + 1.5, found
    assert busy.finished() == 0, busy.errors()


def test_a_line_s_own_help_destination_is_the_one_called(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]], sipp: Callable[..., Sipp],
    short_help: ShortHelpPrompts,
) -> None:
    busy = sipp("-sf", str(SCENARIOS / "uas_busy_anonymous.xml"))  # exits 0 only once our INVITE reached it
    config = help_config(f"sip:help@{HOST}:{NOBODY_PORT}", short_help.recordings)  # the top-level help line: nobody there
    config["lines"][0]["help"] = {"destination": f"sip:help@{HOST}:{SIPP_PORT}"}
    server = voiceline_server(config)
    caller = alone_presses_help(server, sim_calls, 1.0 + short_help.seconds + 6.0, prompts=short_help.prompts)
    assert busy.finished() == 0, busy.errors()
    found = heard_at(caller, "help_unreachable")  # the line's help line was busy: quickly told so
    assert len(found) == 1 and 1.0 + short_help.seconds < found[0] < 1.0 + short_help.seconds + 1.5, found


def test_an_unanswered_help_call_is_given_up_after_the_ring_timeout(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]], sipp: Callable[..., Sipp],
    short_help: ShortHelpPrompts,
) -> None:
    ringing = sipp("-sf", str(SCENARIOS / "uas_ring_forever.xml"))
    server = voiceline_server(help_config(f"sip:help@{HOST}:{SIPP_PORT}", short_help.recordings, ring_timeout=3.0))
    caller = alone_presses_help(server, sim_calls, 1.0 + short_help.seconds + 8.0, prompts=short_help.prompts)
    levels = tone_levels(caller.recording, (RINGBACK_HZ,), 1.0 + short_help.seconds + 0.5, 1.0 + short_help.seconds + 2.5)
    assert levels[RINGBACK_HZ] > -40, levels  # the ringing tone while it rang
    found = heard_at(caller, "help_unreachable")
    assert len(found) == 1 and abs(found[0] - (1.0 + short_help.seconds + 3.0)) < 1.0, found
    assert ringing.finished() == 0, ringing.errors()  # our CANCEL, as scripted


def test_the_help_key_again_cancels_the_ringing_help_call(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]], sipp: Callable[..., Sipp],
    short_help: ShortHelpPrompts,
) -> None:
    ringing = sipp("-sf", str(SCENARIOS / "uas_ring_forever.xml"))
    server = voiceline_server(help_config(f"sip:help@{HOST}:{SIPP_PORT}", short_help.recordings, ring_timeout=30.0))
    cancel = 1.0 + short_help.seconds + 1.5
    caller = alone_presses_help(server, sim_calls, cancel + 5.0, (cancel, "0"), prompts=short_help.prompts)
    assert_heard_once(caller, "help_cancelled", cancel)
    assert ringing.finished() == 0, ringing.errors()  # CANCEL, 487, ACK


def test_the_help_call_answers_the_carriers_digest_challenge_with_the_help_trunks_account(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]], sipp: Callable[..., Sipp],
    short_help: ShortHelpPrompts,
) -> None:
    challenging = sipp("-sf", str(SCENARIOS / "uas_digest.xml"))  # alice/secret: 200, else 403
    carrier = {
        "name": "carrier",
        "sources": ["127.0.0.0/8"],
        "registration": {"registrar": f"sip:{HOST}:{NOBODY_PORT}", "username": "alice", "password": "secret"},
    }
    config = help_config(f"sip:help@{HOST}:{SIPP_PORT}", short_help.recordings, trunk="carrier")
    server = voiceline_server({**config, "trunks": [carrier]})
    caller = alone_presses_help(server, sim_calls, 1.0 + short_help.seconds + 4.0, prompts=short_help.prompts)
    assert heard_at(caller, "help_unreachable") == []
    assert challenging.finished() == 0, challenging.errors()  # our digest was right: answered, then our BYE
    assert "help.connected" in server.log_text()


def test_a_refer_the_carrier_accepts_hands_the_caller_over(
    voiceline_server: Callable[..., Any], sipp: Callable[..., Sipp]
) -> None:
    server = voiceline_server(help_config(f"sip:help@{HOST}:{SIPP_PORT + 2}", method="refer"))
    carrier = sipp("-sf", str(SCENARIOS / "uac_refer_help.xml"), f"{HOST}:{server.port}", "-s", "100")
    assert carrier.finished() == 0, carrier.errors()  # our REFER to the help line, and our BYE once it reported 200
    assert "help.referred" in server.log_text()


STOP_TIMEOUT = 3.0  # sip.shutdown_timeout of the stop tests


def stopped_giving_up_help(server: Any) -> tuple[float, list[dict[str, Any]]]:
    """Stops the service, which must exit 0 by itself, log no error and give up its one help call
    quietly; how long the stop took, and the log."""
    started = time.monotonic()
    assert server.stop() == 0 and not server.killed
    took = time.monotonic() - started
    events = server.log_events()
    assert [event for event in events if event.get("level") in ("error", "critical")] == []
    assert "Task was destroyed" not in server.log_text() and "Traceback" not in server.log_text()
    [given_up] = [event for event in events if event.get("event") == "help.given_up"]
    assert given_up["reason"] == "service stopping" and given_up["connected"] is False
    return took, events


def test_stopping_while_a_refer_waits_for_its_notify_ends_the_call_with_bye_and_exits_cleanly(
    voiceline_server: Callable[..., Any], sipp: Callable[..., Sipp], tmp_path: Path, short_help: ShortHelpPrompts
) -> None:
    config = help_config(f"sip:help@{HOST}:{SIPP_PORT + 2}", short_help.recordings, method="refer")
    server = voiceline_server({**config, "sip": {**config["sip"], "shutdown_timeout": STOP_TIMEOUT}})
    carrier = sipp(
        "-sf", str(SCENARIOS / "uac_refer_no_notify.xml"), f"{HOST}:{server.port}", "-s", "100", "-trace_msg"
    )  # fmt: skip
    server.wait_for_event("call.refer", timeout=40)  # after the help message
    sent = "\n".join(path.read_text(errors="replace") for path in tmp_path.glob("*_messages.log"))
    deadline = time.monotonic() + 10
    while "SIP/2.0 202 Accepted" not in sent:  # the carrier took the REFER: our side now waits for a NOTIFY
        assert time.monotonic() < deadline and carrier.process.poll() is None, carrier.errors()
        time.sleep(0.05)
        sent = "\n".join(path.read_text(errors="replace") for path in tmp_path.glob("*_messages.log"))
    took, events = stopped_giving_up_help(server)
    assert carrier.finished() == 0, carrier.errors()  # our BYE came, like every other call's at a stop
    assert took < STOP_TIMEOUT, took
    assert not {"help.referred", "help.refer_failed"} & {event.get("event") for event in events}


def test_stopping_while_the_help_line_rings_cancels_it_and_ends_the_caller_with_bye(
    voiceline_server: Callable[..., Any],
    sim_calls: Callable[..., list[CallReport]],
    sipp: Callable[..., Sipp],
    short_help: ShortHelpPrompts,
) -> None:
    ringing = sipp("-sf", str(SCENARIOS / "uas_ring_forever.xml"))
    config = help_config(f"sip:help@{HOST}:{SIPP_PORT}", short_help.recordings, ring_timeout=60.0)
    server = voiceline_server({**config, "sip": {**config["sip"], "shutdown_timeout": STOP_TIMEOUT}})
    with ThreadPoolExecutor(1) as pool:  # the caller stays on the line until the service ends its call
        calling = pool.submit(sim_calls, [CallSpec(server.uri("100"), tone_hz=A_HZ, seconds=60.0, dtmf_at=((1.0, "0"),))])
        server.wait_for_event("help.calling", timeout=40)  # after the help message
        took, _ = stopped_giving_up_help(server)
        (caller,) = calling.result(timeout=30)
    assert caller.connected and caller.hangup_by == "remote", caller  # our BYE
    assert ringing.finished() == 0, ringing.errors()  # our CANCEL, as scripted
    assert took < STOP_TIMEOUT, took


def statistics(server: Any) -> dict[str, int]:
    """The service stopped (its counts written), `voiceline stats --json`'s counts over its rows (an hour may turn)."""
    assert server.stop() == 0
    shown = subprocess.run(
        [sys.executable, "-m", "voiceline", "stats", "--json", "--data-dir", str(server.data_dir)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    totals: dict[str, int] = {}
    for row in json.loads(shown.stdout)["rows"]:
        for key, value in row.items():
            if type(value) is int:
                totals[key] = totals.get(key, 0) + value
    return totals


def safety_config(**safety: Any) -> dict[str, Any]:
    return {"sip": {"answer_delay": 0.1}, "welcome": {"enabled": False, "offer_choice": False}, "safety": safety}


def connected(*reports: CallReport) -> None:
    for report in reports:
        assert report.connected and report.media_started and report.error is None, report


def cues(report: CallReport) -> list[float]:
    """When a caller heard the connect cue: each time it was paired. Found by the "you're connected"
    that follows it: the two-note cue is told from hold music only at a score (0.9) that a recording
    whose jitter buffer slipped under load may miss; speech is found at the usual 0.5."""
    return [at - prompt_seconds("connect_cue") for at in heard_at(report, "connected")]


def test_reports_keep_two_apart_across_calls_and_a_caller_reported_by_two_is_held_apart(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server(safety_config(report_threshold=2))
    target = server.uri("100")
    press = CONNECTED_AFTER + 2.0
    # A reports B: A is thanked, B hears only that the other left.
    a, b = sim_calls(
        [
            CallSpec(target, tone_hz=A_HZ, seconds=press + 5.0, from_user="5550101", dtmf_at=((press, "*"),)),
            CallSpec(target, tone_hz=B_HZ, seconds=press + 5.0, from_user="5550102", start_after=0.3),
        ]
    )
    connected(a, b)
    assert a.connected_at is not None and b.connected_at is not None
    assert_heard_once(a, "report_thanks", press)
    assert_heard_once(b, "partner_left", press - (b.connected_at - a.connected_at))
    assert heard_at(b, "report_thanks") == []
    # Both call again with the same numbers: they wait side by side, unpaired, until C comes: A (the
    # longer waiter) is paired with C, and B waits on.
    c_at = 3.5
    a, b, c = sim_calls(
        [
            CallSpec(target, tone_hz=A_HZ, seconds=c_at + 7.0, from_user="5550101"),
            CallSpec(target, tone_hz=B_HZ, seconds=c_at + 6.0, from_user="5550102", start_after=1.0),
            CallSpec(target, tone_hz=C_HZ, seconds=7.0, from_user="5550103", start_after=c_at),
        ]
    )
    connected(a, b, c)
    assert cues(b) == [] and len(cues(a)) == 1 and len(cues(c)) == 1, (cues(a), cues(b), cues(c))
    assert cues(a)[0] > c_at - 0.5
    assert_hears(a, C_HZ, A_HZ, cues(a)[0] + CONNECTED_AFTER + 0.3, cues(a)[0] + CONNECTED_AFTER + 2.5)
    heard_by_b = tone_levels(b.recording, (A_HZ, C_HZ, B_HZ))
    assert max(heard_by_b[A_HZ], heard_by_b[C_HZ]) < -60, heard_by_b  # nobody, all along
    # D reports B too: the second reporter. B is held apart: it hears that the other left, then the
    # neutral cooldown message, and is paired with nobody (E waits unpaired beside it).
    d_press = CONNECTED_AFTER + 1.5
    b, d, e = sim_calls(
        [
            CallSpec(target, tone_hz=B_HZ, seconds=d_press + 11.0, from_user="5550102"),
            CallSpec(target, tone_hz=D_HZ, seconds=d_press + 3.0, from_user="5550104", start_after=0.3, dtmf_at=((d_press, "*"),)),
            CallSpec(target, tone_hz=C_HZ, seconds=8.0, from_user="5550105", start_after=d_press + 2.0),
        ]
    )
    connected(b, d, e)
    assert b.connected_at is not None and d.connected_at is not None
    reported = d_press + (d.connected_at - b.connected_at)
    assert_heard_once(b, "partner_left", reported)
    assert_heard_once(b, "cooldown", reported + prompt_seconds("partner_left"))
    assert len(cues(b)) == 1 and cues(e) == [], (cues(b), cues(e))
    row = statistics(server)
    assert (row["report"], row["cooldown_started"], row["rate_limited"]) == (2, 1, 0), row


def test_two_who_talked_are_not_paired_again_while_someone_else_can_be(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server({**safety_config(), "welcome": {"enabled": False, "offer_choice": True}})
    target = server.uri("100")
    # Each chooses at once (a talker, a listener): offered to the pool once the choice is acknowledged.
    a, b = sim_calls(
        [
            CallSpec(target, tone_hz=A_HZ, seconds=9.0, from_user="5550101", dtmf_at=((0.5, "1"),)),
            CallSpec(target, tone_hz=B_HZ, seconds=9.0, from_user="5550102", start_after=0.3, dtmf_at=((0.5, "2"),)),
        ]
    )
    connected(a, b)
    assert len(cues(a)) == 1 and len(cues(b)) == 1
    # Again: B and C both want to talk (two talkers wait for a listener), then A comes and wants to
    # listen. B, the longest waiter, would fit A; A and B talked before, so A is paired with C instead.
    b, c, a = sim_calls(
        [
            CallSpec(target, tone_hz=B_HZ, seconds=14.0, from_user="5550102", dtmf_at=((0.5, "1"),)),
            CallSpec(target, tone_hz=C_HZ, seconds=13.0, from_user="5550103", start_after=1.0, dtmf_at=((0.5, "1"),)),
            CallSpec(target, tone_hz=A_HZ, seconds=11.5, from_user="5550101", start_after=3.0, dtmf_at=((0.5, "2"),)),
        ]
    )
    connected(a, b, c)
    assert cues(b) == [] and len(cues(a)) == 1 and len(cues(c)) == 1, (cues(a), cues(b), cues(c))
    assert_hears(a, C_HZ, A_HZ, cues(a)[0] + CONNECTED_AFTER + 0.3, cues(a)[0] + CONNECTED_AFTER + 2.5)


def test_a_caller_over_the_hourly_rate_hears_a_kind_goodbye(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server(safety_config(max_calls_per_hour=1))
    target = server.uri("100")
    first, again, other = sim_calls(
        [
            CallSpec(target, tone_hz=A_HZ, seconds=3.0, from_user="5550101"),
            CallSpec(target, tone_hz=A_HZ, seconds=15.0, from_user="5550101", start_after=1.0),  # a second start, first still up
            CallSpec(target, tone_hz=B_HZ, seconds=3.0, from_user="5550102", start_after=4.0),
        ]
    )
    connected(first, again, other)
    assert heard_at(first, "rate_limited") == [] and heard_at(other, "rate_limited") == []
    assert_heard_once(again, "rate_limited", 0.0)
    assert again.hangup_by == "remote"
    assert again.disconnected_at is not None and again.connected_at is not None
    assert again.disconnected_at - again.connected_at < prompt_seconds("rate_limited", "goodbye") + 1.5
    assert statistics(server)["rate_limited"] == 1


def test_a_line_may_refuse_withheld_callers_kindly(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]]
) -> None:
    server = voiceline_server(safety_config(accept_withheld=False))
    withheld, known = sim_calls(
        [
            CallSpec(server.uri("100"), tone_hz=A_HZ, seconds=15.0, from_user="anonymous"),
            CallSpec(server.uri("100"), tone_hz=B_HZ, seconds=4.0, from_user="5550102"),
        ]
    )
    connected(withheld, known)
    assert_heard_once(withheld, "withheld_refused", 0.0)
    assert withheld.hangup_by == "remote" and heard_at(known, "withheld_refused") == []
    assert cues(withheld) == [] and cues(known) == []  # the withheld caller was never in the pool


def test_the_help_line_hanging_up_is_a_goodbye_and_the_help_statistics_are_kept(
    voiceline_server: Callable[..., Any], sim_calls: Callable[..., list[CallReport]], help_line: Callable[..., HelpLine],
    short_help: ShortHelpPrompts,
) -> None:
    line = help_line(hang_up_after=3.0)
    server = voiceline_server(help_config(line.uri, short_help.recordings))
    caller = alone_presses_help(server, sim_calls, 1.0 + short_help.seconds + 20.0, prompts=short_help.prompts)
    assert line.finished() == "ended"
    found = heard_at(caller, "help_call_ended")
    assert len(found) == 1 and 1.0 + short_help.seconds + 3.0 < found[0] < 1.0 + short_help.seconds + 5.0, found
    assert caller.hangup_by == "remote"  # our goodbye, then our BYE
    row = statistics(server)
    assert (row["calls"], row["help_request"], row["help_connected"], row["help_failed"]) == (1, 1, 1, 0), row
