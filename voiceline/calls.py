"""The call handler: a media leg for each call the user agent offers, each line's journeys, help calls, statistics, the silence watch.

It sees a call only as `CallInfo` (an id and the negotiated media facts); the
dialog, and with it the caller's URI, stays inside `voiceline.sip`. Each line
is a `pairing.line.Line` on the loop's clock, fed what happens to its calls
(answered, digits, a prompt's end, hold and resume, hang-up) and, through one
timer per line, `due(now)`; what it returns is done to the media legs:
prompts mixed over what a caller hears, hold music, silence, a partner, BYE.

The silence watch is one task that wakes at the earliest deadline of all calls
(or when a call is answered, resumed or paired): a caller sending no RTP for
`media.partner_silence` while connecting or talking is parted from its partner
(its phone or line seems gone), and one silent for `media.inactivity_timeout`
is ended. A leg's last arrival is read when the watch wakes, never per packet.

Every line shares one `SafetyLedger` (pseudonyms, in memory only): a call is
answered with its `Caller`. The help key's call is placed here (`CallHelp`):
an outbound call with a media leg of its own, bridged both ways with the
caller once answered, or a REFER of the caller's call. The help leg belongs to
no line: it is not counted, paired or told anything; only its outcome is.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import ipaddress
import socket
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog

from voiceline.audio.hold import ringback
from voiceline.audio.media import LegStats, MediaEngine, MediaError, MediaLeg
from voiceline.audio.prompts import PromptSet
from voiceline.audio.srtp import SrtpKeys
from voiceline.pairing.journey import (
    PAIRED_STATES,
    WAITING_STATES,
    Action,
    Bridge,
    BridgeExternal,
    CallHelp,
    CallSummary,
    EndHelpCall,
    HangUp,
    JourneySettings,
    PlayMusic,
    PlayPrompts,
    PlayRingback,
    Silence,
    State,
    Statistic,
)
from voiceline.pairing.line import Line, Step
from voiceline.pairing.safety import Caller, SafetyLedger
from voiceline.sip.auth import DigestClient
from voiceline.sip.events import Answered, CallInfo, CallMedia, Transferred
from voiceline.sip.useragent import CallRejected, UserAgent
from voiceline.storage import CallAudio, Storage

log = structlog.get_logger("voiceline.app")

JOURNEY_ENDED = "journey_ended"  # the reason our BYE gives to logs, events and metrics
RESUME_CHECK = 1.0  # seconds between looks at a caller parted for silence: its audio may come back
Hearing = PlayMusic | Silence | Bridge | PlayRingback | BridgeExternal


class LiveView(Protocol):
    """What operations (events, metrics, status) hear of calls, and whether a line takes calls now."""

    def line_open(self, line: str) -> bool: ...

    def call_offered(self, call: CallInfo) -> None: ...

    def call_refused(self, call: CallInfo, reason: str, status: int) -> None: ...

    def call_answered(self, call: CallInfo) -> None: ...

    def call_ended(
        self, call: CallInfo, reason: str, summary: CallSummary | None, stats: LegStats | None
    ) -> None: ...

    def pairing_changed(self, line: str, paired: bool) -> None:
        """A caller started waiting (new, or back from a partner), or two were `paired` (bridged, talking)."""
        ...


@dataclass(frozen=True)
class LineSetup:
    """A line's journey settings and the prompts its callers hear."""

    settings: JourneySettings
    prompts: PromptSet


@dataclass(frozen=True)
class HelpRoute:
    """Where a line's help key connects: `destination` (a SIP URI) at `host`:`port` (its host), with
    the help trunk's outbound account when it has one."""

    destination: str
    method: str  # "invite": we call and bridge; "refer": the caller's carrier is asked to
    host: str
    port: int
    trunk: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    from_uri: str | None = None  # the trunk's account; None: our anonymous From
    pass_identity: bool = False
    ring_timeout: float = 30.0


@dataclass(eq=False)
class HelpCall:
    """A caller's help call: its own media leg and our INVITE (or our REFER of the caller's call)."""

    leg: MediaLeg | None = None
    outbound: str | None = None  # our INVITE's call id, once sent
    connected: bool = False
    ended: bool = False  # EndHelpCall came: whatever happens later to the call is ended


@dataclass(eq=False)
class ServedLine:
    """One line as the service drives it: its callers' journeys, its prompts, its one timer."""

    name: str
    journeys: Line
    prompts: PromptSet
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class LiveCall:
    info: CallInfo  # the latest: a re-INVITE may move or hold it
    leg: MediaLeg
    quiet_since: float | None = None  # since when silence counts; None until confirmed
    answered_at: float | None = None  # on the statistics clock: the call is counted in that hour
    hearing: Hearing | None = None  # what the journey last said it hears (again after a hold)
    state: State | None = None  # its journey's, as last seen: a change to waiting is an event
    summary: CallSummary | None = None  # its figures, once its journey ended (before its BYE)
    silent_since: float | None = None  # parted from its partner for silence then; None once heard again


class Calls:
    """Implements the user agent's CallHandler for inbound calls."""

    def __init__(
        self,
        media: MediaEngine,
        line_setup: Callable[[str], LineSetup],
        max_calls: Callable[[str], int],
        storage: Storage,
        write: Callable[[Coroutine[Any, Any, None]], None],
        hangup: Callable[[str, str], None],
        live_view: LiveView,
        dialer: UserAgent,
        ledger: SafetyLedger | None = None,
        help_route: Callable[[str], HelpRoute | None] = lambda line: None,
        trunk_of: Callable[[str], str] = lambda address: "",
    ) -> None:
        """`line_setup(line)`: its journey settings and prompts; `max_calls(line)`: its limit, 0 for none;
        `hangup(call_id, reason)` ends a call; `dialer`: the user agent help calls go out through (its
        handler, for inbound calls, is this); `ledger`: every line's safety records; `help_route(line)`:
        where its help key connects (None: the safety message only); `trunk_of(address)`: the trunk
        an address sends from (the help line's requests in its call are admitted as that trunk's)."""
        self.media = media
        self.ledger = ledger
        self.help_route = help_route
        self.trunk_of = trunk_of
        self.dialer = dialer
        self.help_calls: dict[str, HelpCall] = {}  # by the caller's call id
        self._help_tasks: set[asyncio.Task[None]] = set()
        self.line_setup = line_setup
        self.max_calls = max_calls
        self.storage = storage
        self.write = write
        self.hangup = hangup
        self.live_view = live_view
        self.live: dict[str, LiveCall] = {}  # by call id: every call with a media leg
        self.lines: dict[str, ServedLine] = {}  # by name, once a call reached it
        self._busiest_hours: dict[str, tuple[int, int] | None] = {}
        self._loop = asyncio.get_running_loop()
        self._silence_changed = asyncio.Event()  # a call may have a silence deadline earlier than the watch's

    def now(self) -> float:
        """The clock the lines run on (the loop's; callable from any thread)."""
        return self._loop.time()

    # -- lines ------------------------------------------------------------------------

    def line(self, name: str) -> ServedLine:
        served = self.lines.get(name)
        if served is None:
            setup = self.line_setup(name)
            served = self.lines[name] = ServedLine(name, self._new_line(name, setup.settings), setup.prompts)
            served.journeys.busiest_hours = self._busiest_hours.get(name)
        return served

    def configure(self, name: str, setup: LineSetup) -> None:
        """A line's settings or prompts changed: calls that come from now on follow them (the
        pool's windows change once the line is empty)."""
        served = self.lines.get(name)
        if served is None:
            return
        served.prompts = setup.prompts
        if served.journeys.empty:
            served.journeys = self._new_line(name, setup.settings)
            served.journeys.busiest_hours = self._busiest_hours.get(name)
        else:
            served.journeys.settings = setup.settings
            served.journeys.help_line = self.help_route(name) is not None

    def _new_line(self, name: str, settings: JourneySettings) -> Line:
        return Line(settings, self.ledger, help_line=self.help_route(name) is not None)

    def set_busiest_hours(self, name: str, hours: tuple[int, int] | None) -> None:
        self._busiest_hours[name] = hours
        if name in self.lines:
            self.lines[name].journeys.busiest_hours = hours

    # -- the user agent's events ------------------------------------------------------

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
        live.quiet_since = self._loop.time()
        live.answered_at = self.storage.clock()
        self._silence_changed.set()
        self.write(self.storage.record_answer(call.line, live.answered_at))
        live.leg.set_sending(not call.media.on_hold)
        self.live_view.call_answered(call)
        live.leg.on_digit = functools.partial(self.call_dtmf, call)
        live.leg.on_prompt_end = functools.partial(self._prompt_finished, call.line, call.id)
        served = self.line(call.line)
        caller = Caller(call.pseudonym, call.key_epoch, call.withheld)
        self._apply(served, served.journeys.answered(call.id, self._loop.time(), caller))
        if call.media.on_hold:
            self._apply(served, served.journeys.held(call.id, self._loop.time()))

    def call_media_changed(self, call: CallInfo) -> None:
        live = self.live.get(call.id)
        if live is None or call.media is None:
            return
        was_held = live.info.media is not None and live.info.media.on_hold
        live.info = call
        live.leg.update_remote(call.media.remote)
        keys = _srtp_keys(call.media)
        if keys is not None:  # a re-offer keeps SRTP or plain RTP as the call began
            live.leg.rekey(keys)
        live.quiet_since = self._loop.time()
        self._silence_changed.set()
        live.leg.set_sending(not call.media.on_hold)  # stopping detaches it from what it heard
        served = self.line(call.line)
        now = self._loop.time()
        if call.media.on_hold:
            if not was_held:
                log.info("pairing.held", call=call.id)
            self._apply(served, served.journeys.held(call.id, now))
        else:
            if was_held:
                log.info("pairing.resumed", call=call.id)
                if live.hearing is not None:
                    self._hear(live, live.hearing)
            self._apply(served, served.journeys.resumed(call.id, now))

    def call_dtmf(self, call: CallInfo, digit: str) -> None:
        """A digit from SIP INFO (the user agent's side) or from RTP (`MediaLeg.on_digit`)."""
        served = self.line(call.line)
        self._apply(served, served.journeys.digit(call.id, digit, self._loop.time()))

    def call_ended(self, call: CallInfo, reason: str) -> None:
        live = self.live.pop(call.id, None)
        audio = CallAudio()
        stats = None
        answered_at = None
        summary = None
        if live is not None:
            answered_at = live.answered_at
            live.leg.close()
            stats = live.leg.stats()
            log.info("call.media_stats", call=call.id, **asdict(stats))
            audio = CallAudio(stats.packets_expected, stats.packets_lost, stats.jitter_ms)
            summary = live.summary
        served = self.lines.get(call.line)
        if served is not None and summary is None:
            step = served.journeys.hung_up(call.id, self._loop.time())
            summary = next((ended for ended_id, ended in step.ended if ended_id == call.id), None)
            self._apply(served, step)
        self.live_view.call_ended(call, reason, summary, stats)
        if summary is not None:
            paired = summary.partners > 0
            ended_at = self.storage.clock()
            self.write(
                self.storage.record_call(
                    call.line, ended_at, summary.waited, summary.talked, paired, audio, answered_at=answered_at
                )
            )

    # -- the journeys -----------------------------------------------------------------

    def _prompt_finished(self, line: str, call_id: str) -> None:
        served = self.lines.get(line)
        if served is not None and call_id in self.live:
            self._apply(served, served.journeys.prompt_finished(call_id, self._loop.time()))

    def _due(self, served: ServedLine) -> None:
        served.timer = None
        try:
            self._apply(served, served.journeys.due(self._loop.time()))
        except Exception as exc:  # logged with a redacted trace; the line's timers go on, a second later
            log.error("line.due_failed", line=served.name, error=type(exc).__name__, exc_info=exc)
            served.timer = self._loop.call_later(1.0, self._due, served)

    def _apply(self, served: ServedLine, step: Step) -> None:
        """Do what the line's step says, then set its timer; BYEs last (their end comes back to us)."""
        hang_ups: list[tuple[str, HangUp]] = []
        for call_id, action in step.actions:
            if isinstance(action, EndHelpCall):  # also for a caller already gone
                self._end_help(call_id)
                continue
            live = self.live.get(call_id)
            if live is None:
                continue
            if isinstance(action, HangUp):
                hang_ups.append((call_id, action))
                continue
            try:
                self._act(served, live, call_id, action)
            except MediaError as exc:  # one leg's trouble never stops the others' actions
                log.warning("call.media_action_failed", call=call_id, error=str(exc))
        for call_id, summary in step.ended:
            if call_id in self.live:
                self.live[call_id].summary = summary
        self._report(served, step)
        self._set_timer(served)
        for call_id, hang_up in hang_ups:
            # One reason for every goodbye: a pair's time running out ends two calls, which a shared
            # reason would link; why is counted per line in the statistics, and shown at debug.
            log.info("call.journey_ended", call=call_id)
            log.debug("call.journey_end_reason", call=call_id, reason=hang_up.reason.value)
            self.hangup(call_id, JOURNEY_ENDED)

    def _act(self, served: ServedLine, live: LiveCall, call_id: str, action: Action) -> None:
        if isinstance(action, PlayPrompts):
            self._play(served, live, call_id, action.prompts)
        elif isinstance(action, PlayMusic | Silence | Bridge | PlayRingback | BridgeExternal):
            live.hearing = action
            media = live.info.media
            if media is None or not media.on_hold:  # a held leg is told again on resume
                self._hear(live, action)
        elif isinstance(action, CallHelp):
            self._place_help(served, call_id)

    def _hear(self, live: LiveCall, hearing: Hearing) -> None:
        if isinstance(hearing, PlayMusic):
            live.leg.hold()
        elif isinstance(hearing, Silence):
            live.leg.hear_nothing()
        elif isinstance(hearing, PlayRingback):
            live.leg.hold(ringback(hearing.frequencies, hearing.on, hearing.period))
        elif isinstance(hearing, BridgeExternal):
            help_call = self.help_calls.get(live.info.id)
            if help_call is not None and help_call.leg is not None and help_call.connected:
                live.leg.listen_to(help_call.leg)
                help_call.leg.listen_to(live.leg)
        else:
            partner = self.live.get(hearing.partner)
            if partner is not None:
                live.leg.listen_to(partner.leg)

    def _play(self, served: ServedLine, live: LiveCall, call_id: str, prompts: tuple[str, ...]) -> None:
        pcm = np.zeros(0, dtype=np.int16)  # none: what plays stops, and that is its end
        try:
            if prompts:
                pcm = served.prompts.join(prompts, live.leg.rate)
        except KeyError:  # a prompt the set lacks: played as empty, so the journey goes on
            log.error("prompt.unplayable", call=call_id, prompts=list(prompts))
        live.leg.play_over(pcm, live.leg.rate)

    def _report(self, served: ServedLine, step: Step) -> None:
        """Statistics to storage; callers starting to wait and pairs starting to talk to operations."""
        if step.statistics:
            counts: Counter[str] = Counter(count.statistic.value for count in step.statistics)
            seconds: dict[str, float] = {}
            for count in step.statistics:
                if count.seconds is not None:
                    seconds[count.statistic.value] = seconds.get(count.statistic.value, 0.0) + count.seconds
            self.write(self.storage.record_journey(served.name, self.storage.clock(), dict(counts), seconds))
        started_talking = 0
        for call_id in dict.fromkeys(call_id for call_id, _ in step.actions):
            live, journey = self.live.get(call_id), served.journeys.journey(call_id)
            if live is None or journey is None:
                continue
            if journey.state in WAITING_STATES and live.state not in WAITING_STATES:
                # Counts only at info: which call waits, and who it talked with, is debug.
                log.info("pairing.waiting", line=served.name, waiting=self._waiting(served))
                log.debug("pairing.call_waiting", call=call_id)
                self.live_view.pairing_changed(served.name, paired=False)
            if journey.state is State.CONNECTING and live.state is not State.CONNECTING:
                self._silence_changed.set()  # its partner-silence deadline starts
            if journey.state is State.TALKING and live.state is State.CONNECTING:
                started_talking += 1
                if journey.partner is not None and call_id < journey.partner:  # one line per pair
                    log.debug("pairing.partners", call=call_id, partner=journey.partner)
            live.state = journey.state
        for _ in range(started_talking // 2):  # the two of a pair are bridged in the same step
            log.info("pairing.talking", line=served.name, waiting=self._waiting(served))
            self.live_view.pairing_changed(served.name, paired=True)
        for _ in range(sum(count.statistic is Statistic.SKIP for count in step.statistics)):
            log.info("pairing.next_partner_requested", line=served.name)

    @staticmethod
    def _waiting(served: ServedLine) -> int:
        counts = served.journeys.counts()
        return sum(counts[state] for state in WAITING_STATES)

    def _set_timer(self, served: ServedLine) -> None:
        deadline = served.journeys.deadline
        if served.timer is not None and (deadline is None or served.timer.when() != deadline):
            served.timer.cancel()
            served.timer = None
        if deadline is not None and served.timer is None:
            served.timer = self._loop.call_at(deadline, self._due, served)

    # -- help calls ---------------------------------------------------------------------

    def _place_help(self, served: ServedLine, call_id: str) -> None:
        route = self.help_route(served.name)
        if route is None or call_id in self.help_calls:
            self._apply(served, served.journeys.help_failed(call_id, self._loop.time()))
            return
        help_call = self.help_calls[call_id] = HelpCall()
        run = self._refer_help if route.method == "refer" else self._invite_help
        task = self._loop.create_task(self._help_task(served, call_id, help_call, run(served, call_id, help_call, route)))
        self._help_tasks.add(task)
        task.add_done_callback(self._help_tasks.discard)

    async def _help_task(
        self, served: ServedLine, call_id: str, help_call: HelpCall, run: Coroutine[Any, Any, None]
    ) -> None:
        try:
            await run
        except Exception as exc:  # logged with a redacted trace; the caller goes back to where it was
            log.error("help.call_failed", call=call_id, error=type(exc).__name__, exc_info=exc)
            self._help_outcome(served, call_id, help_call, connected=False)
        finally:
            if help_call.leg is not None:
                help_call.leg.close()
            if self.help_calls.get(call_id) is help_call:
                del self.help_calls[call_id]

    async def _invite_help(self, served: ServedLine, call_id: str, help_call: HelpCall, route: HelpRoute) -> None:
        """Call the help line on a media leg of its own; bridged with the caller by its journey's BridgeExternal."""
        try:
            address = await self._address(route.host, route.port)
            help_call.leg = await self.media.open_leg()
        except (OSError, MediaError) as exc:
            log.warning("help.unreachable", call=call_id, error=type(exc).__name__)
            self._help_outcome(served, call_id, help_call, connected=False)
            return
        if help_call.ended:
            return
        outbound = self.dialer.invite(
            route.destination,
            address,
            help_call.leg.local_port,
            credentials=DigestClient(route.username, route.password) if route.username else None,
            privacy=True,
            ring_timeout=route.ring_timeout,
            trunk=route.trunk or self.trunk_of(address[0]),
            from_uri=route.from_uri,
            assert_identity_of=call_id if route.pass_identity else None,
        )
        help_call.outbound = outbound.id
        log.info("help.calling", call=call_id, help_call=outbound.id, line=served.name)
        outcome = await outbound.outcome
        if not isinstance(outcome, Answered) or outcome.call.media is None:
            log.info("help.not_connected", call=call_id, outcome=type(outcome).__name__, status=getattr(outcome, "status", None))
            self._help_outcome(served, call_id, help_call, connected=False)
            return
        if help_call.ended:  # answered after the caller stopped waiting for it
            self.dialer.hangup(outbound.id, "help call cancelled")
            return
        _start_media(help_call.leg, outcome.call, outcome.call.media)
        log.info("help.connected", call=call_id, help_call=outbound.id)
        self._help_outcome(served, call_id, help_call, connected=True)
        ended = await outbound.ended
        log.info("help.ended", call=call_id, help_call=outbound.id, reason=ended.reason)
        if not help_call.ended:
            help_call.ended = True
            self._apply(served, served.journeys.help_ended(call_id, self._loop.time()))

    async def _refer_help(self, served: ServedLine, call_id: str, help_call: HelpCall, route: HelpRoute) -> None:
        """Ask the caller's carrier to connect it to the help line (REFER); once it did, our leg ends."""
        transfer = self.dialer.refer(call_id, route.destination, timeout=route.ring_timeout)
        if transfer is None:
            log.info("help.refer_impossible", call=call_id)
            self._help_outcome(served, call_id, help_call, connected=False)
            return
        outcome = await transfer.outcome
        connected = isinstance(outcome, Transferred)
        log.info("help.referred" if connected else "help.refer_failed", call=call_id, status=getattr(outcome, "status", None))
        self._help_outcome(served, call_id, help_call, connected=connected)
        if connected and call_id in self.live:
            self.hangup(call_id, "transferred to help")

    def _help_outcome(self, served: ServedLine, call_id: str, help_call: HelpCall, connected: bool) -> None:
        """The caller's journey hears whether its help call got through (unless it stopped waiting)."""
        if help_call.ended or call_id not in self.live:
            return
        help_call.connected = connected
        now = self._loop.time()
        step = served.journeys.help_answered(call_id, now) if connected else served.journeys.help_failed(call_id, now)
        self._apply(served, step)

    async def shutdown(self) -> None:
        """Stopping: stop waiting on every help call (a REFER's NOTIFY, a help line's answer or hang-up).
        The user agent's shutdown then ends the calls themselves with BYE (CANCEL while ringing)."""
        for call_id, help_call in list(self.help_calls.items()):
            if not help_call.ended:
                help_call.ended = True
                log.info("help.given_up", call=call_id, connected=help_call.connected, reason="service stopping")
        for task in self._help_tasks:
            task.cancel()
        await asyncio.gather(*self._help_tasks, return_exceptions=True)

    def _end_help(self, call_id: str) -> None:
        """The caller no longer wants its help call (cancelled, hung up, or a goodbye): CANCEL or BYE it."""
        help_call = self.help_calls.get(call_id)
        if help_call is None or help_call.ended:
            return
        help_call.ended = True
        if help_call.outbound is not None:
            self.dialer.hangup(help_call.outbound, "help call ended")

    async def _address(self, host: str, port: int) -> tuple[str, int]:
        """The help route's address: a configured host name is resolved (never one a caller chose)."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            return str(infos[0][4][0]), port
        return host, port

    # -- silence ----------------------------------------------------------------------

    async def reap_silent_calls(self, timeout: float, partner_silence: float) -> None:
        """End calls whose caller sent no RTP for `timeout` seconds while not on hold, and part a caller
        silent for `partner_silence` seconds from its partner (each 0: never)."""
        while True:
            self._silence_changed.clear()
            wake = self._watch_silence(self._loop.time(), timeout, partner_silence)
            try:
                async with asyncio.timeout_at(wake):  # None: until a call changes
                    await self._silence_changed.wait()
            except TimeoutError:
                pass

    def _watch_silence(self, now: float, timeout: float, partner_silence: float) -> float | None:
        """Act on every call past a silence deadline; the earliest deadline still ahead."""
        wake: float | None = None
        for call_id, live in list(self.live.items()):
            if call_id not in self.live:  # ended by what another call's silence did
                continue
            try:
                deadline = self._silence_deadline(call_id, live, now, timeout, partner_silence)
            except Exception as exc:  # one call's error never spares the others
                log.error("call.reap_failed", call=call_id, error=type(exc).__name__, exc_info=exc)
                deadline = now + RESUME_CHECK
            if deadline is not None and (wake is None or deadline < wake):
                wake = deadline
        return wake

    def _silence_deadline(self, call_id: str, live: LiveCall, now: float, timeout: float, partner_silence: float) -> float | None:
        media = live.info.media
        if live.quiet_since is None or media is None or media.on_hold:
            return None
        served = self.lines.get(live.info.line)
        journey = served.journeys.journey(call_id) if served is not None else None
        paired = journey is not None and journey.partner is not None and journey.state in PAIRED_STATES
        parted_at = live.silent_since if journey is not None and journey.silent else None
        heard = max(live.quiet_since, live.leg.last_received)
        verdict, deadline = silence_check(heard, now, timeout, partner_silence, paired, parted_at)
        if verdict is SilenceVerdict.END:
            log.warning("call.media_timeout", call=call_id, seconds=timeout)
            self.hangup(call_id, "no media")  # ends the call even when its BYE cannot be sent
        elif verdict is not None and served is not None and journey is not None:
            if verdict is SilenceVerdict.PART:
                live.silent_since = now
                # Counts only at info: which call went silent, and whose partner it was, is debug.
                log.info("pairing.partner_dropped", line=served.name)
                log.debug("pairing.call_silent", call=call_id, partner=journey.partner)
                self._apply(served, served.journeys.silent(call_id, now))
            else:
                live.silent_since = None
                log.debug("pairing.call_heard_again", call=call_id)
                self._apply(served, served.journeys.heard_again(call_id, now))
        return deadline


class SilenceVerdict(enum.Enum):
    END = "end"  # silent for the inactivity timeout: hang up
    PART = "part"  # silent for partner_silence while paired: part it from its partner
    HEARD_AGAIN = "heard_again"  # parted for silence, and its audio is back


def silence_check(
    heard: float, now: float, inactivity: float, partner_silence: float, paired: bool, parted_at: float | None
) -> tuple[SilenceVerdict | None, float | None]:
    """What a leg last heard from at `heard` calls for at `now`, and when it next needs a look (None:
    not until something changes). `inactivity`, `partner_silence`: the limits, 0 for off; `paired`:
    connecting or talking; `parted_at`: when it was parted from its partner for silence, else None."""
    if inactivity and now - heard >= inactivity:
        return SilenceVerdict.END, None
    deadlines = [heard + inactivity] if inactivity else []
    verdict = None
    if partner_silence and parted_at is not None:
        if heard > parted_at:
            verdict = SilenceVerdict.HEARD_AGAIN
        else:
            deadlines.append(now + RESUME_CHECK)
    elif partner_silence and paired:
        if now - heard >= partner_silence:
            verdict = SilenceVerdict.PART
            deadlines.append(now + RESUME_CHECK)
        else:
            deadlines.append(heard + partner_silence)
    return verdict, min(deadlines, default=None)


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
