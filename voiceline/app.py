"""Wiring: configuration -> storage, media engine, SIP user agent and pairing."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from voiceline.audio.hold import chime_pattern, load_wav
from voiceline.audio.media import MediaEngine, MediaError, MediaLeg
from voiceline.config import Config
from voiceline.pairing.service import PairingService, Participant
from voiceline.sip.transport import open_udp
from voiceline.sip.useragent import Call, CallRejected, UserAgent, UserAgentSettings
from voiceline.sip.transaction import Timers
from voiceline.storage import Storage

log = structlog.get_logger("voiceline.app")

DEFAULT_LINE = "default"


@dataclass(eq=False)
class CallerLeg:
    """A confirmed call as pairing sees it: an id and what it hears."""

    call: Call
    media: MediaLeg

    @property
    def id(self) -> str:
        return self.call.id

    def hear_hold(self) -> None:
        self.media.hold()

    def hear(self, other: Participant) -> None:
        assert isinstance(other, CallerLeg)
        self.media.listen_to(other.media)


class VoiceLine:
    """The running service. Implements the user agent's CallHandler."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pairing = PairingService()
        self.storage: Storage | None = None
        self.media: MediaEngine | None = None
        self.agent: UserAgent | None = None
        self._legs: dict[Call, MediaLeg] = {}
        self._writes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sip = self.config.sip
        self.storage = await Storage.open(Path(self.config.storage.data_dir))
        hold_audio = load_wav(self.config.media.hold_audio) if self.config.media.hold_audio else chime_pattern()
        bind_host = sip.listen_address[0]
        self.media = MediaEngine(bind_host, self.config.media.port_range, hold_audio)
        settings = UserAgentSettings(
            advertised_host=sip.advertised_host,
            answer_delay=sip.answer_delay,
            timers=Timers(sip.t1, sip.t2, sip.t4),
            max_message_size=sip.max_message_size,
            codecs=self.config.media.codecs,
        )
        self.agent = UserAgent(settings, self)
        host, port = sip.listen_address
        transport = await open_udp(host, port, self.agent.datagram_received)
        self.agent.attach(transport)
        bound_host, bound_port = transport.local_address
        log.info("sip.listening", address=f"{bound_host}:{bound_port}", transport="udp", advertised=sip.advertised_host)
        if not sip.public_address and host == "0.0.0.0":
            log.warning(
                "sip.public_address_unset",
                advertised=sip.advertised_host,
                hint="only callers on this machine will have audio; set sip.public_address",
            )

    async def stop(self) -> None:
        if self.agent is not None:
            log.info("sip.totals", **asdict(self.agent.counters))
            await self.agent.shutdown()
            if self.agent.transport is not None:
                self.agent.transport.close()
        if self.media is not None:
            self.media.close()
        if self._writes:
            await asyncio.wait(self._writes, timeout=5)
        if self.storage is not None:
            await self.storage.close()
        log.info("service.stopped")

    # -- CallHandler -------------------------------------------------------------

    async def call_offered(self, call: Call) -> int:
        assert self.media is not None
        try:
            leg = await self.media.open_leg()
        except MediaError:
            log.warning("call.no_media_ports", call=call.id)
            raise CallRejected(503, retry_after=30) from None
        audio = call.audio
        leg.start((audio.remote_host, audio.remote_port), audio.codec, audio.payload_type, audio.telephone_event_pt)
        self._legs[call] = leg
        return leg.local_port

    def call_confirmed(self, call: Call) -> None:
        self.pairing.join(CallerLeg(call, self._legs[call]))

    def call_ended(self, call: Call) -> None:
        leg = self._legs.pop(call, None)
        if leg is not None:
            leg.close()
        summary = self.pairing.leave(call.id)
        if summary is not None and self.storage is not None:
            write = asyncio.get_running_loop().create_task(
                self.storage.record_call(DEFAULT_LINE, time.time(), summary.waited, summary.talked, summary.partners > 0)
            )
            self._writes.add(write)
            write.add_done_callback(self._writes.discard)


def tune_process(realtime_priority: int) -> None:
    """Room for every call's sockets (two per leg), and real-time scheduling when configured."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if realtime_priority:
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(realtime_priority))
        except OSError as exc:
            log.warning("process.realtime_unavailable", priority=realtime_priority, error=exc.strerror)
        else:
            log.info("process.realtime", policy="SCHED_RR", priority=realtime_priority)


async def serve(config: Config) -> int:
    """Run until SIGINT/SIGTERM; then BYE every call and exit 0."""
    tune_process(config.media.realtime_priority)
    app = VoiceLine(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
        await stop.wait()
        log.info("service.stopping", calls=len(app.agent.calls) if app.agent else 0)
    finally:
        await app.stop()
    return 0
