"""Simulated-caller worker: one pjsua2 user agent placing up to 4 calls.

Run as `python -m voiceline.sim.caller` with a `WorkerJob` as JSON on stdin
(see runner.py, which starts these processes). Writes one `CallReport` JSON
line per call on stdout and exits 0 once every call is reported.

pjsua2 rules this module follows (see the project's pjsua2 notes): every
pjsua2 call happens on one dedicated "pj" thread that created the library and
pumps `libHandleEvents`; other threads only post commands to its queue.
Calls, tone generators and recorders are dropped on that thread, and all of
them before `libDestroy`. SIP messages are never logged, and everything this
process prints is scrubbed of the callers' user parts: they are identities.
"""

from __future__ import annotations

import functools
import heapq
import io
import itertools
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import pjsua2 as pj

from voiceline.sim.analysis import goertzel_db, read_wav, rms_dbfs_windows, wav_complete
from voiceline.sim.runner import (
    CALLER_CODECS,
    DTMF_DELAY_SECONDS,
    MAX_CALLS_PER_WORKER,
    CallReport,
    CallSpec,
    WorkerJob,
    hz_key,
)

# A recorder's WAV header is final only after deletion plus a bridge tick (up to ~300 ms): the
# file is looked at every SETTLE_POLL_SECONDS, and taken as it is after RECORDING_SETTLE_SECONDS.
RECORDING_SETTLE_SECONDS = 0.5
SETTLE_POLL_SECONDS = 0.02
# After hanging up at the deadline, how long to wait for the disconnect before dropping the call.
ABANDON_AFTER_SECONDS = 1.0
# Pumping after the final hang-up so BYEs leave before libDestroy.
SHUTDOWN_PUMP_SECONDS = 0.3
# ToneDesc.on_msec is a 16-bit field; a looped 30 s tone is continuous for practical purposes.
TONE_SEGMENT_MS = 30000
EVENT_POLL_MS = 10
DISPLAY_NAME = "voiceline sim"
KEPT_CODEC_PRIORITY = 200  # the first kept codec; each next one a step lower
PJ_LOG_LEVEL = 1  # errors only
REDACTED = "<caller>"
SIP_TRANSPORTS = {"udp": pj.PJSIP_TRANSPORT_UDP, "tcp": pj.PJSIP_TRANSPORT_TCP, "tls": pj.PJSIP_TRANSPORT_TLS}
LEVEL_WINDOW_SECONDS = 0.5


def describe(exc: BaseException) -> str:
    """One line about an exception; pjsua2 errors carry their text in `reason`."""
    if isinstance(exc, pj.Error):  # its title is the failing C expression: noise in a report
        return f"{exc.reason} (status {exc.status})"
    return f"{type(exc).__name__}: {exc}"


class Scrubber:
    """Replaces the callers' user parts (their identity) in text leaving this process."""

    def __init__(self, secrets: set[str]) -> None:
        self._secrets = sorted(secrets, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text


class ScrubbingStream(io.TextIOBase):
    """stderr behind a Scrubber: tracebacks and pjsua log lines alike."""

    def __init__(self, stream: TextIO, scrub: Scrubber) -> None:
        self._stream = stream
        self._scrub = scrub

    def write(self, text: str) -> int:
        return self._stream.write(self._scrub(text))

    def flush(self) -> None:
        self._stream.flush()


class StderrLogWriter(pj.LogWriter):
    """pjsua log lines to (the scrubbed) sys.stderr."""

    def write(self, entry: pj.LogEntry) -> None:
        text = entry.msg
        sys.stderr.write(text if text.endswith("\n") else text + "\n")


@dataclass
class Leg:
    """One simulated call and the pjsua2 objects it owns (touched on the pj thread only)."""

    spec: CallSpec
    report: CallReport
    call: SimCall | None = None
    tone: pj.ToneGenerator | None = None
    recorder: pj.AudioMediaRecorder | None = None
    hangup_requested: bool = False
    disconnected: bool = False
    finished: bool = False
    notes: list[str] = field(default_factory=list)

    def note(self, problem: str) -> None:
        """Record a problem; the report's error lists them all."""
        self.notes.append(problem)
        self.report.error = "; ".join(self.notes)


class SimCall(pj.Call):
    """A pjsua2 call that forwards its callbacks, guarded, to the worker."""

    def __init__(self, account: pj.Account, worker: CallerWorker, leg: Leg) -> None:
        super().__init__(account)
        self._worker = worker
        self._leg = leg

    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        self._worker.guarded(self._leg, lambda: self._on_state(prm.e))

    def _on_state(self, event: pj.SipEvent) -> None:
        # A rejecting response ends the call before onCallTsxState reports it.
        self._note_invite_final(event)
        info = self.getInfo()
        if info.state == pj.PJSIP_INV_STATE_CONFIRMED:
            self._worker.on_confirmed(self._leg)
        elif info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self._worker.on_disconnected(self._leg, info.lastStatusCode, info.lastReason)

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        self._worker.guarded(self._leg, self._on_media_state)

    def _on_media_state(self) -> None:
        info = self.getInfo()  # keep it referenced: `media` points into it
        for media in info.media:
            if media.type == pj.PJMEDIA_TYPE_AUDIO and media.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                self._worker.on_media_active(self._leg, self.getAudioMedia(media.index))
                return

    def onCallTsxState(self, prm: pj.OnCallTsxStateParam) -> None:
        self._worker.guarded(self._leg, lambda: self._note_invite_final(prm.e))

    def _note_invite_final(self, event: pj.SipEvent) -> None:
        if event.type != pj.PJSIP_EVENT_TSX_STATE:
            return
        tsx_event = event.body.tsxState
        tsx = tsx_event.tsx
        # Only responses that arrived count: a locally generated 408 is not the peer's answer.
        if (
            tsx.method == "INVITE"
            and tsx.role == pj.PJSIP_ROLE_UAC
            and tsx_event.type == pj.PJSIP_EVENT_RX_MSG
            and tsx.statusCode >= 200
        ):
            self._worker.on_invite_final(self._leg, tsx.statusCode)


class CallerWorker:
    """Places the calls of one job on the pj thread and reports each when it is done."""

    def __init__(self, job: WorkerJob, out: TextIO, scrub: Scrubber) -> None:
        if len(job.calls) > MAX_CALLS_PER_WORKER:
            raise ValueError(f"a worker places at most {MAX_CALLS_PER_WORKER} calls, got {len(job.calls)}")
        self._job = job
        self._out = out
        self._scrub = scrub
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_order = itertools.count()
        self._legs = [Leg(spec, CallReport(index=index)) for index, spec in job.calls]
        self._accounts: dict[tuple[str, str, bool], pj.Account] = {}  # (from_user, transport, srtp) -> account
        self._stop_reason: str | None = None

    @property
    def all_reported(self) -> bool:
        return all(leg.finished for leg in self._legs)

    # --- called from other threads -------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Thread-safe: hang up everything and report, as at the deadline."""
        self._commands.put(lambda: self._stop(reason))

    # --- the pj thread ------------------------------------------------------------------

    def run(self) -> None:
        """Body of the pj thread: start pjsua2, run the calls, tear down in order."""
        endpoint = pj.Endpoint()
        endpoint.libCreate()
        try:
            self._start(endpoint)
            while not self.all_reported:
                endpoint.libHandleEvents(EVENT_POLL_MS)
                self._run_due()
        except Exception as exc:  # report every call instead of dying with them unreported
            traceback.print_exc()
            for leg in self._legs:
                if not leg.finished:
                    leg.note(f"worker failed: {describe(exc)}")
                    self._release_media(leg)
                    leg.call = None
                    self._emit(leg)
        finally:
            self._shutdown(endpoint)

    def _start(self, endpoint: pj.Endpoint) -> None:
        config = pj.EpConfig()
        config.uaConfig.threadCnt = 0
        config.uaConfig.mainThreadOnly = True
        config.uaConfig.maxCalls = MAX_CALLS_PER_WORKER
        config.uaConfig.userAgent = "voiceline-sim"
        config.logConfig.level = PJ_LOG_LEVEL
        config.logConfig.consoleLevel = PJ_LOG_LEVEL
        config.logConfig.msgLogging = False
        log_writer = StderrLogWriter()
        # libDestroy deletes the writer itself: hand it over so Python does not delete it twice.
        log_writer.__disown__()
        config.logConfig.writer = log_writer
        kept, clock_rate = CALLER_CODECS[self._job.codec]
        config.medConfig.clockRate = clock_rate
        config.medConfig.sndClockRate = clock_rate
        config.medConfig.ecTailLen = 0
        config.medConfig.noVad = True
        endpoint.libInit(config)
        endpoint.audDevManager().setNullDev()
        transport_ids = {
            name: endpoint.transportCreate(SIP_TRANSPORTS[name], self._sip_transport(name))
            for name in {leg.spec.transport for leg in self._legs}
        }
        endpoint.libStart()
        priorities = {codec_id: KEPT_CODEC_PRIORITY - 10 * rank for rank, codec_id in enumerate(kept)}
        for codec in endpoint.codecEnum2():
            endpoint.codecSetPriority(codec.codecId, priorities.get(codec.codecId, 0))
        for user, name, srtp in {(leg.spec.from_user, leg.spec.transport, leg.spec.srtp) for leg in self._legs}:
            self._accounts[(user, name, srtp)] = self._create_account(user, transport_ids[name], srtp)
        for leg in self._legs:
            self._call_at(self._job.batch_start + leg.spec.start_after, leg, functools.partial(self._dial, leg))
        self._call_at(self._job.end_by, None, lambda: self._stop("batch timeout reached"))

    def _loopback_transport(self) -> pj.TransportConfig:
        """An ephemeral port on the loopback bind host, advertised as that host and nothing else."""
        transport = pj.TransportConfig()
        transport.boundAddress = self._job.bind_host
        transport.publicAddress = self._job.bind_host
        transport.port = 0
        return transport

    def _sip_transport(self, name: str) -> pj.TransportConfig:
        """The SIP transport `name` on loopback; TLS verifies the server against the job's CA file."""
        transport = self._loopback_transport()
        if name == "tls" and self._job.tls_ca_file:
            transport.tlsConfig.CaListFile = self._job.tls_ca_file
            transport.tlsConfig.verifyServer = True
        return transport

    def _create_account(self, user: str, transport_id: int, srtp: bool) -> pj.Account:
        config = pj.AccountConfig()
        config.idUri = f'"{DISPLAY_NAME}" <sip:{user}@{self._job.bind_host}>'
        config.sipConfig.transportId = transport_id
        config.mediaConfig.transportConfig = self._loopback_transport()
        config.mediaConfig.transportConfig.port = self._job.rtp_port
        config.mediaConfig.transportConfig.portRange = self._job.rtp_port_range
        if srtp:  # RTP/SAVP with SDES keys only; the test chooses the signalling transport
            config.mediaConfig.srtpUse = pj.PJMEDIA_SRTP_MANDATORY
            config.mediaConfig.srtpSecureSignaling = 0
            keyings = pj.IntVector()
            keyings.append(pj.PJMEDIA_SRTP_KEYING_SDES)
            config.mediaConfig.srtpOpt.keyings = keyings
        # No re-INVITE to lock the codec: the only INVITE is the one final_status reports on.
        config.mediaConfig.lockCodecEnabled = False
        account = pj.Account()
        account.create(config)
        return account

    def _call_at(self, when: float, leg: Leg | None, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (when, next(self._timer_order), lambda: self.guarded(leg, action)))

    def _call_soon(self, leg: Leg | None, action: Callable[[], None]) -> None:
        """Run on the next loop turn: never destroy pjsua2 objects inside their own callback."""
        self._call_at(0.0, leg, action)

    def _run_due(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            command()
        now = time.time()
        while self._timers and self._timers[0][0] <= now:
            _, _, action = heapq.heappop(self._timers)
            action()

    def guarded(self, leg: Leg | None, action: Callable[[], None]) -> None:
        """Run a callback or timer; pjsua2 would swallow the exception, so report it on the call."""
        try:
            action()
        except Exception as exc:
            if leg is None:
                raise
            traceback.print_exc()
            leg.note(describe(exc))

    def _since_start(self) -> float:
        return round(time.time() - self._job.batch_start, 3)

    def _dial(self, leg: Leg) -> None:
        if leg.finished:
            return
        leg.call = SimCall(self._accounts[(leg.spec.from_user, leg.spec.transport, leg.spec.srtp)], self, leg)
        try:
            leg.call.makeCall(leg.spec.target, pj.CallOpParam(True))
        except pj.Error as exc:
            leg.note(f"call not placed: {describe(exc)}")
            leg.disconnected = True
            self._call_soon(leg, lambda: self._finish(leg))

    def on_invite_final(self, leg: Leg, status: int) -> None:
        leg.report.final_status = status

    def on_confirmed(self, leg: Leg) -> None:
        if leg.report.connected:
            return  # a re-INVITE of ours (hold, resume) confirms again
        leg.report.connected = True
        leg.report.connected_at = self._since_start()
        now = time.time()
        self._call_at(now + leg.spec.seconds, leg, lambda: self._hang_up(leg))
        if leg.spec.dtmf:  # CallSpec guarantees the call outlasts the DTMF delay
            self._call_at(now + DTMF_DELAY_SECONDS, leg, functools.partial(self._send_dtmf, leg, leg.spec.dtmf))
        for at, digits in leg.spec.dtmf_at:
            self._call_at(now + at, leg, functools.partial(self._send_dtmf, leg, digits))
        if leg.spec.hold is not None:
            hold_at, resume_at = leg.spec.hold
            self._call_at(now + hold_at, leg, lambda: self._reinvite(leg, hold=True))
            self._call_at(now + resume_at, leg, lambda: self._reinvite(leg, hold=False))

    def _reinvite(self, leg: Leg, hold: bool) -> None:
        if leg.call is None or leg.disconnected or leg.hangup_requested:
            return
        param = pj.CallOpParam(True)
        try:
            if hold:
                leg.call.setHold(param)
            else:
                param.opt.flag = pj.PJSUA_CALL_UNHOLD
                leg.call.reinvite(param)
        except pj.Error as exc:
            leg.note(f"{'hold' if hold else 'resume'} failed: {describe(exc)}")

    def on_media_active(self, leg: Leg, audio: pj.AudioMedia) -> None:
        if leg.disconnected:
            return
        if leg.recorder is not None:  # active again after a hold: make sure the ports stay connected
            audio.startTransmit(leg.recorder)
            if leg.tone is not None:
                leg.tone.startTransmit(audio)
            return
        path = Path(self._job.record_dir) / f"call-{leg.report.index:03d}.wav"
        leg.recorder = pj.AudioMediaRecorder()
        leg.recorder.createRecorder(str(path))
        audio.startTransmit(leg.recorder)
        leg.report.media_started = True
        leg.report.recording = str(path)
        if leg.spec.tone_hz is not None:
            leg.tone = self._start_tone(leg.spec.tone_hz)
            leg.tone.startTransmit(audio)

    def _start_tone(self, hz: float) -> pj.ToneGenerator:
        tone = pj.ToneDesc()
        tone.freq1 = round(hz)
        tone.freq2 = 0
        tone.on_msec = TONE_SEGMENT_MS
        tone.off_msec = 0
        tones = pj.ToneDescVector()
        tones.append(tone)
        generator = pj.ToneGenerator()
        generator.createToneGenerator(CALLER_CODECS[self._job.codec][1], 1)
        generator.play(tones, True)
        return generator

    def _send_dtmf(self, leg: Leg, digits: str) -> None:
        if leg.call is not None and not leg.disconnected:
            try:
                leg.call.dialDtmf(digits)
            except pj.Error as exc:
                leg.note(f"DTMF not sent: {describe(exc)}")

    def _hang_up(self, leg: Leg) -> None:
        if leg.call is None or leg.disconnected or leg.hangup_requested:
            return
        leg.hangup_requested = True
        leg.call.hangup(pj.CallOpParam(True))

    def on_disconnected(self, leg: Leg, last_status: int, last_reason: str) -> None:
        if leg.disconnected:
            return
        leg.disconnected = True
        leg.report.disconnected_at = self._since_start()
        if leg.report.connected:
            leg.report.hangup_by = "us" if leg.hangup_requested else "remote"
        elif leg.report.final_status == 0 and not leg.notes:
            leg.note(f"no final response from the peer (pjsua2: {last_status} {last_reason})")
        self._call_soon(leg, lambda: self._finish(leg))

    def _stop(self, reason: str) -> None:
        """Deadline or signal: end every call that is still going, then report it."""
        if self._stop_reason is not None:
            return
        self._stop_reason = reason
        for leg in self._legs:
            if leg.disconnected or leg.finished:
                continue
            if leg.call is None:
                leg.note(f"call not placed: {reason}")
                leg.disconnected = True
                self._finish(leg)
                continue
            leg.note(f"call cut short: {reason}")
            try:
                self._hang_up(leg)
            except pj.Error as exc:
                leg.note(f"hang-up failed: {describe(exc)}")
            self._call_at(time.time() + ABANDON_AFTER_SECONDS, leg, functools.partial(self._abandon, leg))

    def _abandon(self, leg: Leg) -> None:
        """The peer never confirmed the hang-up (e.g. no answer to the INVITE at all)."""
        if not leg.disconnected:
            leg.disconnected = True
            leg.report.disconnected_at = self._since_start()
            self._finish(leg)

    def _finish(self, leg: Leg) -> None:
        """Close the recording; report once its WAV header is final."""
        had_recording = leg.recorder is not None
        self._release_media(leg)
        if had_recording:
            self._report_when_written(leg, time.time() + RECORDING_SETTLE_SECONDS)
        else:
            self._report(leg)

    def _report_when_written(self, leg: Leg, give_up_at: float) -> None:
        """The conference bridge removes the recorder on its next tick, which writes the final
        header: report then (or at `give_up_at` whatever the file says)."""
        if wav_complete(leg.report.recording) or time.time() >= give_up_at:
            self._report(leg)
        else:
            self._call_at(time.time() + SETTLE_POLL_SECONDS, leg, lambda: self._report_when_written(leg, give_up_at))

    @staticmethod
    def _release_media(leg: Leg) -> None:
        leg.tone = None
        leg.recorder = None

    def _report(self, leg: Leg) -> None:
        leg.call = None  # deleted here, on the pj thread; a live call is hung up by its destructor
        if leg.report.recording:
            try:
                self._analyse(leg.report)
            except (OSError, ValueError, EOFError) as exc:
                leg.note(f"recording unreadable: {describe(exc)}")
        self._emit(leg)

    def _analyse(self, report: CallReport) -> None:
        samples, rate = read_wav(report.recording)
        report.seconds_heard = round(len(samples) / rate, 3)
        report.tone_energy_db = {
            hz_key(hz): round(goertzel_db(samples, rate, hz), 2) for hz in self._job.analyse_hz
        }
        report.level_dbfs = [round(level, 2) for level in rms_dbfs_windows(samples, rate, LEVEL_WINDOW_SECONDS)]

    def _emit(self, leg: Leg) -> None:
        leg.finished = True
        if leg.report.error:  # the only free text in a report
            leg.report.error = self._scrub(leg.report.error)
        self._out.write(leg.report.to_json() + "\n")
        self._out.flush()

    def _shutdown(self, endpoint: pj.Endpoint) -> None:
        """Drop every pjsua2 object, let the hang-ups go out, then destroy the library."""
        for leg in self._legs:
            self._release_media(leg)
            leg.call = None
        self._accounts.clear()
        endpoint.hangupAllCalls()
        if not all(leg.disconnected for leg in self._legs):  # calls cut short: let their BYEs go out
            pump_until = time.time() + SHUTDOWN_PUMP_SECONDS
            while time.time() < pump_until:
                endpoint.libHandleEvents(EVENT_POLL_MS)
        # Every call is over and reported: without NO_RX_MSG, pjsua's destroy sleeps a second
        # waiting for answers to unregistrations this endpoint never sends.
        endpoint.libDestroy(pj.PJSUA_DESTROY_NO_RX_MSG)


def claim_stdout() -> TextIO:
    """Keep the real stdout for reports; anything else written to fd 1 (pjlib start-up chatter) is discarded."""
    report_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    return os.fdopen(report_fd, "w", encoding="utf-8")


def main() -> int:
    job = WorkerJob.from_json(sys.stdin.read())
    scrub = Scrubber({spec.from_user for _, spec in job.calls})
    sys.stderr = ScrubbingStream(sys.stderr, scrub)
    worker = CallerWorker(job, claim_stdout(), scrub)
    pj_thread = threading.Thread(target=worker.run, name="pj")
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: worker.request_stop(f"stopped by {signal.Signals(signum).name}"))
    pj_thread.start()
    # Short joins keep the main thread responsive to signals.
    while pj_thread.is_alive():
        pj_thread.join(0.2)
    return 0 if worker.all_reported else 1


if __name__ == "__main__":
    raise SystemExit(main())
