"""Which relays the kernel forwards, and the hand-over between it and the userspace path.

A source leg's stream is forwarded in the kernel while it has one listener
that relays it as is (same codec, no prompt, no hold, sending allowed), the
source has latched a peer and its SSRC, does not decode (no in-band DTMF
watch, no listener wanting PCM), and neither leg is SRTP. Before anything
changes what either leg of a route hears or where it sends (`changing`), the
route is stopped and its final state folded back into the Python objects: the
listener's outbound stream continues from the kernel's newest packet and
offsets, the source's receiver counts what the kernel forwarded. After the
change the route is reviewed and, when still eligible, installed again from
the stream's current position, so sequence numbers and timestamps stay exact
across every hand-over and partner change.

A packet the kernel leaves to the socket while it forwards (another source,
a telephone-event, an extended header, a new SSRC) stops the route before the
receiver sees it (`takeover`), so the latch rules judge it on current counts
and a relayed one continues the stream; the route is reviewed on the next
loop iteration, after that packet's relay. A route starts only once its
source's socket is empty: packets that came while it was stopped are read
there first, else each would stop it again. Each packet is therefore either
forwarded by the kernel or handled by the socket's path, never both: the
kernel stops forwarding a route before its state is read (see forwarding.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address
from typing import Protocol

from voiceline.audio.bridge import Bridge
from voiceline.audio.kernel.bpf import BpfError
from voiceline.audio.kernel.forwarding import (
    KernelPath,
    RewriteState,
    Route,
    is_local,
    loop_time_from,
    monotonic_ns_from,
    source_for,
)
from voiceline.audio.latch import Address
from voiceline.audio.receiver import Receiver
from voiceline.audio.rtp import StreamPosition
from voiceline.audio.sender import Sender

DRAIN_PACKETS = 64  # read from one socket per loop iteration before its route starts


class RoutedLeg(Protocol):
    """What the kernel routes need of a media leg."""

    receiver: Receiver
    sender: Sender
    local_port: int

    @property
    def encrypted(self) -> bool: ...

    @property
    def queued(self) -> bool:
        """Whether packets wait in this leg's RTP socket, not yet read."""

    def read_queued(self, limit: int) -> None:
        """Read up to `limit` of the packets waiting in the RTP socket, as the loop would."""

    def kernel_forwarding(self, forwarding: bool) -> None:
        """The kernel forwards (True) or stopped forwarding (False) what this leg receives."""


def _is_ipv4(address: Address | None) -> bool:
    if address is None:
        return False
    try:
        IPv4Address(address[0])
    except ValueError:
        return False
    return True


class KernelRoutes:
    """The routes of one media engine. With no `path` (the kernel path is off or unavailable)
    every method does nothing and the userspace path relays everything."""

    def __init__(self, path: KernelPath | None, bridge: Bridge, bind_host: str, loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self._bridge = bridge
        self._bind_host = bind_host
        self._loop = loop
        self._by_receiver: dict[Receiver, RoutedLeg] = {}
        self._by_sender: dict[Sender, RoutedLeg] = {}
        self._routed: dict[RoutedLeg, RoutedLeg] = {}  # source -> its listener, while the kernel forwards
        self._draining: set[RoutedLeg] = set()  # sources whose route starts once their socket is read empty
        self.install_failures = 0
        if path is not None and path.link_events is not None:
            loop.add_reader(path.link_events, path.interfaces_changed)

    @property
    def forwarding(self) -> int:
        """How many routes the kernel forwards now."""
        return len(self._routed)

    def add(self, leg: RoutedLeg) -> None:
        if self.path is not None:
            self._by_receiver[leg.receiver] = leg
            self._by_sender[leg.sender] = leg

    def remove(self, leg: RoutedLeg) -> None:
        """A leg closes: the routes from and to it stop first."""
        if self.path is None or leg.receiver not in self._by_receiver:
            return
        for source in self._touching(leg):
            self._stop(source)
        del self._by_receiver[leg.receiver], self._by_sender[leg.sender]

    @contextmanager
    def changing(self, *legs: RoutedLeg) -> Iterator[None]:
        """Around a change of what `legs` hear or where they send: their routes stop before it and
        are reviewed after it."""
        if self.path is None:
            yield
            return
        before = {source for leg in legs for source in self._touching(leg)}
        for source in before:
            self._stop(source)
        try:
            yield
        finally:
            for source in before | {source for leg in legs for source in self._touching(leg)}:
                self._review(source)

    def reroute(self, leg: RoutedLeg) -> None:
        """Fold what the kernel did for `leg` so far into its objects, and go on."""
        with self.changing(leg):
            pass

    def takeover(self, leg: RoutedLeg) -> None:
        """The socket got a packet for `leg` while the kernel forwards its stream: the userspace
        path takes over now (also the route to `leg`, whose peer the packet may move), and the
        routes are reviewed once this packet is handled."""
        for source in self._touching(leg):
            self._stop(source)
        self.review_soon(leg)

    def review_soon(self, leg: RoutedLeg) -> None:
        """Review `leg`'s routes on the next loop iteration (from the packet path, whose packet must
        be relayed before a route starts)."""
        if self.path is not None:
            self._loop.call_soon(self._review_touching, leg)

    def forwarded_from(self, leg: RoutedLeg) -> RewriteState | None:
        """What the kernel has forwarded of `leg`'s stream since its route started, if it has one."""
        if self.path is None or leg not in self._routed:
            return None
        return self.path.peek(self._local(leg))

    def forwarded_to(self, leg: RoutedLeg) -> RewriteState | None:
        """What the kernel has sent to `leg`'s peer since the route into it started, if there is one."""
        source = self._source(leg)
        if source is None or self._routed.get(source) is not leg:
            return None
        return self.forwarded_from(source)

    def close(self) -> None:
        """Stop every route and detach the program."""
        if self.path is None:
            return
        for source in list(self._routed):
            self._stop(source)
        if self.path.link_events is not None:
            self._loop.remove_reader(self.path.link_events)
        self.path.close()

    # -- the routes -------------------------------------------------------------

    def _local(self, leg: RoutedLeg) -> Address:
        return (self._bind_host, leg.local_port)

    def _sender(self, leg: RoutedLeg, destination: Address) -> Address | None:
        """Where `leg`'s packets to `destination` leave from: its socket's address, or for a socket
        bound to 0.0.0.0 the one the kernel's routing gives it (None: no route there now)."""
        if IPv4Address(self._bind_host).is_unspecified:
            try:
                return (source_for(destination), leg.local_port)
            except OSError:
                return None
        return self._local(leg)

    def _source(self, leg: RoutedLeg) -> RoutedLeg | None:
        source = self._bridge.source(leg.sender)
        return None if source is None else self._by_receiver.get(source)

    def _touching(self, leg: RoutedLeg) -> list[RoutedLeg]:
        """The routes from `leg` and to it, by their sources."""
        source = self._source(leg)
        return [leg] if source is None else [leg, source]

    def _review_touching(self, leg: RoutedLeg) -> None:
        if leg.receiver in self._by_receiver:
            for source in self._touching(leg):
                self._review(source)

    def _listener(self, source: RoutedLeg) -> RoutedLeg | None:
        """Who the kernel may forward `source` to, or None."""
        receiver, peer = source.receiver, source.receiver.peer
        if source.encrypted or receiver.decoding or receiver.reception.ssrc is None or peer is None or not _is_ipv4(peer):
            return None
        listeners = self._bridge.listeners(receiver)
        if len(listeners) != 1:
            return None
        listener = self._by_sender.get(listeners[0])
        if listener is None or listener.encrypted or not listener.sender.relays_as_is:
            return None
        destination = listener.sender.remote
        if destination is None or not _is_ipv4(destination):
            return None
        assert self.path is not None
        if not self.path.loopback_only and is_local(destination[0]) and not is_local(peer[0]):
            return None  # from another interface up the stack: a martian source (see the C source)
        return listener

    def _review(self, source: RoutedLeg) -> None:
        """Stop `source`'s route if it runs, and start it again when it may run."""
        assert self.path is not None
        self._stop(source)
        if source.receiver not in self._by_receiver:
            return
        listener = self._listener(source)
        if listener is None:
            return
        if source.queued:
            # Packets that came before the route would start still wait in the socket: read while
            # the kernel forwards, each would take the relay back (`takeover`), and on a loaded
            # server, where every socket has some waiting, the relay would never leave userspace
            # again. They are read first (`_drained`), then the route starts.
            if source not in self._draining:
                self._draining.add(source)
                self._loop.call_soon(self._drained, source)
            return
        receiver, sender = source.receiver, listener.sender
        assert receiver.peer is not None and receiver.reception.ssrc is not None and sender.remote is not None
        leaves_from = self._sender(listener, sender.remote)
        if leaves_from is None:
            return
        stream = sender.stream
        position = stream.position()
        now = self._loop.time()
        route = Route(
            local=self._local(source),
            peer=receiver.peer,
            peer_ssrc=receiver.reception.ssrc,
            in_payload_type=receiver.audio_payload_type,
            sender=leaves_from,
            destination=sender.remote,
            out_payload_type=sender.audio_payload_type,
            ssrc=stream.ssrc,
            clock_rate=sender.codec.clock_rate,
            frame_samples=sender.codec.clock_rate // 50,  # as the stream counts a frame
        )
        state = RewriteState(
            changed=position.changed,
            sent_ns=0 if position.sent_at is None else monotonic_ns_from(position.sent_at, now),
            newest_sequence=position.sequence,
            newest_timestamp=position.timestamp,
            sequence_shift=position.sequence_shift,
            timestamp_shift=position.timestamp_shift,
            source_max=receiver.reception.highest_sequence,
            jitter16=round(receiver.reception.jitter_ticks * 16),
        )
        try:
            self.path.install(route, state)
        except BpfError:
            self.install_failures += 1  # the userspace path relays it, as without the kernel path
            return
        self._routed[source] = listener
        source.kernel_forwarding(True)

    def _drained(self, source: RoutedLeg) -> None:
        """From the loop, as a socket's reader runs: read what waits in `source`'s socket, then
        start its route if it may run and nothing came meanwhile (else again next iteration)."""
        self._draining.discard(source)
        if source in self._routed or source.receiver not in self._by_receiver:
            return
        source.read_queued(DRAIN_PACKETS)
        if source.receiver in self._by_receiver:  # a packet read may have closed the leg
            self._review(source)

    def _stop(self, source: RoutedLeg) -> None:
        """Stop `source`'s route, if it runs, and fold its final state into both legs."""
        listener = self._routed.pop(source, None)
        if listener is None:
            return
        assert self.path is not None
        source.kernel_forwarding(False)
        state = self.path.stop(self._local(source))
        if state.packets == 0:
            return
        now = self._loop.time()
        source.receiver.forwarded(
            state.packets, loop_time_from(state.last_ns, now), state.source_max, state.source_cycles, state.jitter16 / 16
        )
        position = StreamPosition(
            False,
            loop_time_from(state.sent_ns, now),
            state.newest_sequence,
            state.newest_timestamp,
            state.sequence_shift,
            state.timestamp_shift,
        )
        listener.sender.stream.resume(position, state.packets, state.octets)
