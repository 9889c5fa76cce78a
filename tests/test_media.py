"""MediaEngine and MediaLeg on loopback, with plain UDP sockets standing in for the phones."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Iterator

import numpy as np
import pytest

from port_table import port_block
from waiting import until
from voiceline.audio import g711
from voiceline.audio.hold import encode_frames, hold_music, ringback
from voiceline.audio.media import MediaEngine, MediaError, MediaLeg
from voiceline.audio.rtp import MAX_PAYLOAD, RtpHeader, build_packet, parse_header
from voiceline.codec_table import lookup

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
BASE, _ = port_block("test_media")
PORTS = (BASE, BASE + 99)  # the engine's; the tests of the port range use BASE + 100 and up
PCMU, PCMA, EVENT = 0, 8, 101
RECEIVE_TIMEOUT = 2.0
QUIET = 0.2  # how long "nothing arrives" is watched for


class Phone:
    """A UDP socket playing a remote phone: sends raw datagrams, receives RTP."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.setblocking(False)
        self.address: tuple[str, int] = self.sock.getsockname()
        self._sequence = 0

    def send(self, leg: MediaLeg, data: bytes) -> None:
        self.sock.sendto(data, (HOST, leg.local_port))

    def send_audio(self, leg: MediaLeg, payload: bytes, payload_type: int = PCMU, count: int = 1) -> None:
        for _ in range(count):
            self.send(leg, build_packet(payload_type, self._sequence, self._sequence * 160, 0x0F0F0F0F, payload))
            self._sequence += 1

    async def receive(self, timeout: float = RECEIVE_TIMEOUT) -> tuple[RtpHeader, bytes]:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 2048), timeout)
        header = parse_header(data)
        assert header is not None, "the leg sent something that is not RTP"
        return header, data[header.payload_offset : header.payload_end]

    async def receive_many(self, count: int) -> list[tuple[RtpHeader, bytes]]:
        return [await self.receive() for _ in range(count)]

    async def receive_until(self, payload: bytes, limit: int = 200) -> list[tuple[RtpHeader, bytes]]:
        """Everything received up to and including the first packet carrying `payload`."""
        packets = []
        for _ in range(limit):
            packets.append(await self.receive())
            if packets[-1][1] == payload:
                return packets
        raise AssertionError("payload never arrived")

    async def assert_quiet(self) -> None:
        with pytest.raises(asyncio.TimeoutError):
            await self.receive(timeout=QUIET)

    async def drain(self, limit: int = 100) -> None:
        """Discard what is in flight until nothing arrives for a while."""
        for _ in range(limit):
            try:
                await self.receive(timeout=QUIET)
            except asyncio.TimeoutError:
                return
        raise AssertionError("still receiving")


def tone_frame(frequency: float, codec: str, amplitude: float = 6000.0) -> bytes:
    """One 20 ms frame of a tone that repeats exactly every frame (frequency a multiple of 50 Hz)."""
    t = np.arange(160) / 8000
    return g711.encoder(codec)(amplitude * np.sin(2 * np.pi * frequency * t))


def goertzel_power(samples: np.ndarray, frequency: float, rate: int = 8000) -> float:
    coefficient = 2 * np.cos(2 * np.pi * frequency / rate)
    previous = before = 0.0
    for sample in samples.astype(np.float64):
        previous, before = sample + coefficient * previous - before, previous
    return previous**2 + before**2 - coefficient * previous * before


def assert_dominant_tone(samples: np.ndarray, frequency: float) -> None:
    power = goertzel_power(samples, frequency)
    for other in (350, 697, 941, 1209, 1477, 2000):
        if other != frequency:
            assert power > 100 * goertzel_power(samples, other)


def assert_continuous(headers: list[RtpHeader], ssrc: int) -> None:
    assert {header.ssrc for header in headers} == {ssrc}
    for earlier, later in zip(headers, headers[1:]):
        assert later.sequence == (earlier.sequence + 1) % 2**16


@pytest.fixture
async def engine() -> AsyncIterator[MediaEngine]:
    engine = MediaEngine(HOST, PORTS, hold_music())
    yield engine
    engine.close()
    await asyncio.sleep(0)  # let the transports close their sockets


@pytest.fixture
def phones() -> Iterator[Callable[[], Phone]]:
    made: list[Phone] = []

    def make() -> Phone:
        made.append(Phone())
        return made[-1]

    yield make
    for phone in made:
        phone.sock.close()


async def started_leg(engine: MediaEngine, phone: Phone, codec: str = "PCMU") -> MediaLeg:
    leg = await engine.open_leg()
    leg.start(phone.address, lookup(codec), PCMU if codec == "PCMU" else PCMA, EVENT)
    return leg


async def talking_pair(
    engine: MediaEngine, phones: Callable[[], Phone], codec_a: str = "PCMU", codec_b: str = "PCMU"
) -> tuple[Phone, MediaLeg, Phone, MediaLeg]:
    phone_a, phone_b = phones(), phones()
    a, b = await started_leg(engine, phone_a, codec_a), await started_leg(engine, phone_b, codec_b)
    a.listen_to(b)
    b.listen_to(a)
    return phone_a, a, phone_b, b


# -- hold audio -------------------------------------------------------------------


async def test_hold_audio_arrives_every_frame_with_one_ssrc(engine, phones):
    phone = phones()
    leg = await started_leg(engine, phone)
    leg.hold()
    loop = asyncio.get_running_loop()
    packets = [await phone.receive()]
    first_at = loop.time()
    packets += await phone.receive_many(49)
    elapsed = loop.time() - first_at

    headers = [header for header, _ in packets]
    assert_continuous(headers, headers[0].ssrc)
    assert [h.marker for h in headers] == [True] + [False] * 49
    assert all(h.payload_type == PCMU for h in headers)
    # One frame per tick; a multiple if the loop was so late that the pacer skipped ahead.
    steps = [(later.timestamp - earlier.timestamp) % 2**32 for earlier, later in zip(headers, headers[1:])]
    assert all(step > 0 and step % 160 == 0 for step in steps)
    assert elapsed > 0.5  # paced over about a second, not a burst
    # The pattern from its start, and audibly not silent.
    assert [payload for _, payload in packets] == encode_frames(hold_music(), lookup("PCMU"))[:50]
    audio = g711.ulaw_decode(b"".join(payload for _, payload in packets)).astype(np.float64)
    assert np.sqrt(np.mean(audio**2)) > 100
    assert leg.packets_out >= 50


async def test_legs_share_the_pacer_each_from_the_start_in_its_own_codec(engine, phones):
    phone_u, phone_a = phones(), phones()
    ulaw_leg = await started_leg(engine, phone_u, "PCMU")
    alaw_leg = await started_leg(engine, phone_a, "PCMA")
    ulaw_leg.hold()
    await phone_u.receive_many(10)
    alaw_leg.hold()
    received = await phone_a.receive_many(5)
    assert [payload for _, payload in received] == encode_frames(hold_music(), lookup("PCMA"))[:5]
    assert all(header.payload_type == PCMA for header, _ in received)
    ulaw_headers = [header for header, _ in await phone_u.receive_many(20)]
    assert_continuous(ulaw_headers, ulaw_headers[0].ssrc)  # undisturbed by the second leg


async def test_a_loop_of_its_own_replaces_the_hold_music_and_gives_way_to_it_again(engine, phones):
    phone = phones()
    leg = await started_leg(engine, phone)
    leg.hold()
    await phone.receive_many(5)
    ringing = ringback((425.0,), 1.0, 5.0)
    leg.hold(ringing)
    received = await phone.receive_many(60)
    frames = encode_frames(ringing, lookup("PCMU"))
    start = next(i for i, (_, payload) in enumerate(received) if payload == frames[0])  # after those in flight
    assert [payload for _, payload in received[start : start + 40]] == frames[:40]
    leg.hold(ringing)  # the same loop again: it goes on, not from its start
    leg.hold()
    music = encode_frames(hold_music(), lookup("PCMU"))
    after = [payload for _, payload in await phone.receive_many(30)]
    back = after.index(music[0])  # the music from its start again, after any frames in flight
    assert after[back : back + 10] == music[:10]


async def test_rtcp_port_is_bound_and_ignored(engine, phones):
    phone = phones()
    leg = await started_leg(engine, phone)
    phone.sock.sendto(b"\x81\xc9\x00\x01" + b"\x00" * 4, (HOST, leg.local_port + 1))
    leg.hold()
    await phone.receive_many(3)
    assert leg.packets_dropped == 0


# -- relay -------------------------------------------------------------------------


async def test_tone_into_b_reaches_a_as_a_continuation_of_its_hold_stream(engine, phones):
    phone_a, phone_b = phones(), phones()
    a, b = await started_leg(engine, phone_a), await started_leg(engine, phone_b)
    a.hold()
    on_hold = await phone_a.receive_many(5)
    a.listen_to(b)
    b.listen_to(a)
    tone = tone_frame(1000, "PCMU")
    phone_b.send_audio(b, tone, count=25)

    packets = on_hold + await phone_a.receive_until(tone)
    packets += await phone_a.receive_many(24)
    headers = [header for header, _ in packets]
    assert_continuous(headers, on_hold[0][0].ssrc)  # a's own SSRC, no gap at the switch
    first_relayed = next(i for i, (_, payload) in enumerate(packets) if payload == tone)
    assert headers[first_relayed].marker
    relayed = packets[first_relayed:]
    assert all(payload == tone for _, payload in relayed)  # same codec: bytes pass unchanged
    assert_dominant_tone(g711.ulaw_decode(b"".join(payload for _, payload in relayed)), 1000)
    assert b.packets_in == 25 and a.packets_out == len(packets)
    assert b.last_received > 0.0


@pytest.mark.parametrize(("codec_a", "codec_b"), [("PCMA", "PCMU"), ("PCMU", "PCMA")])
async def test_pcmu_and_pcma_legs_transcode_both_ways(engine, phones, codec_a, codec_b):
    phone_a, a, phone_b, b = await talking_pair(engine, phones, codec_a, codec_b)
    pt_a, pt_b = (PCMU if codec == "PCMU" else PCMA for codec in (codec_a, codec_b))

    phone_b.send_audio(b, tone_frame(1000, codec_b), pt_b, count=10)
    into_a = await phone_a.receive_many(10)
    assert all(header.payload_type == pt_a for header, _ in into_a)
    heard_by_a = g711.decoder(codec_a)(b"".join(payload for _, payload in into_a))
    assert_dominant_tone(heard_by_a, 1000)
    expected = np.tile(g711.decoder(codec_b)(tone_frame(1000, codec_b)), 10).astype(np.int32)
    assert np.max(np.abs(heard_by_a - expected)) <= 6000 / 32 + 16  # one more quantisation step

    phone_a.send_audio(a, tone_frame(500, codec_a), pt_a, count=10)
    into_b = await phone_b.receive_many(10)
    assert all(header.payload_type == pt_b for header, _ in into_b)
    assert_dominant_tone(g711.decoder(codec_b)(b"".join(payload for _, payload in into_b)), 500)


async def test_telephone_events_are_not_relayed(engine, phones):
    phone_a, a, phone_b, b = await talking_pair(engine, phones)
    phone_b.send_audio(b, b"\x05\x0a\x00\xa0", EVENT, count=3)
    voice = tone_frame(1000, "PCMU")
    phone_b.send_audio(b, voice)
    header, payload = await phone_a.receive()
    assert (header.payload_type, payload) == (PCMU, voice)
    assert b.packets_in == 4 and b.packets_dropped == 0


async def test_symmetric_rtp_latches_on_the_first_valid_packet(engine, phones):
    sdp_phone, nat_phone = phones(), phones()
    leg = await started_leg(engine, sdp_phone)
    leg.hold()
    await sdp_phone.receive_many(2)  # before latching: the SDP address

    nat_phone.send_audio(leg, tone_frame(1000, "PCMU"))
    header, _ = await nat_phone.receive()  # after: where the phone really sends from
    assert not header.marker
    await sdp_phone.drain()  # what was in flight before the latch; then nothing more

    sdp_phone.send_audio(leg, tone_frame(1000, "PCMU"), count=3)  # now a foreign source
    nat_phone.send_audio(leg, tone_frame(1000, "PCMU"))
    await until(lambda: leg.packets_in == 2)
    assert leg.packets_dropped == 3
    await nat_phone.receive()


async def test_foreign_source_after_latching_is_not_relayed(engine, phones):
    phone_a, a, phone_b, b = await talking_pair(engine, phones)
    intruder = phones()
    voice = tone_frame(1000, "PCMU")
    phone_b.send_audio(b, voice)
    await phone_a.receive()  # b has latched onto phone_b

    intruder.send_audio(b, tone_frame(500, "PCMU"), count=3)
    second_voice = tone_frame(1500, "PCMU")
    phone_b.send_audio(b, second_voice)
    _, payload = await phone_a.receive()
    assert payload == second_voice
    assert (b.packets_dropped, a.packets_out) == (3, 2)


async def test_garbage_is_dropped_and_the_leg_keeps_working(engine, phones):
    phone_a, a, phone_b, b = await talking_pair(engine, phones)
    good = build_packet(PCMU, 1, 160, 9, b"\x55" * 160)
    garbage = [
        b"",
        b"\x80",
        good[:11],
        b"GET / HTTP/1.1\r\n\r\n",
        bytes([0x40]) + good[1:],  # version 1
        bytes([0x8F]) + good[1:20],  # 15 CSRCs announced, none there
        bytes([0x90]) + good[1:12] + b"\xbe\xde\xff\xff",  # extension longer than the packet
        bytes([0xA0]) + good[1:-1] + b"\x00",  # padding count of zero
        bytes([0xA0]) + good[1:-1] + b"\xff",  # more padding than packet
        build_packet(PCMA, 1, 160, 9, b"\x55" * 160),  # not this leg's payload type
        build_packet(PCMU, 1, 160, 9, b"\x55" * (MAX_PAYLOAD + 1)),  # oversized
        bytes(range(256)) * 4,
    ]
    for data in garbage:
        phone_b.send(b, data)
    phone_b.send(b, good)
    _, payload = await phone_a.receive()
    assert payload == b"\x55" * 160
    assert (b.packets_dropped, b.packets_in) == (len(garbage), 1)


async def test_closing_a_partner_silences_the_listener_until_it_is_told_again(engine, phones):
    phone_a, a, phone_b, b = await talking_pair(engine, phones)
    phone_b.send_audio(b, tone_frame(1000, "PCMU"))
    relayed, _ = await phone_a.receive()
    b.close()
    b.close()  # idempotent
    await phone_a.assert_quiet()
    with pytest.raises(MediaError):
        a.listen_to(b)

    a.hold()
    header, _ = await phone_a.receive()
    assert header.sequence == (relayed.sequence + 1) % 2**16 and header.marker
    assert header.ssrc == relayed.ssrc


async def test_a_leg_must_be_started_first(engine, phones):
    leg = await engine.open_leg()
    with pytest.raises(MediaError, match="not started"):
        leg.hold()
    other = await started_leg(engine, phones())
    with pytest.raises(MediaError, match="not started"):
        other.listen_to(leg)
    leg.start((HOST, 9), lookup("PCMU"), PCMU, None)
    with pytest.raises(MediaError, match="already started"):
        leg.start((HOST, 9), lookup("PCMU"), PCMU, None)


async def test_packets_before_start_are_dropped(engine, phones):
    phone = phones()
    leg = await engine.open_leg()
    phone.send_audio(leg, tone_frame(1000, "PCMU"))
    await until(lambda: leg.packets_dropped == 1)
    leg.start(phone.address, lookup("PCMU"), PCMU, EVENT)
    leg.hold()
    await phone.receive()
    assert (leg.packets_in, leg.packets_dropped, leg.last_received) == (0, 1, 0.0)


# -- ports ---------------------------------------------------------------------------


def can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


async def test_port_range_exhaustion_raises_media_error():
    engine = MediaEngine(HOST, (BASE + 100, BASE + 103), hold_music())
    try:
        legs = [await engine.open_leg(), await engine.open_leg()]
        assert sorted(leg.local_port for leg in legs) == [BASE + 100, BASE + 102]
        with pytest.raises(MediaError) as raised:
            await engine.open_leg()
        assert str(raised.value) == "no free RTP port in the configured range"
        assert engine.legs == 2
    finally:
        engine.close()
        await asyncio.sleep(0)


async def test_freed_ports_rest_and_close_releases_them():
    engine = MediaEngine(HOST, (BASE + 111, BASE + 117), hold_music())  # odd start: even ports BASE + 112 to 116
    try:
        first, second = await engine.open_leg(), await engine.open_leg()
        assert {first.local_port, second.local_port} < {BASE + 112, BASE + 114, BASE + 116}
        freed = first.local_port
        first.close()
        await asyncio.sleep(0)
        assert engine.legs == 1
        assert can_bind(freed) and can_bind(freed + 1)
        third = await engine.open_leg()
        assert third.local_port not in (freed, second.local_port)  # the just-freed port rests
        fourth = await engine.open_leg()
        assert fourth.local_port == freed  # unless no other is free
    finally:
        engine.close()
        await asyncio.sleep(0)
    assert engine.legs == 0
    assert all(can_bind(port) for port in range(BASE + 112, BASE + 118))
    with pytest.raises(MediaError):
        await engine.open_leg()


async def test_a_port_taken_by_someone_else_is_skipped():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind((HOST, BASE + 121))  # the RTCP half of the first pair
        engine = MediaEngine(HOST, (BASE + 120, BASE + 123), hold_music())
        try:
            assert (await engine.open_leg()).local_port == BASE + 122
            with pytest.raises(MediaError):
                await engine.open_leg()
        finally:
            engine.close()
            await asyncio.sleep(0)
    assert can_bind(BASE + 120)
