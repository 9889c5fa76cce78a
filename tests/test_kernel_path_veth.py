"""The in-kernel fast path beyond loopback (needs root): the service in a network namespace of its
own, callers in two others behind veth pairs, so the kernel forwards from one interface out of
another (FIB lookup, neighbour MAC, redirect). Nothing leaves the namespaces this test makes."""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import json
import os
import re
import signal
import socket
import sys
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from port_table import port_block
from test_kernel_path import assert_one_stream, receive_from
from test_media import Phone
from test_media_features import Sender, leg_for, pair, tone_frames
from waiting import until

from voiceline.audio import g711
from voiceline.audio.hold import hold_music
from voiceline.audio.kernel.forwarding import LO_FORWARDING, OBJECT_PATH, PRIORITY, PROGRAM, KernelPath
from voiceline.audio.media import MediaEngine, MediaLeg
from voiceline.sim.analysis import goertzel_db

pytestmark = pytest.mark.integration

BASE, _ = port_block("test_kernel_path_veth")
PORTS = (BASE, BASE + 99)
SERVICE_A, CALLER_A = "10.77.1.1", "10.77.1.2"  # the service's side of a's link, and a
SERVICE_B, CALLER_B = "10.77.2.1", "10.77.2.2"
FWD_DISABLED, NO_NEIGH = 5, 7  # BPF_FIB_LKUP_RET_*
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_runs = itertools.count()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


@contextmanager
def inside(namespace: str) -> Iterator[None]:
    """This thread in `namespace` (sockets made meanwhile stay in it), then back where it was."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@dataclass
class Lab:
    """Three namespaces: the service's, and a's and b's, each caller behind a veth pair."""

    service: str
    a: str
    b: str
    prefix: str  # of every interface name made here

    def link(self, name: str, peer_namespace: str, peer: str, address: str, peer_address: str) -> None:
        ip("link", "add", name, "netns", self.service, "type", "veth", "peer", "name", peer, "netns", peer_namespace)
        ip("-n", self.service, "addr", "add", f"{address}/24", "dev", name)
        ip("-n", peer_namespace, "addr", "add", f"{peer_address}/24", "dev", peer)
        ip("-n", self.service, "link", "set", name, "up")
        ip("-n", peer_namespace, "link", "set", peer, "up")
        ip("-n", peer_namespace, "route", "add", "default", "via", address)

    def lo_forwarding(self, on: bool) -> None:
        """net.ipv4.conf.lo.forwarding in the service's namespace (a thread's /proc/sys/net is its own)."""
        with inside(self.service):
            LO_FORWARDING.write_text("1" if on else "0")


NAMESPACE = re.compile(r"vl(\d+)x\d+[sab]")  # this module's namespaces: vl<pid>x<count><role>


def remove_namespaces_of_dead_runs() -> None:
    """Namespaces a killed run of this module left (their interfaces go with them)."""
    for line in ip("netns", "list").splitlines():
        name = line.split(" ")[0]
        match = NAMESPACE.fullmatch(name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def lab() -> Iterator[Lab]:
    """The namespaces and links, this thread in the service's namespace meanwhile; all removed after."""
    remove_namespaces_of_dead_runs()
    prefix = f"vl{os.getpid()}x{next(_runs)}"  # unique on the machine while this run lives
    lab = Lab(f"{prefix}s", f"{prefix}a", f"{prefix}b", prefix)
    made = []
    try:
        for namespace in (lab.service, lab.a, lab.b):
            ip("netns", "add", namespace)
            made.append(namespace)
            ip("-n", namespace, "link", "set", "lo", "up")
        lab.link(f"{prefix}sa", lab.a, f"{prefix}as", SERVICE_A, CALLER_A)
        lab.link(f"{prefix}sb", lab.b, f"{prefix}bs", SERVICE_B, CALLER_B)
        lab.lo_forwarding(True)
        with inside(lab.service):
            yield lab
    finally:
        for namespace in made:  # its interfaces go with it
            subprocess.run(["ip", "netns", "del", namespace], check=False)


class NsPhone(Phone):
    """A phone in a caller's namespace, sending to the service's address on its side."""

    def __init__(self, namespace: str, host: str, service: str) -> None:
        with inside(namespace):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()
        self._sequence = 0
        self.service = service

    def send(self, leg: MediaLeg, data: bytes) -> None:
        self.sock.sendto(data, (self.service, leg.local_port))


@pytest.fixture
def ns_phones(lab: Lab) -> Iterator[Callable[[str], NsPhone]]:
    made: list[NsPhone] = []

    def make(side: str, service: str | None = None) -> NsPhone:
        """A phone of caller `side`: "a" or "b" behind their links, "here" on the service's host."""
        namespace, host = {"a": (lab.a, CALLER_A), "b": (lab.b, CALLER_B), "here": (lab.service, SERVICE_A)}[side]
        made.append(NsPhone(namespace, host, service or SERVICE_A))
        return made[-1]

    yield make
    for phone in made:
        phone.sock.close()


def new_engine(bind_host: str) -> MediaEngine:
    engine = MediaEngine(bind_host, PORTS, hold_music(), kernel_forwarding=True)
    assert engine.kernel_routes.path is not None, f"kernel path unavailable: {engine.kernel_path_unavailable}"
    return engine


@pytest.fixture
async def engine(lab: Lab) -> AsyncIterator[MediaEngine]:
    engine = new_engine(SERVICE_A)
    yield engine
    engine.close()
    await asyncio.sleep(0)


def filters(device: str) -> list[dict[str, object]]:
    """The ingress filters on `device` (in this thread's namespace), as tc lists them."""
    listing = subprocess.run(["tc", "-j", "filter", "show", "dev", device, "ingress"], capture_output=True, text=True)
    return list(json.loads(listing.stdout or "[]"))


def our_handles(device: str) -> set[int]:
    return {
        int(entry["options"]["handle"], 16)  # type: ignore[index]
        for entry in filters(device)
        if entry.get("pref") == PRIORITY and entry.get("options", {}).get("prog", {}).get("name") == PROGRAM  # type: ignore[union-attr]
    }


async def talking(
    engine: MediaEngine, ns_phones: Callable[..., NsPhone], a_side: str = "a", **services: str
) -> tuple[NsPhone, MediaLeg, Sender, NsPhone, MediaLeg, Sender]:
    """a and b paired, each latched by a first packet (relayed in userspace), and a's stream in the
    kernel (b's too, unless a is on the service's host)."""
    phone_a, phone_b = ns_phones(a_side, services.get("a")), ns_phones("b", services.get("b"))
    a, b = await leg_for(engine, phone_a), await leg_for(engine, phone_b)
    await pair(engine, a, b)
    from_a = Sender(phone_a, a, 0xA0A0A0A0, 100, 1000)
    from_b = Sender(phone_b, b, 0xB0B0B0B0, 65500, 2**32 - 4000)
    for sender, listener in ((from_b, phone_a), (from_a, phone_b)):
        sender.send(tone_frames("PCMU", 1000, 1)[0])
        await listener.receive()
    await until(lambda: engine.kernel_routes.forwarded_from(a))
    if a_side != "here":
        await until(lambda: engine.kernel_routes.forwarded_from(b))
    return phone_a, a, from_a, phone_b, b, from_b


def assert_tone(payloads: list[bytes], hz: int) -> None:
    pcm = g711.ulaw_decode(b"".join(payloads)).astype(np.float64) / 32768
    assert goertzel_db(pcm, 8000, hz) > -25
    assert goertzel_db(pcm, 8000, 2 * hz + 150) < goertzel_db(pcm, 8000, hz) - 30


async def test_tones_cross_between_interfaces_in_the_kernel(engine, ns_phones):
    phone_a, a, from_a, phone_b, b, from_b = await talking(engine, ns_phones)
    to_a, to_b = tone_frames("PCMU", 700, 25), tone_frames("PCMU", 1100, 25)  # what b says to a, and a to b
    for frame_to_a, frame_to_b in zip(to_a, to_b):
        from_b.send(frame_to_a)
        from_a.send(frame_to_b)
    heard_by_a = [await receive_from(phone_a) for _ in to_a]
    heard_by_b = await phone_b.receive_many(len(to_b))
    assert {source for _, _, source in heard_by_a} == {(SERVICE_A, a.local_port)}  # from a's leg, as userspace sends
    assert [payload for _, payload, _ in heard_by_a] == to_a and [payload for _, payload in heard_by_b] == to_b
    assert_tone([payload for _, payload, _ in heard_by_a], 700)
    assert_tone([payload for _, payload in heard_by_b], 1100)
    assert_one_stream([header for header, _ in heard_by_b], [])  # continuing the stream userspace started
    # the socket saw only the latching packets; the kernel counted the rest
    assert a.receiver.packets_in == b.receiver.packets_in == 1
    assert engine.kernel_routes.forwarded_from(b).packets == engine.kernel_routes.forwarded_from(a).packets == 25
    assert engine.kernel_routes.path.fib_fallbacks() == {}


async def test_without_a_neighbour_userspace_relays_and_the_kernel_takes_over_again(lab, engine, ns_phones):
    phone_a, a, from_a, phone_b, b, from_b = await talking(engine, ns_phones)
    ip("neigh", "flush", "dev", f"{lab.prefix}sa")  # a's MAC forgotten
    voice = tone_frames("PCMU", 1000, 12)
    from_b.send(voice[0])
    first = await phone_a.receive()
    assert first[1] == voice[0] and b.receiver.packets_in == 2  # the socket got it, userspace sent it
    assert engine.kernel_routes.path.fib_fallbacks() == {NO_NEIGH: 1}
    await until(lambda: "REACHABLE" in ip("neigh", "show", CALLER_A, "dev", f"{lab.prefix}sa"))  # its send asked
    await until(lambda: engine.kernel_routes.forwarded_from(b) is not None)
    for frame in voice[1:]:
        from_b.send(frame)
    rest = await phone_a.receive_many(len(voice) - 1)
    assert [payload for _, payload in rest] == voice[1:]
    assert b.receiver.packets_in == 2 and engine.kernel_routes.forwarded_from(b).packets == len(voice) - 1
    assert_one_stream([first[0], *(header for header, _ in rest)], [])  # one stream across both paths


async def test_while_the_fib_cannot_answer_every_packet_is_relayed_in_userspace(lab, engine, ns_phones):
    phone_a, a, from_a, phone_b, b, from_b = await talking(engine, ns_phones)
    lab.lo_forwarding(False)  # switched off under a running service
    voice = tone_frames("PCMU", 1000, 10)
    for frame in voice[:5]:
        from_b.send(frame)
        await asyncio.sleep(0.02)  # paced like a phone: each one is handed back in between
    lab.lo_forwarding(True)
    await until(lambda: engine.kernel_routes.forwarded_from(b) is not None)
    for frame in voice[5:]:
        from_b.send(frame)
    heard = await phone_a.receive_many(len(voice))
    assert [payload for _, payload in heard] == voice
    assert_one_stream([header for header, _ in heard], [])
    assert engine.kernel_routes.path.fib_fallbacks() == {FWD_DISABLED: 5}
    assert (b.stats().packets_in, b.stats().packets_in_kernel) == (11, 5)


async def test_a_caller_on_the_service_host_talks_with_one_behind_a_link(engine, ns_phones):
    # a's packets come in on lo and leave by b's link in the kernel; b's to a would go up the stack
    # from b's link with a local source address, which the stack drops: userspace relays those
    phone_a, a, from_a, phone_b, b, from_b = await talking(engine, ns_phones, a_side="here")
    to_a, to_b = tone_frames("PCMU", 700, 10), tone_frames("PCMU", 1100, 10)
    for frame_to_a, frame_to_b in zip(to_a, to_b):
        from_b.send(frame_to_a)
        from_a.send(frame_to_b)
    assert [payload for _, payload in await phone_a.receive_many(len(to_a))] == to_a
    assert [payload for _, payload in await phone_b.receive_many(len(to_b))] == to_b
    a_stats, b_stats = a.stats(), b.stats()
    assert (a_stats.packets_in, a_stats.packets_in_kernel) == (11, 10)
    assert (b_stats.packets_in, b_stats.packets_in_kernel) == (11, 0)
    assert engine.kernel_routes.forwarded_from(b) is None and engine.kernel_routes.path.fib_fallbacks() == {}


def add_foreign_filter(device: str) -> None:
    """Another process's filter ahead of ours: a BPF program of its own (a copy of ours with empty
    maps, which passes every packet on) at priority 7, attached by tc."""
    subprocess.run(["tc", "qdisc", "add", "dev", device, "clsact"], check=True)
    subprocess.run(
        ["tc", "filter", "add", "dev", device, "ingress", "pref", "7", "bpf", "da", "obj", str(OBJECT_PATH), "sec", "tc"],
        check=True,
        capture_output=True,
    )


async def test_on_every_interface_also_a_new_one_and_gone_from_all_at_stop(lab):
    add_foreign_filter(f"{lab.prefix}sb")
    engine = new_engine(SERVICE_A)
    handle = engine.kernel_routes.path.handle
    devices = ["lo", f"{lab.prefix}sa", f"{lab.prefix}sb"]
    try:
        assert all(our_handles(device) == {handle} for device in devices)
        ip("link", "add", f"{lab.prefix}sc", "type", "veth", "peer", "name", f"{lab.prefix}cs")
        devices += [f"{lab.prefix}sc", f"{lab.prefix}cs"]
        await until(lambda: all(our_handles(device) == {handle} for device in devices))
    finally:
        engine.close()
        await asyncio.sleep(0)
    assert not any(our_handles(device) for device in devices)
    assert {entry.get("pref") for entry in filters(f"{lab.prefix}sb")} == {7}  # theirs stays


async def test_the_foreign_filter_before_ours_leaves_forwarding_working(lab, ns_phones):
    add_foreign_filter(f"{lab.prefix}sb")
    engine = new_engine(SERVICE_A)
    try:
        phone_a, a, from_a, phone_b, b, from_b = await talking(engine, ns_phones)
        frames = tone_frames("PCMU", 700, 5)
        for frame in frames:
            from_b.send(frame)
        assert [payload for _, payload in await phone_a.receive_many(5)] == frames
        assert b.receiver.packets_in == 1 and engine.kernel_routes.forwarded_from(b).packets == 5
    finally:
        engine.close()
        await asyncio.sleep(0)


async def test_bound_to_any_address_each_caller_hears_the_address_it_sends_to(lab, ns_phones):
    engine = new_engine("0.0.0.0")
    try:
        phone_a, a, from_a, phone_b, b, from_b = await talking(engine, ns_phones, a=SERVICE_A, b=SERVICE_B)
        frames = tone_frames("PCMU", 700, 5)
        for frame in frames:
            from_a.send(frame)
            from_b.send(frame)
        for phone, service, leg in ((phone_a, SERVICE_A, a), (phone_b, SERVICE_B, b)):
            heard = [await receive_from(phone) for _ in frames]
            assert [payload for _, payload, _ in heard] == frames
            assert {source for _, _, source in heard} == {(service, leg.local_port)}
        assert a.receiver.packets_in == b.receiver.packets_in == 1
        assert a.stats().packets_in_kernel == b.stats().packets_in_kernel == 5
    finally:
        engine.close()
        await asyncio.sleep(0)


STALE = """
import sys
from voiceline.audio.kernel.forwarding import KernelPath
path = KernelPath(sys.argv[1])
print(path.handle, flush=True)
sys.stdin.read()
"""


def test_a_killed_process_filters_are_removed_from_every_interface_at_the_next_start(lab):
    # started from this thread, the process lives in the service's namespace
    process = subprocess.Popen(
        [sys.executable, "-c", STALE, SERVICE_A], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    devices = ["lo", f"{lab.prefix}sa", f"{lab.prefix}sb"]
    try:
        assert process.stdout is not None
        handle = int(process.stdout.readline())
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert all(our_handles(device) == {handle} for device in devices)  # left behind
    path = KernelPath(SERVICE_A)
    try:
        assert all(our_handles(device) == {path.handle} for device in devices)
    finally:
        path.close()
    assert not any(our_handles(device) for device in devices)


async def test_without_forwarding_on_lo_the_engine_says_so(lab):
    lab.lo_forwarding(False)
    engine = MediaEngine(SERVICE_A, PORTS, hold_music(), kernel_forwarding=True)
    try:
        assert engine.kernel_routes.path is None
        assert engine.kernel_path_unavailable == "media beyond loopback needs sysctl net.ipv4.conf.lo.forwarding=1"
        assert not our_handles("lo")
    finally:
        engine.close()
