"""One caller's journey: welcome, a choice, waiting, talking, and a kind goodbye.

Sans-I/O: `Journey.handle` is fed an event (answered, a key, the prompt finished,
a partner found or gone, a timer due, hung up) with `now` on the caller's clock
and what is known of the line, and returns actions: prompts to play (by id, in
order), what the caller hears under them (music, silence or the partner) and
hanging up. `deadline` says when it next needs a `TimerDue`. Every duration
and key comes from the line's `JourneySettings`.

The states, in the order a caller meets them:
  WELCOME    what the line is, the keys (any key skips it)
  CHOICE     over music: "press 1 to talk, 2 to listen, or just wait"
  WAITING    music; a reassurance every `reassure_every`, alternating phrasings, or
             once, when nobody else is on the line, that it is quiet (and the
             busiest hours); a goodbye and hang-up at `max_wait`. A caller is
             offered to the pool (`seeking`) once what it is being told has finished
  CONNECTING the cue and "you're connected, say hello"; bridged when both have heard it
  TALKING    bridged; `#` parts; a warning `warn_before` the end of `max_talk`
  END_CHOICE time is up: a key to wait for someone new, else goodbye
  GOODBYE    the last words; hang up when they finish
  ENDED
A partner who hangs up or presses `#` sends the other back to WAITING, told so.

Safety (the ledger in `pairing.safety` decides; the journey says it kindly):
  COOLDOWN       held apart (reported by several callers): a neutral message and music,
                 never paired, back to WAITING when the cooldown ends; nobody is told why
  HELP_MESSAGE   the help key: the safety message, then (when the line has a help
                 destination) "connecting you", leaving any partner (told it stepped away)
  HELP_RINGING   `CallHelp` placed: a ringback tone; the help key again cancels
  HELP_CONNECTED bridged with the help call (`BridgeExternal`); its end is a goodbye
Busy, no answer or a failed help call: a kind message, and back to waiting (or the
cooldown). The report key while connected or talking: `Report` for the line, "thank
you" and waiting again; the reported partner hears only that the other has left.
A call over the per-caller rate, or withheld where the line takes no withheld callers,
hears a kind message and is hung up.

A caller whose audio stops while connected or talking (`Silent`: its phone or its
line seems gone, no BYE) leaves its partner, who hears that the line to the other
person seems to have dropped and waits again; the silent one is told the same and
waits too, never paired while silent: when its audio comes back it is a waiting
caller again (the service ends a call that stays silent).

A caller who puts the line on hold (re-INVITE/UPDATE) leaves the pool while
waiting and returns on resume; while connected its partner hears music and
"the other person seems to have stepped away", and the two are bridged again
on resume. Nothing is told to a held caller (its leg sends nothing): at
`max_wait` it is hung up without the goodbye.

Three kinds of action are for the line, not the call: `PartWays` and `HoldNews`
(the partner must be told) and `ReadyToTalk` (the partner may be waiting for us
to be bridged); `Count` is an anonymous statistic; `Report` and the help call's actions go to the
line and the wiring. `pairing.line.Line` consumes them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from voiceline.pairing.pool import Preference
from voiceline.pairing.safety import Arrival

KEYS = frozenset("0123456789*#")  # the keys every phone has (no A-D)
REASSURANCES = ("reassure_1", "reassure_2", "reassure_3", "reassure_4")
CONNECT_CUE = "connect_cue"  # the audio layer's one prompt that is not speech


@dataclass(frozen=True)
class KeyMap:
    """What each key does on a line; None leaves that feature off (and unspoken)."""

    someone_else: str | None = "#"
    talk: str | None = "1"
    listen: str | None = "2"
    keys_again: str | None = "9"
    help: str | None = "0"
    report: str | None = "*"  # report the partner: never paired with them again

    def __post_init__(self) -> None:
        keys = [key for key in vars(self).values() if key is not None]
        if any(key not in KEYS for key in keys):
            raise ValueError("a key must be one of 0-9, * and #")
        if len(set(keys)) != len(keys):
            raise ValueError("each key may have one meaning only")


@dataclass(frozen=True)
class JourneySettings:
    """A line's timings (seconds) and keys; the defaults are what README describes."""

    welcome: bool = True  # speak the welcome and the keys on answer
    offer_choice: bool = True  # ask for a talk/listen preference right after the welcome
    reassure_every: float = 45.0  # while waiting
    max_wait: float = 600.0  # then a goodbye: nobody waits without end
    max_talk: float | None = None  # off: a conversation lasts as long as both like
    warn_before: float = 60.0  # the talk-time warning, before max_talk
    end_choice_wait: float = 20.0  # after talk time is up: how long the key to wait again is offered
    # Each caller's choice lasts a random extra of up to this, so that two partners who both let it
    # pass are not hung up in the same instant (the carrier's records would link them).
    end_choice_spread: float = 8.0
    preference_wait: float = 60.0  # nobody waits longer than this because of a preference
    skip_window: float = 120.0  # after `#` the two are kept apart this long
    keys: KeyMap = field(default_factory=KeyMap)

    def __post_init__(self) -> None:
        durations = (self.reassure_every, self.max_wait, self.end_choice_wait, self.warn_before)
        if min(durations) <= 0 or min(self.preference_wait, self.skip_window, self.end_choice_spread) < 0:
            raise ValueError("journey durations must be positive")
        if self.max_talk is not None and not 0 < self.warn_before < self.max_talk:
            raise ValueError("warn_before must lie between 0 and max_talk")


class State(enum.Enum):
    WELCOME = "welcome"
    CHOICE = "choice"
    WAITING = "waiting"
    CONNECTING = "connecting"
    TALKING = "talking"
    END_CHOICE = "end_choice"
    COOLDOWN = "cooldown"
    HELP_MESSAGE = "help_message"
    HELP_RINGING = "help_ringing"
    HELP_CONNECTED = "help_connected"
    GOODBYE = "goodbye"
    ENDED = "ended"


HELP_STATES = (State.HELP_MESSAGE, State.HELP_RINGING, State.HELP_CONNECTED)
WAITING_STATES = (State.CHOICE, State.WAITING)  # the choice is part of the wait
PAIRED_STATES = (State.CONNECTING, State.TALKING)  # with a partner: its connect prompts, then the conversation


class Parting(enum.Enum):
    """Why a conversation ended for the one who did not end it."""

    HUNG_UP = "hung_up"
    SKIPPED = "skipped"
    TIME_UP = "time_up"
    REPORTED = "reported"  # told only that the other has left
    STEPPED_AWAY = "stepped_away"  # the other went to the help line
    DROPPED = "dropped"  # the other's audio stopped: its phone or its line seems gone


class HangUpReason(enum.Enum):
    MAX_WAIT = "max_wait"
    TALK_TIME_OVER = "talk_time_over"
    OVER_RATE = "over_rate"
    WITHHELD_REFUSED = "withheld_refused"
    HELP_CALL_ENDED = "help_call_ended"


class Statistic(enum.Enum):
    """Anonymous counts per line: no call, no partner."""

    WAIT_PAIRED = "wait_paired"  # with the seconds waited
    WAIT_ABANDONED = "wait_abandoned"  # hung up while waiting, with the seconds waited
    MAX_WAIT_GOODBYE = "max_wait_goodbye"
    SKIP = "skip"
    TALK_LIMIT_ENDING = "talk_limit_ending"  # one per conversation
    PREFERENCE_MATCH = "preference_match"  # a talker paired with a listener
    HELP_REQUEST = "help_request"  # the help key
    HELP_CONNECTED = "help_connected"
    HELP_FAILED = "help_failed"  # busy, no answer or failed
    REPORT = "report"
    COOLDOWN_STARTED = "cooldown_started"
    RATE_LIMITED = "rate_limited"  # a call over the per-caller rate


# Events
@dataclass(frozen=True)
class Answered:
    arrival: Arrival = Arrival.WELCOME  # what the safety ledger said of the caller
    held_apart_until: float | None = None  # with Arrival.HELD_APART


@dataclass(frozen=True)
class Digit:
    key: str


@dataclass(frozen=True)
class PromptFinished:
    """The last `PlayPrompts` ended: played, or unplayable, or played to a held leg (one replaced never finishes)."""


@dataclass(frozen=True)
class PartnerFound:
    partner: str


@dataclass(frozen=True)
class PartnerReady:
    """The partner has heard its connect prompts."""


@dataclass(frozen=True)
class Parted:
    reason: Parting
    held_apart_until: float | None = None  # this caller's report count just started a cooldown


@dataclass(frozen=True)
class Held:
    """The caller put the line on hold (it sends and hears nothing)."""

    held: bool  # False: resumed


@dataclass(frozen=True)
class Silent:
    """The caller's audio stopped for a while without a hold (`silent`), or came back."""

    silent: bool


@dataclass(frozen=True)
class PartnerHeld:
    held: bool  # False: resumed


@dataclass(frozen=True)
class TimerDue:
    pass


@dataclass(frozen=True)
class HungUp:
    pass


@dataclass(frozen=True)
class HelpAnswered:
    """The help call (`CallHelp`) was answered."""


@dataclass(frozen=True)
class HelpFailed:
    """The help call was busy, not answered in time, or failed."""


@dataclass(frozen=True)
class HelpEnded:
    """The answered help call is over."""


Event = (
    Answered | Digit | PromptFinished | PartnerFound | PartnerReady | Parted | Held | Silent | PartnerHeld | TimerDue
    | HungUp | HelpAnswered | HelpFailed | HelpEnded
)  # fmt: skip


# Actions for the call
@dataclass(frozen=True)
class PlayPrompts:
    """Play these prompts one after another, replacing any prompt playing, mixed over what the caller hears."""

    prompts: tuple[str, ...]


@dataclass(frozen=True)
class PlayMusic:
    """Hear hold music (no partner)."""


@dataclass(frozen=True)
class Silence:
    """Hear nothing but prompts (no partner, no music)."""


@dataclass(frozen=True)
class Bridge:
    """Hear the partner."""

    partner: str


@dataclass(frozen=True)
class HangUp:
    reason: HangUpReason


@dataclass(frozen=True)
class PlayRingback:
    """Hear a ringing tone (no partner, no music): `frequencies` together, `on` seconds of every `period`."""

    frequencies: tuple[float, ...] = (425.0,)  # ITU-T E.180's most common ringing tone
    on: float = 1.0
    period: float = 5.0


@dataclass(frozen=True)
class CallHelp:
    """Place the line's help call (an outbound call, or a REFER where the line says so)."""


@dataclass(frozen=True)
class EndHelpCall:
    """Cancel or end the help call, whatever its outcome: the caller no longer waits for it."""


@dataclass(frozen=True)
class BridgeExternal:
    """Hear the help call, and be heard by it."""


# Actions for the line
@dataclass(frozen=True)
class PartWays:
    partner: str
    reason: Parting


@dataclass(frozen=True)
class HoldNews:
    partner: str
    held: bool


@dataclass(frozen=True)
class ReadyToTalk:
    partner: str


@dataclass(frozen=True)
class Report:
    """The caller reported its partner: the line tells the safety ledger and the partner."""

    partner: str


@dataclass(frozen=True)
class Count:
    statistic: Statistic
    seconds: float | None = None


Action = (
    PlayPrompts | PlayMusic | Silence | Bridge | HangUp | PartWays | HoldNews | ReadyToTalk | Count
    | PlayRingback | CallHelp | EndHelpCall | BridgeExternal | Report
)  # fmt: skip


@dataclass(frozen=True)
class CallSummary:
    """A finished call's anonymous figures: no identity, no partner."""

    waited: float
    talked: float
    partners: int


@dataclass(frozen=True)
class LineFacts:
    """What the journey is told of its line: how many other callers are on it, and when it is busiest."""

    others: int
    busiest_hours: tuple[int, int] | None = None  # (from, to), hours of the day
    help_line: bool = False  # the help key can connect to a help destination


def key_prompt(key: str) -> str:
    """How a key is spoken: its number, "star" or "hash"."""
    return {"*": "key_star", "#": "key_hash"}.get(key, f"number_{key}")


def busiest_prompts(hours: tuple[int, int] | None) -> tuple[str, ...]:
    """ "The line is usually busiest between seven and ten at night": a bare number, then a full hour."""
    if hours is None:
        return ()
    start, end = hours
    return ("busiest_between", f"number_{start % 12 or 12}", "and", f"hour_{end}")


def keys_prompts(keys: KeyMap) -> tuple[str, ...]:
    """The key map, as the welcome and the keys-again key speak it."""
    spoken = (
        ("key_someone_else", keys.someone_else),
        ("key_talk", keys.talk),
        ("key_listen", keys.listen),
        ("key_keys_again", keys.keys_again),
        ("key_help", keys.help),
        ("key_report", keys.report),
    )
    prompts: list[str] = ["keys_intro"]
    for intro, key in spoken:
        if key is not None:
            prompts += (intro, key_prompt(key))
    return (*prompts, "hang_up_to_leave")


class Journey:
    """One caller's journey; see the module's description of the states."""

    def __init__(self, settings: JourneySettings, end_choice_spread: float = 0.0) -> None:
        """`end_choice_spread`: seconds added to this caller's `end_choice_wait`, so that two partners
        who both let the choice pass are not hung up in the same instant (which would link them)."""
        self.settings = settings
        self._end_choice_spread = end_choice_spread
        self.state = State.WELCOME
        self._since = 0.0  # when the state began
        self._waited = self._talked = 0.0
        self._partners = 0
        self.partner: str | None = None
        self.preference = Preference.EITHER
        self.held = False
        self.silent = False  # its audio stopped (`Silent`): never in the pool meanwhile
        self._offered = False  # to the pool, once what the caller was told has been heard
        self._wait_started = 0.0
        self._next_reassurance = 0.0
        self._told_quiet = False  # once per wait
        self._reassured = 0  # phrasings alternate over the whole call
        self._cue_heard = self._partner_ready = self._partner_held = False
        self._talk_started = 0.0
        self._warned = False
        self._choice_until: float | None = None
        self._hang_up_reason = HangUpReason.MAX_WAIT
        self._held_apart_until: float | None = None

    @property
    def summary(self) -> CallSummary:
        """Time waiting and talking so far (the current state counted once it is left)."""
        return CallSummary(self._waited, self._talked, self._partners)

    @property
    def waiting_since(self) -> float | None:
        """When its current wait began (the choice counts as waiting); None when not waiting."""
        return self._wait_started if self.state in WAITING_STATES else None

    @property
    def seeking(self) -> bool:
        """In the pool: waiting, told what it had to hear, not on hold and not silent."""
        return self._offered and not self.held and not self.silent

    @property
    def deadline(self) -> float | None:
        """When the journey next needs a `TimerDue` (None: not before something else happens)."""
        if self.state is State.WAITING:
            return min(self._next_reassurance, self._wait_started + self.settings.max_wait)
        if self.state is State.TALKING and self.settings.max_talk is not None:
            end = self._talk_started + self.settings.max_talk
            return end if self._warned else end - self.settings.warn_before
        if self.state is State.END_CHOICE:
            return self._choice_until
        if self.state is State.COOLDOWN:
            assert self._held_apart_until is not None
            return min(self._held_apart_until, self._wait_started + self.settings.max_wait)
        return None

    def handle(self, event: Event, now: float, line: LineFacts) -> list[Action]:
        """What the caller must hear or do after `event`, in order; an ended journey ignores everything."""
        if self.state is State.ENDED:
            return []
        if isinstance(event, HungUp):
            return self._hung_up(now)
        if isinstance(event, Digit):
            return self._digit(event.key, now, line)
        if isinstance(event, Held):
            return self._hold(event.held)
        if isinstance(event, PartnerHeld):
            return self._partner_hold(event.held)
        if isinstance(event, Silent):
            return self._silence(event.silent, now)
        if isinstance(event, Parted):
            return self._partner_gone(event, now, line) if self.state in PAIRED_STATES else []
        match self.state:
            case State.WELCOME:
                return self._welcome(event, now)
            case State.CHOICE:
                return self._wait(now, ()) if isinstance(event, PromptFinished) else []
            case State.WAITING:
                return self._waiting(event, now, line)
            case State.CONNECTING:
                return self._connecting(event, now)
            case State.TALKING:
                return self._talking(event, now)
            case State.END_CHOICE:
                return self._end_choice(event, now)
            case State.GOODBYE:
                return self._goodbye(event, now)
            case State.COOLDOWN:
                return self._cooldown(event, now, line)
            case State.HELP_MESSAGE | State.HELP_RINGING | State.HELP_CONNECTED:
                return self._help(event, now)
        return []

    # One method per state for everything but keys, hold, silence, partings and hanging up.
    def _welcome(self, event: Event, now: float) -> list[Action]:
        if isinstance(event, Answered):
            if event.arrival is Arrival.OVER_RATE:
                return [Count(Statistic.RATE_LIMITED), *self._say_goodbye(("rate_limited", "goodbye"), HangUpReason.OVER_RATE, now)]
            if event.arrival is Arrival.WITHHELD_REFUSED:
                return self._say_goodbye(("withheld_refused", "goodbye"), HangUpReason.WITHHELD_REFUSED, now)
            if event.arrival is Arrival.HELD_APART and event.held_apart_until is not None:
                self._held_apart_until = event.held_apart_until
            if self.settings.welcome:
                return [Silence(), PlayPrompts(("welcome", "skip_welcome_hint", *keys_prompts(self.settings.keys)))]
            return self._offer_choice(now)
        if isinstance(event, PromptFinished):
            return self._offer_choice(now)
        return []

    def _waiting(self, event: Event, now: float, line: LineFacts) -> list[Action]:
        if isinstance(event, PromptFinished):
            self._offered = True
        elif isinstance(event, PartnerFound):
            self._offered = False
            self._enter(State.CONNECTING, now)
            self.partner = event.partner
            self._partners += 1
            self._cue_heard = self._partner_ready = self._partner_held = False
            return [
                Count(Statistic.WAIT_PAIRED, now - self._wait_started),
                Silence(),
                PlayPrompts((CONNECT_CUE, "connected")),
            ]
        elif isinstance(event, TimerDue):
            if now >= self._wait_started + self.settings.max_wait:
                self._offered = False
                if self.held:  # it would hear no goodbye
                    self._enter(State.ENDED, now)
                    return [Count(Statistic.MAX_WAIT_GOODBYE), HangUp(HangUpReason.MAX_WAIT)]
                return [
                    Count(Statistic.MAX_WAIT_GOODBYE),
                    *self._say_goodbye(
                        ("max_wait_goodbye", *busiest_prompts(line.busiest_hours), "goodbye"), HangUpReason.MAX_WAIT, now
                    ),
                ]
            if now >= self._next_reassurance:
                self._next_reassurance = now + self.settings.reassure_every
                return [] if self.held else [PlayPrompts(self._reassurance(line))]
        return []

    def _connecting(self, event: Event, now: float) -> list[Action]:
        assert self.partner is not None
        if isinstance(event, PromptFinished):
            self._cue_heard = True
            actions: list[Action] = [ReadyToTalk(self.partner)]
            return actions + self._talk(now) if self._partner_ready else actions
        if isinstance(event, PartnerReady):
            self._partner_ready = True
            return self._talk(now) if self._cue_heard else []
        return []

    def _talking(self, event: Event, now: float) -> list[Action]:
        if isinstance(event, TimerDue) and self.settings.max_talk is not None:
            if now >= self._talk_started + self.settings.max_talk:
                assert self.partner is not None
                partner = self.partner
                return [Count(Statistic.TALK_LIMIT_ENDING), PartWays(partner, Parting.TIME_UP), *self._end_of_talk(now)]
            if not self._warned:
                self._warned = True
                return [PlayPrompts(("talk_time_warning",))]
        return []

    def _end_choice(self, event: Event, now: float) -> list[Action]:
        if isinstance(event, PromptFinished) and self._choice_until is None:
            self._choice_until = now + self.settings.end_choice_wait + self._end_choice_spread
        elif isinstance(event, TimerDue) and self._choice_until is not None and now >= self._choice_until:
            return self._say_goodbye(("goodbye",), HangUpReason.TALK_TIME_OVER, now)
        return []

    def _goodbye(self, event: Event, now: float) -> list[Action]:
        if isinstance(event, PromptFinished):
            self._enter(State.ENDED, now)
            return [HangUp(self._hang_up_reason)]
        return []

    # Transitions
    def _offer_choice(self, now: float) -> list[Action]:
        keys = self.settings.keys
        if not self.settings.offer_choice or keys.talk is None or keys.listen is None:
            return self._wait(now, ())
        self._enter(State.CHOICE, now)
        self._wait_started = now
        choice = ("key_talk", key_prompt(keys.talk), "key_listen", key_prompt(keys.listen), "preference_or_wait")
        return [PlayMusic(), PlayPrompts(choice)]

    def _say_goodbye(self, prompts: tuple[str, ...], reason: HangUpReason, now: float) -> list[Action]:
        self._enter(State.GOODBYE, now)
        self.partner, self._hang_up_reason = None, reason
        return [Silence(), PlayPrompts(prompts)]

    def _wait(self, now: float, told: tuple[str, ...]) -> list[Action]:
        """Wait with music after being `told` something; offered to the pool once it has been heard.

        A caller held apart waits in the cooldown instead, told so (and never offered)."""
        if self._held_apart_until is not None and now < self._held_apart_until:
            return self._hold_apart(now, told)
        # The choice is already part of the wait, with music.
        actions: list[Action] = [] if self.state is State.CHOICE else [PlayMusic()]
        if self.state is not State.CHOICE:
            self._wait_started = now
        self._enter(State.WAITING, now)
        self.partner = None
        self._next_reassurance = now + self.settings.reassure_every
        self._told_quiet = False
        self._offered = not told
        return [*actions, PlayPrompts(told)] if told else actions

    def _talk(self, now: float) -> list[Action]:
        self._enter(State.TALKING, now)
        self._talk_started, self._warned = now, False
        return self._hear_partner()

    def _enter(self, state: State, now: float) -> None:
        if self.state in WAITING_STATES:
            self._waited += now - self._since
        elif self.state is State.TALKING:
            self._talked += now - self._since
        self.state, self._since = state, now

    def _hear_partner(self) -> list[Action]:
        assert self.partner is not None
        return [PlayMusic(), PlayPrompts(("stepped_away",))] if self._partner_held else [Bridge(self.partner)]

    def _hold(self, held: bool) -> list[Action]:
        if held is self.held or self.state is State.ENDED:
            return []
        self.held = held
        if self.partner is None:
            if not held and self.state is State.WAITING:
                self._offered = True  # back in the pool, whatever it was told before the hold
            return []
        news: list[Action] = [HoldNews(self.partner, held)]
        return news + self._hear_partner() if not held and self.state is State.TALKING else news

    def _silence(self, silent: bool, now: float) -> list[Action]:
        """Silent while connected or talking: the two part, each told the line seems to have dropped."""
        if silent is self.silent:
            return []
        self.silent = silent
        if silent and self.state in PAIRED_STATES:
            return self._leave_partner(Parting.DROPPED, now, ("line_dropped",))
        return []

    def _partner_hold(self, held: bool) -> list[Action]:
        if self.partner is None:
            return []
        self._partner_held = held
        return self._hear_partner() if self.state is State.TALKING and not self.held else []  # else set on resume

    def _leave_partner(self, reason: Parting, now: float, told: tuple[str, ...]) -> list[Action]:
        """This caller ends the conversation: the partner is told `reason`, and this caller waits again, `told`."""
        assert self.partner is not None
        partner = self.partner
        return [PartWays(partner, reason), *self._wait(now, told)]

    def _partner_gone(self, parted: Parted, now: float, line: LineFacts) -> list[Action]:
        if parted.reason is Parting.TIME_UP:
            return self._end_of_talk(now)
        if parted.held_apart_until is not None:
            self._held_apart_until = parted.held_apart_until
            return self._hold_apart(now, ("partner_left",))
        if parted.reason is Parting.STEPPED_AWAY:
            return self._wait(now, ("stepped_away", "looking_again", *self._nobody_else(line)))
        if parted.reason is Parting.DROPPED:
            return self._wait(now, ("line_dropped", *self._nobody_else(line)))
        return self._wait(now, ("partner_left", *self._nobody_else(line)))

    def _hold_apart(self, now: float, told: tuple[str, ...]) -> list[Action]:
        """The cooldown: a neutral word and music, never in the pool; may hang up."""
        if self.state not in WAITING_STATES:
            self._wait_started = now
        self._enter(State.COOLDOWN, now)
        self.partner, self._offered = None, False
        return [PlayMusic(), PlayPrompts((*told, "cooldown"))]

    def _cooldown(self, event: Event, now: float, line: LineFacts) -> list[Action]:
        if not isinstance(event, TimerDue):
            return []
        assert self._held_apart_until is not None
        if now >= self._held_apart_until:
            self._held_apart_until = None
            return self._wait(now, ())
        if now >= self._wait_started + self.settings.max_wait:
            return self._say_goodbye(("max_wait_goodbye", "goodbye"), HangUpReason.MAX_WAIT, now)
        return []

    # Help
    def _ask_for_help(self, now: float, line: LineFacts) -> list[Action]:
        """The help key: the safety message; with a help line, the caller leaves any partner and is connected."""
        counted: list[Action] = [Count(Statistic.HELP_REQUEST)]
        if not line.help_line:
            return [*counted, PlayPrompts(("help_message",))]
        if self.partner is not None:
            counted.append(PartWays(self.partner, Parting.STEPPED_AWAY))
        self._enter(State.HELP_MESSAGE, now)
        self.partner, self._offered = None, False
        return [*counted, Silence(), PlayPrompts(("help_message", "help_connecting"))]

    def _help(self, event: Event, now: float) -> list[Action]:
        if self.state is State.HELP_MESSAGE and isinstance(event, PromptFinished):
            self._enter(State.HELP_RINGING, now)
            return [CallHelp(), PlayRingback()]
        if self.state is State.HELP_RINGING and isinstance(event, HelpAnswered):
            self._enter(State.HELP_CONNECTED, now)
            return [Count(Statistic.HELP_CONNECTED), BridgeExternal()]
        if self.state is State.HELP_RINGING and isinstance(event, HelpFailed):
            return [Count(Statistic.HELP_FAILED), *self._wait(now, ("help_unreachable",))]
        if self.state is State.HELP_CONNECTED and isinstance(event, HelpEnded):
            return self._say_goodbye(("help_call_ended", "goodbye"), HangUpReason.HELP_CALL_ENDED, now)
        return []

    def _cancel_help(self, now: float) -> list[Action]:
        placed = [EndHelpCall()] if self.state is State.HELP_RINGING else []
        return [*placed, *self._wait(now, ("help_cancelled",))]

    def _end_of_talk(self, now: float) -> list[Action]:
        self._enter(State.END_CHOICE, now)
        self.partner, self._choice_until = None, None
        key = self.settings.keys.someone_else
        if key is None:
            return self._say_goodbye(("talk_time_over", "goodbye"), HangUpReason.TALK_TIME_OVER, now)
        choice = ("talk_time_over", "end_of_talk_choice", key_prompt(key), "end_of_talk_or_hang_up")
        return [Silence(), PlayPrompts(choice)]

    def _nobody_else(self, line: LineFacts) -> tuple[str, ...]:
        """After a parting: whether anyone but the two of them is on the line."""
        return ("nobody_else_here",) if line.others <= 1 else ()

    def _reassurance(self, line: LineFacts) -> tuple[str, ...]:
        if line.others == 0 and not self._told_quiet:
            self._told_quiet = True
            return ("quiet_line", *busiest_prompts(line.busiest_hours))
        phrasing = REASSURANCES[self._reassured % len(REASSURANCES)]
        self._reassured += 1
        return (phrasing,)

    def _digit(self, key: str, now: float, line: LineFacts) -> list[Action]:
        keys = self.settings.keys
        if self.state is State.HELP_CONNECTED:
            return []  # the help line's to hear
        if key == keys.help and self.state in (State.HELP_MESSAGE, State.HELP_RINGING):
            return self._cancel_help(now)
        if key == keys.help and self.state is not State.GOODBYE:
            if self.state is not State.CONNECTING or line.help_line:  # the message alone would cut the connect cue
                return self._ask_for_help(now, line)
        if self.state in HELP_STATES:
            return []
        if self.state is State.WELCOME:  # any other key skips the welcome; a preference key also chooses
            if key in (keys.talk, keys.listen):
                return self._choose(key, now)
            actions = self._offer_choice(now)
            if any(isinstance(action, PlayPrompts) for action in actions):
                return actions  # the choice replaces the welcome
            return [*actions, PlayPrompts(())]  # nothing to say: the welcome just stops
        if key == keys.report and self.state in PAIRED_STATES:
            assert self.partner is not None
            partner = self.partner
            return [Count(Statistic.REPORT), Report(partner), *self._wait(now, ("report_thanks",))]
        if key == keys.keys_again and self.state not in (State.CONNECTING, State.GOODBYE):
            return [PlayPrompts(keys_prompts(keys))]
        if key in (keys.talk, keys.listen) and self.state in WAITING_STATES:
            return self._choose(key, now)
        if key == keys.someone_else:
            if self.state in PAIRED_STATES:
                told = ("looking_for_someone_new", *self._nobody_else(line))
                return [Count(Statistic.SKIP), *self._leave_partner(Parting.SKIPPED, now, told)]
            if self.state is State.END_CHOICE:
                return self._wait(now, ("looking_for_someone_new",))
        return []  # other keys mean nothing here

    def _choose(self, key: str, now: float) -> list[Action]:
        talk = key == self.settings.keys.talk
        self.preference = Preference.TALK if talk else Preference.LISTEN
        acknowledgement = ("preference_talk",) if talk else ("preference_listen",)
        if self.state is State.WAITING:
            return [PlayPrompts(acknowledgement)]  # still in the pool, with the new preference
        return self._wait(now, acknowledgement)

    def _hung_up(self, now: float) -> list[Action]:
        state, partner = self.state, self.partner
        self._enter(State.ENDED, now)
        self.partner, self._offered = None, False
        if state in WAITING_STATES:
            return [Count(Statistic.WAIT_ABANDONED, now - self._wait_started)]
        if partner is not None:
            return [PartWays(partner, Parting.HUNG_UP)]
        if state in (State.HELP_RINGING, State.HELP_CONNECTED):
            return [EndHelpCall()]
        return []
