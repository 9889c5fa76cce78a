"""The call handler: a media leg for each call the user agent offers, pairing, statistics, the silence reaper.

It sees a call only as `CallInfo` (an id and the negotiated media facts); the
dialog, and with it the caller's URI, stays inside `voiceline.sip`.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import structlog

from voiceline.audio.media import LegStats, MediaEngine, MediaError, MediaLeg
from voiceline.audio.srtp import SrtpKeys
from voiceline.pairing.service import PairingService, Participant, SessionSummary
from voiceline.sip.events import CallInfo, CallMedia
from voiceline.sip.useragent import CallRejected
from voiceline.storage import CallAudio, Storage

log = structlog.get_logger("voiceline.app")


class LiveView(Protocol):
    """What operations (events, metrics, status) hear of calls, and whether a line takes calls now."""

    def line_open(self, line: str) -> bool: ...

    def call_offered(self, call: CallInfo) -> None: ...

    def call_refused(self, call: CallInfo, reason: str, status: int) -> None: ...

    def call_answered(self, call: CallInfo) -> None: ...

    def call_ended(
        self, call: CallInfo, reason: str, summary: SessionSummary | None, stats: LegStats | None
    ) -> None: ...


@dataclass(eq=False)
class CallerLeg:
    """A confirmed call as pairing sees it: an id and what it hears."""

    id: str
    media: MediaLeg

    def hear_hold(self) -> None:
        self.media.hold()

    def hear(self, other: Participant) -> None:
        assert isinstance(other, CallerLeg)
        self.media.listen_to(other.media)


@dataclass(eq=False)
class LiveCall:
    info: CallInfo  # the latest: a re-INVITE may move or hold it
    leg: MediaLeg
    quiet_since: float | None = None  # since when silence counts; None until confirmed
    answered_at: float | None = None  # on the statistics clock: the call is counted in that hour


class Calls:
    """Implements the user agent's CallHandler for inbound calls."""

    def __init__(
        self,
        media: MediaEngine,
        pool: Callable[[str], PairingService],
        max_calls: Callable[[str], int],
        storage: Storage,
        write: Callable[[Coroutine[Any, Any, None]], None],
        hangup: Callable[[str, str], None],
        live_view: LiveView,
    ) -> None:
        """`max_calls(line)`: the line's limit, 0 for none; `hangup(call_id, reason)` ends a call."""
        self.media = media
        self.pool = pool
        self.max_calls = max_calls
        self.storage = storage
        self.write = write
        self.hangup = hangup
        self.live_view = live_view
        self.live: dict[str, LiveCall] = {}  # by call id: every call with a media leg

    async def call_offered(self, call: CallInfo) -> int:
        self.live_view.call_offered(call)
        if not self.live_view.line_open(call.line):
            log.info("line.closed_refused", call=call.id, line=call.line)
            self.live_view.call_refused(call, "line_closed", 480)
            raise CallRejected(480, retry_after=600)
        limit = self.max_calls(call.line)
        if limit and sum(1 for live in self.live.values() if live.info.line == call.line) >= limit:
            log.info("line.full", call=call.id, line=call.line)
            self.live_view.call_refused(call, "line_full", 486)
            raise CallRejected(486, retry_after=60)
        try:
            leg = await self.media.open_leg()
        except MediaError:
            log.warning("call.no_media_ports", call=call.id)
            self.live_view.call_refused(call, "no_media_ports", 503)
            raise CallRejected(503, retry_after=30) from None
        if call.media is not None:  # else the offer goes out in our 200 and the ACK answers it
            _start_media(leg, call, call.media)
        self.live[call.id] = LiveCall(call, leg)
        return leg.local_port

    def call_confirmed(self, call: CallInfo) -> None:
        live = self.live[call.id]
        assert call.media is not None
        if live.info.media is None:  # offerless INVITE: the ACK brought the answer
            _start_media(live.leg, call, call.media)
        live.info = call
        live.quiet_since = asyncio.get_running_loop().time()
        live.answered_at = self.storage.clock()
        self.write(self.storage.record_answer(call.line, live.answered_at))
        live.leg.set_sending(not call.media.on_hold)
        self.live_view.call_answered(call)
        pool = self.pool(call.line)
        pool.join(CallerLeg(call.id, live.leg), held=call.media.on_hold)
        live.leg.on_digit = functools.partial(pool.digit, call.id)

    def call_media_changed(self, call: CallInfo) -> None:
        live = self.live.get(call.id)
        if live is None or call.media is None:
            return
        live.info = call
        live.leg.update_remote(call.media.remote)
        keys = _srtp_keys(call.media)
        if keys is not None:  # a re-offer keeps SRTP or plain RTP as the call began
            live.leg.rekey(keys)
        live.quiet_since = asyncio.get_running_loop().time()
        if call.media.on_hold:
            live.leg.set_sending(False)
            self.pool(call.line).hold(call.id)
        else:
            live.leg.set_sending(True)
            self.pool(call.line).resume(call.id)

    def call_dtmf(self, call: CallInfo, digit: str) -> None:
        """A digit from SIP INFO (the user agent's side); RTP digits come through `MediaLeg.on_digit`."""
        self.pool(call.line).digit(call.id, digit)

    def call_ended(self, call: CallInfo, reason: str) -> None:
        live = self.live.pop(call.id, None)
        audio = CallAudio()
        stats = None
        answered_at = None
        if live is not None:
            answered_at = live.answered_at
            live.leg.close()
            stats = live.leg.stats()
            log.info("call.media_stats", call=call.id, **asdict(stats))
            audio = CallAudio(stats.packets_expected, stats.packets_lost, stats.jitter_ms)
        summary = self.pool(call.line).leave(call.id)
        self.live_view.call_ended(call, reason, summary, stats)
        if summary is not None:
            paired = summary.partners > 0
            ended_at = self.storage.clock()
            self.write(
                self.storage.record_call(
                    call.line, ended_at, summary.waited, summary.talked, paired, audio, answered_at=answered_at
                )
            )

    async def reap_silent_calls(self, timeout: float) -> None:
        """End calls whose caller sent no RTP for `timeout` seconds while not on hold."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(5.0, timeout / 4))
            now = loop.time()
            for call_id, live in list(self.live.items()):
                try:
                    self._reap_if_silent(call_id, live, now, timeout)
                except Exception as exc:  # one call's error never spares the others
                    log.error("call.reap_failed", call=call_id, error=type(exc).__name__, exc_info=exc)

    def _reap_if_silent(self, call_id: str, live: LiveCall, now: float, timeout: float) -> None:
        media = live.info.media
        if live.quiet_since is None or media is None or media.on_hold:
            return
        if now - max(live.quiet_since, live.leg.last_received) > timeout:
            log.warning("call.media_timeout", call=call_id, seconds=timeout)
            self.hangup(call_id, "no media")  # ends the call even when its BYE cannot be sent


def _start_media(leg: MediaLeg, call: CallInfo, media: CallMedia) -> None:
    # The INVITE's source host is trusted for RTP too: a caller behind NAT sends both from its NAT.
    leg.start(
        media.remote,
        media.codec,
        media.payload_type,
        media.telephone_event_pt,
        signalling_host=call.signalling_host,
        srtp=_srtp_keys(media),
    )


def _srtp_keys(media: CallMedia) -> SrtpKeys | None:
    """The negotiated SDES keys: ours (what we send) and the caller's; None for plain RTP."""
    keys = media.srtp
    return None if keys is None else SrtpKeys(keys.suite, send_key=keys.send_key, receive_key=keys.receive_key)
