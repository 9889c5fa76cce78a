"""A help line to test the help key against: one pjsua2 user agent that answers one call.

Run as `python -m voiceline.sim.help_line PORT RTP_PORT TONE_HZ RECORDING [--ring-seconds S] [--hang-up-after S]`
on loopback. It prints "ready" once it listens, answers the first INVITE (180,
then 200 after --ring-seconds), sends a steady tone of TONE_HZ, records what it hears to RECORDING
(8 kHz WAV, from the answer on) and exits once the call is over (hung up by the
caller, or by itself after --hang-up-after seconds), printing "ended".

pjsua2 runs on this process's main thread only, as in `voiceline.sim.caller`;
nothing of any SIP message is printed.
"""

from __future__ import annotations

import argparse
import sys
import time

import pjsua2 as pj

from voiceline.sim.analysis import wav_complete
from voiceline.sim.caller import (
    EVENT_POLL_MS,
    PJ_LOG_LEVEL,
    RECORDING_SETTLE_SECONDS,
    TONE_SEGMENT_MS,
    StderrLogWriter,
    claim_stdout,
)

RATE = 8000
LONGEST_SECONDS = 120.0  # the process never outlives a test


class HelpCall(pj.Call):
    def __init__(self, account: pj.Account, call_id: int, line: HelpLine) -> None:
        super().__init__(account, call_id)
        self.line = line

    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        if self.getInfo().state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.line.ended = True

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        self.line.media_active(self)


class HelpAccount(pj.Account):
    def __init__(self, line: HelpLine) -> None:
        super().__init__()
        self.line = line

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        if self.line.call is not None:  # one call only: any other is busy
            busy = HelpCall(self, prm.callId, self.line)
            answer = pj.CallOpParam()
            answer.statusCode = 486
            busy.answer(answer)
            return
        self.line.call = HelpCall(self, prm.callId, self.line)
        ringing = pj.CallOpParam()
        ringing.statusCode = 180
        self.line.call.answer(ringing)
        self.line.answer_at = time.monotonic() + self.line.ring_seconds


class HelpLine:
    def __init__(self, tone_hz: float, recording: str, ring_seconds: float) -> None:
        self.tone_hz = tone_hz
        self.ring_seconds = ring_seconds
        self.recording = recording
        self.call: HelpCall | None = None
        self.answer_at: float | None = None
        self.answered_at: float | None = None
        self.ended = False
        self.recorder: pj.AudioMediaRecorder | None = None
        self.tone: pj.ToneGenerator | None = None

    def media_active(self, call: HelpCall) -> None:
        if self.recorder is not None:
            return
        audio = call.getAudioMedia(-1)
        self.recorder = pj.AudioMediaRecorder()
        self.recorder.createRecorder(self.recording)
        audio.startTransmit(self.recorder)
        tone = pj.ToneDesc()
        tone.freq1, tone.freq2, tone.on_msec, tone.off_msec = round(self.tone_hz), 0, TONE_SEGMENT_MS, 0
        tones = pj.ToneDescVector()
        tones.append(tone)
        self.tone = pj.ToneGenerator()
        self.tone.createToneGenerator(RATE, 1)
        self.tone.play(tones, True)
        self.tone.startTransmit(audio)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m voiceline.sim.help_line")
    parser.add_argument("port", type=int)
    parser.add_argument("rtp_port", type=int)
    parser.add_argument("tone_hz", type=float)
    parser.add_argument("recording")
    parser.add_argument("--ring-seconds", type=float, default=0.3, help="180 this long before the 200")
    parser.add_argument("--hang-up-after", type=float, default=None, help="seconds after answering")
    args = parser.parse_args()
    out = claim_stdout()
    line = HelpLine(args.tone_hz, args.recording, args.ring_seconds)
    endpoint = pj.Endpoint()
    endpoint.libCreate()
    config = pj.EpConfig()
    config.uaConfig.threadCnt = 0
    config.uaConfig.mainThreadOnly = True
    config.uaConfig.userAgent = "voiceline-help-line"
    config.logConfig.level = config.logConfig.consoleLevel = PJ_LOG_LEVEL
    config.logConfig.msgLogging = False
    writer = StderrLogWriter()
    writer.__disown__()  # libDestroy deletes it
    config.logConfig.writer = writer
    config.medConfig.clockRate = config.medConfig.sndClockRate = RATE
    config.medConfig.ecTailLen = 0
    config.medConfig.noVad = True
    endpoint.libInit(config)
    endpoint.audDevManager().setNullDev()
    transport = pj.TransportConfig()
    transport.boundAddress = transport.publicAddress = "127.0.0.1"
    transport.port = args.port
    transport_id = endpoint.transportCreate(pj.PJSIP_TRANSPORT_UDP, transport)
    endpoint.libStart()
    for codec in endpoint.codecEnum2():  # PCMU only, as the test's callers
        endpoint.codecSetPriority(codec.codecId, 200 if codec.codecId.startswith("PCMU/") else 0)
    account_config = pj.AccountConfig()
    account_config.idUri = f"sip:help@127.0.0.1:{args.port}"
    account_config.sipConfig.transportId = transport_id
    account_config.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
    account_config.mediaConfig.transportConfig.publicAddress = "127.0.0.1"
    account_config.mediaConfig.transportConfig.port = args.rtp_port
    account_config.mediaConfig.transportConfig.portRange = 4
    account = HelpAccount(line)
    account.create(account_config)
    print("ready", file=out, flush=True)
    give_up = time.monotonic() + LONGEST_SECONDS
    while not line.ended and time.monotonic() < give_up:
        endpoint.libHandleEvents(EVENT_POLL_MS)
        now = time.monotonic()
        if line.call is not None and line.answer_at is not None and now >= line.answer_at:
            line.answer_at, line.answered_at = None, now
            answer = pj.CallOpParam()
            answer.statusCode = 200
            line.call.answer(answer)
        if args.hang_up_after is not None and line.answered_at is not None and now >= line.answered_at + args.hang_up_after:
            line.answered_at = None
            line.call.hangup(pj.CallOpParam(True))  # type: ignore[union-attr]
    line.recorder = None  # the recorder's WAV header is final once it is deleted
    line.tone = None
    line.call = None
    settle = time.monotonic() + RECORDING_SETTLE_SECONDS
    while time.monotonic() < settle and not wav_complete(args.recording):  # its final header, once the bridge ticks
        endpoint.libHandleEvents(EVENT_POLL_MS)
    print("ended" if line.ended else "gave up", file=out, flush=True)
    del account
    endpoint.libDestroy(pj.PJSUA_DESTROY_NO_RX_MSG)  # the call is over: no second's wait for answers
    return 0


if __name__ == "__main__":
    sys.exit(main())
