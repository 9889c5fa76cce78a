"""The in-kernel fast path on loopback (needs root, as CI runs): raw RTP phones talk through
media legs whose established relays the kernel forwards, checked by content and by header."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
import test_media
import test_media_features
from port_table import port_block
from test_media import HOST, PCMU, Phone, phones, tone_frame  # phones: the fixture, shared
from test_media_features import EVENT, PROMPT_HZ, Sender, assert_tone, event_payload, heard, leg_for, pair, tone, tone_frames
from waiting import until

from voiceline.audio import g711
from voiceline.audio.hold import hold_music
from voiceline.audio.kernel import forwarding
from voiceline.audio.kernel.forwarding import PRIORITY, KernelPath
from voiceline.audio.media import MediaEngine, MediaLeg
from voiceline.audio.rtp import RtpHeader, build_packet, parse_header
from voiceline.sim.analysis import goertzel_db

pytestmark = pytest.mark.integration

BASE, _ = port_block("test_kernel_path")
RANGES = [(BASE + 100 * i, BASE + 100 * i + 99) for i in range(3)]


def new_engine(ports: tuple[int, int] = RANGES[0]) -> MediaEngine:
    engine = MediaEngine(HOST, ports, hold_music(), kernel_forwarding=True)
    assert engine.kernel_routes.path is not None, f"kernel path unavailable: {engine.kernel_path_unavailable}"
    return engine


@pytest.fixture
async def engine() -> AsyncIterator[MediaEngine]:
    engine = new_engine()
    yield engine
    engine.close()
    await asyncio.sleep(0)


def our_filters() -> dict[int, str]:
    """voiceline's filters on lo's ingress: handle -> program name."""
    listing = subprocess.run(["tc", "-j", "filter", "show", "dev", "lo", "ingress"], capture_output=True, text=True)
    entries = json.loads(listing.stdout or "[]")
    return {
        int(entry["options"]["handle"], 16): entry["options"]["prog"]["name"]
        for entry in entries
        if entry.get("pref") == PRIORITY and "options" in entry
    }


async def receive_from(phone: Phone) -> tuple[RtpHeader, bytes, tuple[str, int]]:
    data, source = await asyncio.wait_for(asyncio.get_running_loop().sock_recvfrom(phone.sock, 2048), 2.0)
    header = parse_header(data)
    assert header is not None
    return header, data[header.payload_offset : header.payload_end], source


def assert_one_stream(headers: list[RtpHeader], marked: list[int]) -> None:
    """One SSRC, sequence numbers without a gap, timestamps a whole number of frames apart
    (more after a change), the marker exactly at `marked`."""
    assert {header.ssrc for header in headers} == {headers[0].ssrc}
    for earlier, later in zip(headers, headers[1:]):
        assert later.sequence == (earlier.sequence + 1) % 2**16
        step = (later.timestamp - earlier.timestamp) % 2**32
        assert step == 160 or later.marker and 160 <= step < 8000, (earlier, later)
    assert [i for i, header in enumerate(headers) if header.marker] == marked


async def talking(engine: MediaEngine, phones: Callable[[], Phone]) -> tuple[Phone, MediaLeg, Phone, MediaLeg, Sender]:
    """Two legs paired, b's stream latched and forwarded by the kernel to a."""
    phone_a, phone_b = phones(), phones()
    a, b = await leg_for(engine, phone_a), await leg_for(engine, phone_b)
    await pair(engine, a, b)
    from_b = Sender(phone_b, b, 0xB0B0B0B0, 65500, 2**32 - 4000)  # both wrap in the kernel
    from_b.send(tone_frame(1000, "PCMU"))  # latches b: the userspace path relays it
    await phone_a.receive()
    await until(lambda: engine.kernel_routes.forwarded_from(b) is not None)
    return phone_a, a, phone_b, b, from_b


# The userspace path's own relay tests, run again with the kernel path on: it keeps every behaviour.
RELAY_BEHAVIOURS = [
    test_media.test_tone_into_b_reaches_a_as_a_continuation_of_its_hold_stream,
    test_media.test_telephone_events_are_not_relayed,
    test_media.test_symmetric_rtp_latches_on_the_first_valid_packet,
    test_media.test_garbage_is_dropped_and_the_leg_keeps_working,
    test_media.test_closing_a_partner_silences_the_listener_until_it_is_told_again,
    test_media_features.test_rfc4733_digits_reach_the_callback_and_not_the_partner,
    # In-band legs stay in userspace (decoded): routed, their keys would pass to the partner unheard.
    test_media_features.test_inband_digits_are_detected_and_muted_for_the_partner,
    test_media_features.test_inband_frames_of_many_legs_checked_together_keep_to_their_own_leg,
    test_media_features.test_hold_talk_and_another_partner_continue_one_stream,
    test_media_features.test_injected_packets_are_dropped_even_with_the_latched_ssrc,
    test_media_features.test_a_silent_peer_may_move_with_its_ssrc_after_a_nat_rebinding,
    test_media_features.test_two_g722_legs_talk_in_wideband_relayed_as_is,
    test_media_features.test_a_prompt_is_heard_over_the_partner_who_keeps_talking,
    test_media_features.test_a_leg_whose_peer_holds_it_sends_nothing_not_even_a_prompt,
]


@pytest.mark.parametrize("behaviour", RELAY_BEHAVIOURS, ids=lambda test: test.__name__[5:])
async def test_relay_behaviours_hold_with_the_kernel_path(behaviour, engine, phones):
    await behaviour(engine, phones)


async def test_a_tone_crosses_the_kernel_path_with_no_userspace_hop(engine, phones):
    phone_a, a, phone_b, b, from_b = await talking(engine, phones)
    frames = tone_frames("PCMU", 1000, 100)
    for frame in frames:
        from_b.send(frame)
    received = [await receive_from(phone_a) for _ in frames]
    assert b.receiver.packets_in == 1  # the socket saw the latching packet only
    assert b.packets_in == 101 and a.packets_out == 101  # the kernel's counts are the leg's
    assert {source for _, _, source in received} == {(HOST, a.local_port)}  # from a's socket
    headers = [header for header, _, _ in received]
    assert_one_stream(headers, [])
    assert headers[0].ssrc == a.sender.stream.ssrc and all(h.payload_type == PCMU for h in headers)
    assert [payload for _, payload, _ in received] == frames
    assert_tone(*heard("PCMU", frames), 1000)
    stats = b.stats()  # folds the kernel's counts in: nothing lost across the sequence wrap
    assert (stats.packets_in, stats.packets_in_kernel, stats.packets_expected, stats.packets_lost) == (101, 100, 101, 0)
    assert 10 < stats.jitter_ms < 20  # 20 ms frames sent in a burst: the kernel measured it (RFC 3550 A.8)
    assert a.sender.packets_out == 101


async def test_partner_changes_keep_one_stream_through_kernel_and_userspace(engine, phones):
    phone_a, a, phone_b, b, from_b = await talking(engine, phones)
    phone_c = phones()
    c = await leg_for(engine, phone_c)
    from_c = Sender(phone_c, c, 0xC0C0C0C0, 7, 123456)
    voice_b, voice_c = tone_frame(1000, "PCMU"), tone_frame(500, "PCMU")
    from_c.send(voice_c)  # c latches while it hears nobody
    await until(lambda: c.packets_in == 1)
    packets: list[tuple[RtpHeader, bytes]] = []
    changes: list[int] = []

    async def hear(sender: Sender, voice: bytes, count: int, leg: MediaLeg) -> None:
        changes.append(len(packets))
        await until(lambda: engine.kernel_routes.forwarded_to(a) is not None)  # installed, marker pending
        in_userspace = leg.receiver.packets_in
        for _ in range(count):
            sender.send(voice)
            packets.append(await phone_a.receive())
        assert leg.receiver.packets_in == in_userspace  # all of them through the kernel

    await hear(from_b, voice_b, 10, b)
    a.listen_to(c)
    await hear(from_c, voice_c, 10, c)
    a.hold()  # userspace: hold audio from our clock
    assert engine.kernel_routes.forwarded_to(a) is None
    changes.append(len(packets))
    packets += await phone_a.receive_many(5)
    a.listen_to(b)  # b is latched: the kernel fixes the new offsets and marks the first packet
    await hear(from_b, voice_b, 10, b)
    headers = [header for header, _ in packets]
    assert_one_stream(headers, changes[1:])  # the stream's first packet went before these
    assert [payload for _, payload in packets[: changes[1]]] == [voice_b] * 10
    assert [payload for _, payload in packets[changes[1] : changes[2]]] == [voice_c] * 10
    assert [payload for _, payload in packets[changes[3] :]] == [voice_b] * 10


async def test_hand_overs_under_a_running_stream_lose_and_duplicate_nothing(engine, phones):
    """Packets keep arriving (from another thread, 1 per ms) while the route is stopped and
    installed again and again: each is relayed once, by one path or the other."""
    phone_a, a, phone_b, b, from_b = await talking(engine, phones)
    count = 1000
    stream = [
        build_packet(PCMU, (from_b.sequence + i) % 2**16, (from_b.timestamp + 160 * i) % 2**32, from_b.ssrc, i.to_bytes(4, "big") * 40)
        for i in range(count)
    ]

    def send_all() -> None:
        for packet in stream:
            while True:
                try:
                    phone_b.send(b, packet)
                    break
                except BlockingIOError:
                    time.sleep(0.0001)
            time.sleep(0.001)

    received: list[tuple[RtpHeader, bytes]] = []

    async def receive_all() -> None:
        while len(received) < count:
            received.append(await phone_a.receive())

    receiving = asyncio.create_task(receive_all())
    sender = threading.Thread(target=send_all)
    sender.start()
    try:
        while sender.is_alive():
            b.stats()  # the routes from and to b stop, fold back and start again
            await asyncio.sleep(0)
    finally:
        sender.join()
    await receiving
    await phone_a.assert_quiet()
    indexes = sorted(int.from_bytes(payload[:4], "big") for _, payload in received)
    assert indexes == list(range(count))  # none lost, none twice
    sequences = sorted((header.sequence - received[0][0].sequence) % 2**16 for header, _ in received)
    assert sequences == list(range(count))  # one continuous stream, whichever path sent each
    stats = b.stats()
    assert stats.packets_in == count + 1 and stats.packets_lost == 0
    assert 0 < stats.packets_in_kernel < count  # both paths took part


async def test_packets_waiting_in_the_socket_are_read_before_the_route_starts_again(engine, phones, monkeypatch):
    """On a loaded server packets wait in every socket. Those that came while a route was stopped
    are read by the userspace path first and the route starts once after them: started at once,
    each of them, read beside the kernel, would stop it and start it again, and under load the
    relay never got back to the kernel (G.722 at 500 pairs lost half its packets)."""
    phone_a, a, phone_b, b, from_b = await talking(engine, phones)
    routes = engine.kernel_routes
    assert routes.path is not None
    installs: list[int] = []
    install = routes.path.install
    monkeypatch.setattr(routes.path, "install", lambda *args: (installs.append(1), install(*args))[1])
    waiting = 50
    with routes.changing(b):  # the route stops, as for a statistics read or a prompt's end
        for i in range(waiting):
            from_b.send(i.to_bytes(4, "big") * 40)  # queued in b's socket: nobody reads it now
    received = await phone_a.receive_many(waiting)
    await until(lambda: routes.forwarded_from(b) is not None)
    assert [int.from_bytes(payload[:4], "big") for _, payload in received] == list(range(waiting))
    assert installs == [1]  # once, after the waiting packets were read
    in_userspace = b.receiver.packets_in
    from_b.send(tone_frame(1000, "PCMU"))
    after = [header for header, _ in received] + [(await phone_a.receive())[0]]
    assert b.receiver.packets_in == in_userspace  # the kernel forwards again
    assert_one_stream(after, [])


async def test_a_foreign_source_is_left_to_the_latch_rules_and_never_forwarded(engine, phones):
    phone_a, a, phone_b, b, from_b = await talking(engine, phones)
    intruder = phones()
    forged = Sender(intruder, b, from_b.ssrc, from_b.sequence, from_b.timestamp)  # the latched SSRC, even
    voice, noise = tone_frame(1000, "PCMU"), tone_frame(2000, "PCMU")
    for _ in range(5):
        forged.send(noise)
        from_b.send(voice)
    received = await phone_a.receive_many(5)
    await until(lambda: b.packets_dropped == 5)
    await phone_a.assert_quiet()
    assert all(payload == voice for _, payload in received)
    await until(lambda: engine.kernel_routes.forwarded_from(b) is not None)  # back in the kernel
    in_userspace = b.receiver.packets_in
    from_b.send(voice)
    assert (await phone_a.receive())[1] == voice
    assert b.receiver.packets_in == in_userspace and b.packets_in == in_userspace + 1


async def test_digits_go_to_userspace_while_the_kernel_forwards_the_voice(engine, phones):
    phone_a, a, phone_b, b, from_b = await talking(engine, phones)
    digits: list[str] = []
    b.on_digit = digits.append
    voice = tone_frame(1000, "PCMU")
    from_b.send(voice)
    start = from_b.timestamp
    for step in range(3):
        phone_b.send(b, _event(from_b, start, 5, False, 160 * (step + 1)))
    phone_b.send(b, _event(from_b, start, 5, True, 480))
    from_b.send(voice)
    received = await phone_a.receive_many(2)
    await phone_a.assert_quiet()  # no event reaches the partner
    assert [payload for _, payload in received] == [voice, voice] and digits == ["5"]
    first, second = (header for header, _ in received)
    # The events' four sequence numbers stay a gap, as the source's own gaps do; no marker.
    assert (second.sequence - first.sequence) % 2**16 == 5 and not second.marker and second.ssrc == first.ssrc


def _event(sender: Sender, timestamp: int, code: int, end: bool, duration: int) -> bytes:
    from voiceline.audio.rtp import build_packet

    packet = build_packet(EVENT, sender.sequence, timestamp, sender.ssrc, event_payload(code, end, duration))
    sender.sequence = (sender.sequence + 1) % 2**16
    return packet


async def test_prompts_and_hold_take_over_and_hand_back(engine, phones):
    phone_a, a, phone_b, b, from_b = await talking(engine, phones)
    voice = tone_frame(1000, "PCMU")
    a.play_over(tone(PROMPT_HZ, 0.3, 8000, 4000))
    assert engine.kernel_routes.forwarded_to(a) is None  # userspace mixes it

    async def talk() -> None:  # one frame per 20 ms through the prompt and after it
        for _ in range(40):
            from_b.send(voice)
            await asyncio.sleep(0.02)

    await talk()  # what a receives waits in its socket
    packets = await _drain(phone_a)
    await until(lambda: engine.kernel_routes.forwarded_to(a) is not None)  # handed back
    headers = [header for header, _ in packets]
    marked = [i for i, header in enumerate(headers) if header.marker]
    assert len(marked) == 2  # the prompt starts, the partner alone again
    assert_one_stream(headers, marked)
    mixed = g711.ulaw_decode(b"".join(p for _, p in packets[marked[0] + 3 : marked[1]])).astype(np.float64) / 32768
    assert goertzel_db(mixed, 8000, PROMPT_HZ) > -25 and goertzel_db(mixed, 8000, 1000) > -32
    after = [payload for _, payload in packets[marked[1] :]]
    assert after and all(payload == voice for payload in after)
    # hold, then the partner again: hold audio from userspace, the partner from the kernel
    a.hold()
    assert engine.kernel_routes.forwarded_to(a) is None
    held = await phone_a.receive_many(3)
    a.listen_to(b)
    await until(lambda: engine.kernel_routes.forwarded_to(a) is not None)
    in_userspace = b.receiver.packets_in
    from_b.send(voice)
    back = await phone_a.receive()
    assert back[1] == voice and back[0].marker and b.receiver.packets_in == in_userspace
    assert_one_stream([header for header, _ in packets + held + [back]], [*marked, len(packets), len(packets) + 3])


async def _drain(phone: Phone) -> list[tuple[RtpHeader, bytes]]:
    packets = []
    while True:
        try:
            packets.append(await phone.receive(timeout=0.1))
        except asyncio.TimeoutError:
            return packets


async def test_a_held_peer_or_a_sending_pause_stops_forwarding(engine, phones):
    phone_a, a, phone_b, b, from_b = await talking(engine, phones)
    a.set_sending(False)  # a's caller put us on hold
    assert engine.kernel_routes.forwarded_to(a) is None
    from_b.send(tone_frame(1000, "PCMU"))
    await until(lambda: b.receiver.packets_in == 2)  # the socket took it, and nobody sends it on
    await phone_a.assert_quiet()


async def test_kernel_counts_feed_the_inactivity_reaper_and_rtcp(engine, phones):
    phone_a, a, phone_b, b, from_b = await talking(engine, phones)
    latched_at = b.receiver.last_received
    await asyncio.sleep(0.2)  # a gap the counts must show
    for frame in tone_frames("PCMU", 1000, 5):
        from_b.send(frame)
    await phone_a.receive_many(5)
    assert b.receiver.last_received == latched_at  # userspace saw nothing ...
    assert b.last_received - latched_at >= 0.19  # ... yet the leg heard its peer just now
    assert b.last_received <= asyncio.get_running_loop().time()
    a._send_report()  # an RTCP report counts what the kernel sent for a
    assert a.sender.stream.packets == 6 and a.sender.stream.octets == 6 * 160


async def test_closing_a_leg_or_the_engine_removes_routes_and_filter(phones):
    engine = new_engine(RANGES[1])
    handle = engine.kernel_routes.path.handle
    assert our_filters().get(handle) == forwarding.PROGRAM
    phone_a, a, phone_b, b, from_b = await talking(engine, phones)
    b.close()
    assert engine.kernel_routes.forwarding == 0
    from_b.send(tone_frame(1000, "PCMU"))  # b's port is closed: nothing forwards it any more
    await phone_a.assert_quiet()
    engine.close()
    await asyncio.sleep(0)
    assert handle not in our_filters()


async def test_two_paths_share_loopback_each_forwarding_its_own_legs(engine, phones):
    other = new_engine(RANGES[2])
    try:
        assert our_filters().keys() >= {engine.kernel_routes.path.handle, other.kernel_routes.path.handle}
        pairs = [await talking(engine, phones), await talking(other, phones)]
        for phone_a, a, phone_b, b, from_b in pairs:
            frames = tone_frames("PCMU", 700, 10)
            for frame in frames:
                from_b.send(frame)
            assert [payload for _, payload in await phone_a.receive_many(10)] == frames
            assert b.receiver.packets_in == 1 and b.packets_in == 11
    finally:
        other.close()


UNPRIVILEGED = """
import asyncio
from voiceline.audio.hold import hold_music
from voiceline.audio.media import MediaEngine

async def main():
    engine = MediaEngine("127.0.0.1", (%d, %d), hold_music(), kernel_forwarding=True)
    print(engine.kernel_routes.path is None, engine.kernel_path_unavailable)
    engine.close()

asyncio.run(main())
"""


def test_without_privileges_the_engine_says_why_and_runs_the_userspace_path():
    low, high = RANGES[1]
    script = UNPRIVILEGED % (low, high)
    # root without any capability: what an unprivileged service account has
    result = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "True the kernel refused the BPF program (needs root: CAP_BPF and CAP_NET_ADMIN)"


async def test_off_or_unbuilt_runs_the_userspace_path(phones, monkeypatch):
    off = MediaEngine(HOST, RANGES[1], hold_music())
    try:
        assert off.kernel_routes.path is None and off.kernel_path_unavailable is None
        phone_a, phone_b = phones(), phones()
        a, b = await leg_for(off, phone_a), await leg_for(off, phone_b)
        await pair(off, a, b)
        frames = tone_frames("PCMU", 1000, 5)
        for frame in frames:
            phone_b.send_audio(b, frame)
        assert [payload for _, payload in await phone_a.receive_many(5)] == frames
        assert b.receiver.packets_in == 5 and b.stats().packets_in_kernel == 0
    finally:
        off.close()
    monkeypatch.setattr(forwarding, "OBJECT_PATH", forwarding.OBJECT_PATH.with_name("missing.bpf.o"))
    unbuilt = MediaEngine(HOST, RANGES[1], hold_music(), kernel_forwarding=True)
    assert unbuilt.kernel_routes.path is None
    assert unbuilt.kernel_path_unavailable == "the BPF object is not built (make builds it with clang)"
    unbuilt.close()
