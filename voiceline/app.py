"""Wiring: configuration -> storage, media engine, SIP user agent and pairing."""

from __future__ import annotations

import asyncio
import errno
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from voiceline.audio.hold import chime_pattern, load_wav
from voiceline.audio.media import MediaEngine, MediaError, MediaLeg
from voiceline.config import Config, SipConfig
from voiceline.pairing.service import PairingService, Participant
from voiceline.sip.overload import OverloadLimits, RateLimit
from voiceline.sip.transaction import Timers
from voiceline.sip.transport import (
    MessageHandler,
    SipTransport,
    StreamLimits,
    StreamTransport,
    client_tls_context,
    open_stream,
    open_udp,
    server_tls_context,
)
from voiceline.sip.useragent import Call, CallRejected, UserAgent, UserAgentSettings
from voiceline.storage import Storage

log = structlog.get_logger("voiceline.app")

DEFAULT_LINE = "default"
# With port 0 UDP and TCP share one kernel-chosen port; tries when TCP finds it taken.
SHARED_PORT_ATTEMPTS = 20


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
            overload=overload_limits(sip),
        )
        self.agent = UserAgent(settings, self)
        for transport in await open_transports(sip, self.agent.message_received):
            self.agent.attach(transport)
            bound_host, bound_port = transport.local_address
            log.info(
                "sip.listening",
                address=f"{bound_host}:{bound_port}",
                transport=transport.name.lower(),
                advertised=sip.advertised_host,
            )
        host = sip.listen_address[0]
        if not sip.public_address and host == "0.0.0.0":
            log.warning(
                "sip.public_address_unset",
                advertised=sip.advertised_host,
                hint="only callers on this machine will have audio; set sip.public_address",
            )

    async def stop(self) -> None:
        if self.agent is not None:
            log.info("sip.totals", **asdict(self.agent.counters), **asdict(self.agent.overload.counters))
            for transport in self.agent.transports.values():
                if isinstance(transport, StreamTransport):
                    log.info("sip.connections", transport=transport.name.lower(), **asdict(transport.counters))
            await self.agent.shutdown()
            for transport in self.agent.transports.values():
                transport.close()
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


def overload_limits(sip: SipConfig) -> OverloadLimits:
    return OverloadLimits(
        rates={
            "INVITE": RateLimit(sip.invite_rate, sip.invite_burst),
            "REGISTER": RateLimit(sip.register_rate, sip.register_burst),
            "OPTIONS": RateLimit(sip.options_rate, sip.options_burst),
        },
        max_calls=sip.max_calls,
        scanner_user_agents=tuple(name.lower() for name in sip.scanner_user_agents),
    )


async def open_transports(sip: SipConfig, on_message: MessageHandler) -> list[SipTransport]:
    """UDP and TCP on `sip.listen` (one port for both), TLS on `sip.listen_tls` when set."""
    host, port = sip.listen_address
    limits = StreamLimits(sip.max_message_size, sip.connection_idle_timeout, sip.max_connections)
    opened: list[SipTransport] = []
    try:
        for attempt in range(SHARED_PORT_ATTEMPTS):
            if "udp" in sip.transports:
                udp = await open_udp(host, port, on_message)
                opened.append(udp)
            if "tcp" not in sip.transports:
                break
            tcp_port = opened[0].local_address[1] if opened else port
            try:
                opened.append(await open_stream("TCP", host, tcp_port, on_message, limits))
                break
            except OSError as exc:
                # Port 0: the UDP port the kernel chose may be taken for TCP; choose again.
                if port != 0 or exc.errno != errno.EADDRINUSE or attempt == SHARED_PORT_ATTEMPTS - 1:
                    raise
                for transport in opened:
                    transport.close()
                opened.clear()
        tls_address = sip.tls_address
        if tls_address is not None:
            tls = await open_stream(
                "TLS",
                *tls_address,
                on_message,
                limits,
                server_ssl=server_tls_context(sip.tls_certificate, sip.tls_private_key),
                client_ssl=client_tls_context(sip.tls_ca_file),
            )
            opened.append(tls)
    except BaseException:
        for transport in opened:
            transport.close()
        raise
    return opened


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
