"""The in-kernel fast path's control plane: our TC program on the interfaces and its forwarding entries.

Each `KernelPath` loads its own copy of rtp_forward.bpf.o (its own maps) and
attaches it to the TC ingress of the interfaces media can arrive on, at a
fixed priority with a handle of its own (the process id and a per-process
count), so several processes coexist: a lookup miss returns TC_ACT_UNSPEC and
the next filter or the socket decides. Media bound to a loopback address
arrives on `lo` alone. Media bound to another address, or to 0.0.0.0, can
arrive on any interface (Linux accepts a datagram for a local address on
every interface, and a caller's route may come in on any of them), so the
program goes on every interface of the network namespace, `lo` included, and
on each one that appears later (`refresh_interfaces`, on link events); a
lookup miss costs the other traffic a few loads. Beyond loopback the program
asks the kernel's FIB where the rewritten packet goes, which bpf_fib_lookup
answers only with forwarding on for `lo` (net.ipv4.conf.lo.forwarding=1,
which changes nothing else: `lo` carries only this host's own packets).

At start a filter left by a process that no longer runs is removed (its
entries could otherwise take ports a new process binds); `close` removes
ours from every interface, and the maps go with the last reference to them.

A route forwards what one leg receives from its latched peer to the one leg
that hears it. `install` writes the rewrite state (taken from the listener's
outbound stream) and the route, then enables it; `stop` disables it and reads
the final state under the entry's lock: from then on nothing is forwarded, and
every packet the kernel forwarded is in that state (see the C source).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from voiceline.audio.kernel.bpf import (
    BPF_F_LOCK,
    BpfError,
    BpfObject,
    attach_ingress,
    detach_ingress,
    possible_cpus,
)
from voiceline.audio.latch import Address

OBJECT_PATH = Path(__file__).with_name("rtp_forward.bpf.o")
PROGRAM = "voiceline_rtp"
PRIORITY = 22096  # every voiceline process's filters share it, told apart by handle
MAX_LEGS = 16384  # as in the C source
_HANDLE_PID_SHIFT = 10  # handle = pid << 10 | number of the path within the process

_ROUTE_KEY = struct.Struct("=4s2sxx")
_ROUTE = struct.Struct("=4s2sBBI4s4sHHIIII")
_LEG = struct.Struct("=IIQQQQIIIIIIIIII")
_ENABLED = struct.Struct("=I")
_SLOT = struct.Struct("=I")
_COUNT = struct.Struct("=Q")
FIB_CODES = 16  # as in the C source
LO_FORWARDING = Path("/proc/sys/net/ipv4/conf/lo/forwarding")
_NETLINK_ROUTE = 0
_RTMGRP_LINK = 1
_instances = itertools.count(1)


class KernelPathUnavailable(Exception):
    """The kernel path cannot run here; the message says why, in fixed words."""


@dataclass(frozen=True)
class Route:
    """What a source leg's packets become: where from and to, and the listening stream's identity."""

    local: Address  # the source leg's RTP socket (what the packets are sent to)
    peer: Address  # its latched peer: the only source forwarded
    peer_ssrc: int
    in_payload_type: int
    sender: Address  # the listening leg's RTP socket: the packets leave from it
    destination: Address  # the listening leg's peer
    out_payload_type: int
    ssrc: int  # the listening leg's stream
    clock_rate: int
    frame_samples: int


@dataclass(frozen=True)
class RewriteState:
    """A route's rewrite and reception state: what the listening stream sent last, the offsets,
    and what was forwarded (counts and the source's highest sequence number)."""

    changed: bool  # the next packet starts a new source (offsets fixed by it, marker set)
    sent_ns: int  # CLOCK_MONOTONIC of the newest packet sent; 0 when none was
    newest_sequence: int
    newest_timestamp: int
    sequence_shift: int
    timestamp_shift: int
    source_max: int  # the source's highest sequence number
    source_cycles: int = 0  # its wraps seen by the kernel
    jitter16: int = 0  # the source's interarrival jitter in its timestamp units, times 16
    packets: int = 0
    octets: int = 0
    last_ns: int = 0  # when the last forwarded packet arrived

    def pack(self) -> bytes:
        return _LEG.pack(
            0,
            int(self.changed),
            self.sent_ns,
            self.last_ns,
            self.packets,
            self.octets,
            self.sequence_shift,
            self.timestamp_shift,
            self.newest_sequence,
            self.newest_timestamp,
            self.source_max,
            self.source_cycles,
            self.jitter16,
            0,  # the kernel takes the transit time from its first packet
            0,
            0,
        )

    @classmethod
    def unpack(cls, data: bytes) -> RewriteState:
        (_, changed, sent_ns, last_ns, packets, octets, seq_shift, ts_shift, newest_seq, newest_ts, src_max, cycles, jitter16) = (
            _LEG.unpack(data)[:13]
        )
        return cls(
            bool(changed), sent_ns, newest_seq, newest_ts, seq_shift, ts_shift, src_max, cycles, jitter16, packets, octets, last_ns
        )


def monotonic_ns_from(loop_time: float, loop_now: float) -> int:
    """A loop time as CLOCK_MONOTONIC nanoseconds (the kernel's clock), by the loop's offset now."""
    return time.monotonic_ns() + round((loop_time - loop_now) * 1e9)


def loop_time_from(monotonic_ns: int, loop_now: float) -> float:
    return loop_now + (monotonic_ns - time.monotonic_ns()) / 1e9


def _ipv4(host: str) -> bytes:
    return IPv4Address(host).packed


def _port(port: int) -> bytes:
    return port.to_bytes(2, "big")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


def source_for(destination: Address) -> str:
    """The address this host sends from to `destination` (as a socket bound to 0.0.0.0 would)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(destination)  # a route lookup; nothing is sent
        host: str = probe.getsockname()[0]
        return host


def is_local(host: str) -> bool:
    """Whether `host` is an address of this host (a socket can bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
        return True


def remove_stale_filters(device: str) -> int:
    """Remove our filters on `device` whose process is gone; returns how many."""
    listing = subprocess.run(["tc", "-j", "filter", "show", "dev", device, "ingress"], capture_output=True, text=True)
    try:
        entries = json.loads(listing.stdout) if listing.returncode == 0 and listing.stdout.strip() else []
    except ValueError:
        entries = []
    removed = 0
    for entry in entries:
        options = entry.get("options", {})
        if entry.get("pref") != PRIORITY or options.get("prog", {}).get("name") != PROGRAM:
            continue
        handle = int(options["handle"], 16)
        if not _pid_alive(handle >> _HANDLE_PID_SHIFT):
            removed += detach_ingress(socket.if_nametoindex(device), PRIORITY, handle)
    return removed


class KernelPath:
    """Our program on the interfaces media arrives on, and its maps. Raises `KernelPathUnavailable`
    when it cannot run."""

    def __init__(self, bind_host: str) -> None:
        try:
            bind = IPv4Address(bind_host)
        except ValueError as exc:
            raise KernelPathUnavailable("the kernel path needs an IPv4 media address") from exc
        self.loopback_only = bind.is_loopback
        if not self.loopback_only and _read(LO_FORWARDING) != "1":
            raise KernelPathUnavailable("media beyond loopback needs sysctl net.ipv4.conf.lo.forwarding=1")
        if not OBJECT_PATH.is_file():
            raise KernelPathUnavailable("the BPF object is not built (make builds it with clang)")
        self.handle = os.getpid() << _HANDLE_PID_SHIFT | next(_instances) % (1 << _HANDLE_PID_SHIFT)
        self._free = list(range(MAX_LEGS - 1, -1, -1))
        self._slots: dict[Address, int] = {}  # route by its source leg's socket
        self.attached: set[int] = set()  # the interfaces (by index) our filter is on
        try:
            for _, name in self._interfaces():
                remove_stale_filters(name)
        except OSError as exc:
            raise KernelPathUnavailable("the kernel path needs tc (Debian iproute2)") from exc
        try:
            self._bpf = BpfObject(OBJECT_PATH)
        except BpfError as exc:
            raise KernelPathUnavailable(f"the kernel refused the BPF program ({_reason(exc)})") from exc
        self._link_events: socket.socket | None = None
        try:
            self._routes = self._bpf.map_fd("routes")
            self._legs = self._bpf.map_fd("legs")
            self._enabled = self._bpf.map_fd("enabled")
            self._fib_fallbacks = self._bpf.map_fd("fib_fallbacks")
            self._bpf.update(self._bpf.map_fd("bind"), _SLOT.pack(0), bind.packed)
            self._program = self._bpf.program_fd(PROGRAM)
            loopback = socket.if_nametoindex("lo")
            attach_ingress(loopback, self._program, PRIORITY, self.handle)
            self.attached.add(loopback)
        except BpfError as exc:
            self._bpf.close()
            raise KernelPathUnavailable(f"the kernel refused the TC filter ({_reason(exc)})") from exc
        self._closed = False
        if not self.loopback_only:
            # Subscribed before the first refresh, so no interface appears unseen in between.
            self._link_events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, _NETLINK_ROUTE)
            self._link_events.bind((0, _RTMGRP_LINK))
            self.refresh_interfaces()

    def _interfaces(self) -> list[tuple[int, str]]:
        return socket.if_nameindex() if not self.loopback_only else [(socket.if_nametoindex("lo"), "lo")]

    @property
    def link_events(self) -> socket.socket | None:
        """Readable when interfaces come or go (beyond loopback): then drain it and refresh."""
        return self._link_events

    def interfaces_changed(self) -> None:
        """The link event socket is readable: read what it holds and attach to new interfaces."""
        assert self._link_events is not None
        while True:
            try:
                self._link_events.recv(65536)
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: events were lost; the refresh below looks at everything
                break
        self.refresh_interfaces()

    def refresh_interfaces(self) -> None:
        """Attach to every interface we are not on yet; forget the ones that are gone (their
        filters went with them). An interface that refuses a filter is left to the socket's path."""
        if self._closed:
            return
        present = {index for index, _ in self._interfaces()}
        self.attached &= present
        for index in present - self.attached:
            try:
                attach_ingress(index, self._program, PRIORITY, self.handle)
            except BpfError:
                continue
            self.attached.add(index)

    def fib_fallbacks(self) -> dict[int, int]:
        """Packets of routes left to the socket because the FIB could not say where they go,
        by BPF_FIB_LKUP_RET_* code (0: the lookup failed outright)."""
        counts = {}
        for code in range(FIB_CODES):
            value = self._bpf.lookup(self._fib_fallbacks, _SLOT.pack(code), _COUNT.size * possible_cpus())
            total = sum(count for (count,) in _COUNT.iter_unpack(value))
            if total:
                counts[code] = total
        return counts

    def install(self, route: Route, state: RewriteState) -> None:
        """Forward `route` in the kernel from now on, continuing from `state`. A `BpfError` leaves
        nothing forwarding."""
        if route.local in self._slots:
            raise ValueError("a route from this socket is installed")
        if not self._free:
            raise BpfError("install", errno.ENOSPC)
        slot = self._free.pop()
        key = _SLOT.pack(slot)
        try:
            self._bpf.update(self._enabled, key, _ENABLED.pack(0))
            self._bpf.update(self._legs, key, state.pack(), BPF_F_LOCK)
            self._bpf.update(self._routes, _route_key(route.local), _pack_route(route, slot))
            self._bpf.update(self._enabled, key, _ENABLED.pack(1))
        except BpfError:
            self._bpf.update(self._enabled, key, _ENABLED.pack(0))
            with contextlib.suppress(BpfError):  # when the route was not written
                self._bpf.delete(self._routes, _route_key(route.local))
            self._free.append(slot)
            raise
        self._slots[route.local] = slot

    def stop(self, local: Address) -> RewriteState:
        """Stop forwarding to `local` in the kernel; the state it ended with."""
        slot = self._slots.pop(local)
        key = _SLOT.pack(slot)
        self._bpf.update(self._enabled, key, _ENABLED.pack(0))
        # The locked read waits out a packet inside its critical section; any later one sees 0.
        state = RewriteState.unpack(self._bpf.lookup(self._legs, key, _LEG.size, BPF_F_LOCK))
        self._bpf.delete(self._routes, _route_key(local))
        self._free.append(slot)
        return state

    def peek(self, local: Address) -> RewriteState:
        """The state of the route from `local` so far (it keeps forwarding)."""
        return RewriteState.unpack(self._bpf.lookup(self._legs, _SLOT.pack(self._slots[local]), _LEG.size, BPF_F_LOCK))

    def close(self) -> None:
        """Detach our filters and release the maps; forwarding stops at once."""
        if self._closed:
            return
        self._closed = True
        if self._link_events is not None:
            self._link_events.close()
        for index in self.attached:
            with contextlib.suppress(BpfError):  # the interface went meanwhile, and our filter with it
                detach_ingress(index, PRIORITY, self.handle)
        self.attached.clear()
        self._bpf.close()
        self._slots.clear()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BpfError) and exc.code == errno.EPERM:
        return "needs root: CAP_BPF and CAP_NET_ADMIN"
    return str(exc)


def _route_key(local: Address) -> bytes:
    return _ROUTE_KEY.pack(_ipv4(local[0]), _port(local[1]))


def _pack_route(route: Route, slot: int) -> bytes:
    return _ROUTE.pack(
        _ipv4(route.peer[0]),
        _port(route.peer[1]),
        route.in_payload_type,
        route.out_payload_type,
        route.peer_ssrc,
        _ipv4(route.sender[0]),
        _ipv4(route.destination[0]),
        route.sender[1],
        route.destination[1],
        route.ssrc,
        route.clock_rate,
        route.frame_samples,
        slot,
    )
