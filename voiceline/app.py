"""Wiring: configuration -> storage, media engine, SIP user agent and pairing."""

from __future__ import annotations

import asyncio
import functools
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from voiceline.audio.codecs import available as codec_available
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
        self.media = MediaEngine(
            bind_host, self.config.media.port_range, hold_audio, inband_dtmf=self.config.media.inband_dtmf
        )
        settings = UserAgentSettings(
            advertised_host=sip.advertised_host,
            answer_delay=sip.answer_delay,
            timers=Timers(sip.t1, sip.t2, sip.t4),
            max_message_size=sip.max_message_size,
            codecs=self._usable_codecs(),
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

    def _usable_codecs(self) -> tuple[str, ...]:
        """The configured codecs whose libraries load here (Opus needs libopus)."""
        usable = tuple(name for name in self.config.media.codecs if codec_available(name))
        for name in self.config.media.codecs:
            if name not in usable:
                log.warning("media.codec_unavailable", codec=name)
        if not usable:
            raise MediaError("none of the configured codecs can be used")
        return usable

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
        leg = self._legs[call]
        self.pairing.join(CallerLeg(call, leg))
        leg.on_digit = functools.partial(self.pairing.digit, call.id)

    def call_dtmf(self, call: Call, digit: str) -> None:
        """A digit from SIP INFO (the user agent's side); RTP digits come through `MediaLeg.on_digit`."""
        self.pairing.digit(call.id, digit)

    def call_ended(self, call: Call) -> None:
        leg = self._legs.pop(call, None)
        if leg is not None:
            leg.close()
            log.info("call.media_stats", call=call.id, **asdict(leg.stats()))
        summary = self.pairing.leave(call.id)
        if summary is not None and self.storage is not None:
            write = asyncio.get_running_loop().create_task(
                self.storage.record_call(DEFAULT_LINE, time.time(), summary.waited, summary.talked, summary.partners > 0)
            )
            self._writes.add(write)
            write.add_done_callback(self._writes.discard)


async def serve(config: Config) -> int:
    """Run until SIGINT/SIGTERM; then BYE every call and exit 0."""
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
