"""Media leg features on loopback with raw UDP phones: DTMF, partner changes, re-latching,
wideband codecs and transcoding, prompts mixed over a conversation."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
from port_table import port_block
from test_dtmf import dtmf, silence
from test_media import HOST, PCMU, Phone, phones, tone_frame  # phones: the fixture, shared
from waiting import until

from voiceline.audio import g711
from voiceline.audio.codecs import new_coder
from voiceline.audio.dtmf import ToneDetector
from voiceline.audio.hold import PAD_HZ, hold_music
from voiceline.audio import media
from voiceline.audio.media import MediaEngine, MediaLeg
from voiceline.audio.rtcp import ReceptionStats, build_report, parse
from voiceline.audio.rtp import build_packet, parse_header
from voiceline.codec_table import lookup
from voiceline.sim.analysis import goertzel_db

pytestmark = pytest.mark.integration

BASE, _ = port_block("test_media_features")
PORTS = (BASE, BASE + 99)  # the engine's
EVENT = 101
G722_PT = 9


def tone(hz: float, seconds: float, rate: int, amplitude: float = 6000.0, start: float = 0.0) -> np.ndarray:
    t = start + np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.int16)


@pytest.fixture
async def engine() -> AsyncIterator[MediaEngine]:
    engine = MediaEngine(HOST, PORTS, hold_music())
    yield engine
    engine.close()
    await asyncio.sleep(0)


async def leg_for(
    engine: MediaEngine, phone: Phone, codec: str = "PCMU", payload_type: int = PCMU, event: int | None = EVENT
) -> MediaLeg:
    leg = await engine.open_leg()
    leg.start(phone.address, lookup(codec), payload_type, event)
    return leg


async def pair(engine: MediaEngine, a: MediaLeg, b: MediaLeg) -> None:
    a.listen_to(b)
    b.listen_to(a)


def frames_of(pcm: np.ndarray, codec: str = "PCMU", size: int = 160) -> list[bytes]:
    encode = g711.encoder(codec)
    return [encode(pcm[i : i + size]) for i in range(0, len(pcm) - size + 1, size)]


# -- DTMF -------------------------------------------------------------------------------


def event_payload(code: int, end: bool, duration: int) -> bytes:
    return bytes([code, 0x8A if end else 0x0A]) + duration.to_bytes(2, "big")


async def test_rfc4733_digits_reach_the_callback_and_not_the_partner(engine, phones):
    phone_a, phone_b = phones(), phones()
    a, b = await leg_for(engine, phone_a), await leg_for(engine, phone_b)
    await pair(engine, a, b)
    digits: list[str] = []
    b.on_digit = digits.append
    voice = tone_frame(1000, "PCMU")
    sequence = 0

    def send(payload_type: int, timestamp: int, payload: bytes) -> None:
        nonlocal sequence
        phone_b.send(b, build_packet(payload_type, sequence, timestamp, 0x1234, payload))
        sequence += 1

    for code, start in ((11, 1600), (5, 4800)):
        send(PCMU, start - 160, voice)
        for step in range(4):  # start and updates, then the end three times
            send(EVENT, start, event_payload(code, False, 160 * (step + 1)))
        for _ in range(3):
            send(EVENT, start, event_payload(code, True, 800))
    send(PCMU, 6400, voice)
    received = await phone_a.receive_many(3)
    await phone_a.assert_quiet()
    assert [(header.payload_type, payload) for header, payload in received] == [(PCMU, voice)] * 3
    assert digits == ["#", "5"]
    assert b.packets_in == 17


async def test_inband_digits_are_detected_and_muted_for_the_partner(engine, phones):
    phone_a, phone_b = phones(), phones()
    a = await leg_for(engine, phone_a, event=None)
    b = await leg_for(engine, phone_b, event=None)  # no telephone-event in its SDP
    await pair(engine, a, b)
    digits: list[str] = []
    b.on_digit = digits.append
    speech = np.tile(g711.ulaw_decode(tone_frame(600, "PCMU")), 10)
    pcm = np.concatenate((speech, dtmf("#", 0.2), silence(0.06), dtmf("4", 0.1), speech))
    sent = frames_of(pcm)
    for payload in sent:
        phone_b.send_audio(b, payload)
        await asyncio.sleep(0.002)  # keep the socket buffers shallow
    received = await phone_a.receive_many(len(sent))
    assert digits == ["#", "4"]
    heard = g711.ulaw_decode(b"".join(payload for _, payload in received))
    detector = ToneDetector()
    assert all(detector.frame_digit(heard[i : i + 160]) is None for i in range(0, len(heard), 160))
    # Nothing of the keys' tones is left; the speech before and after passes untouched.
    keys = heard[1600:-1600].astype(np.float64) / 32768
    assert max(goertzel_db(keys, 8000, hz) for hz in (941, 1477, 770, 1209)) < -60
    assert [payload for _, payload in received[:10]] == sent[:10]
    assert [payload for _, payload in received[-10:]] == sent[-10:]



async def test_inband_frames_of_many_legs_checked_together_keep_to_their_own_leg(engine, phones):
    """Three callers without telephone-event press different keys at the same time: their frames
    share the engine's batches, and each leg reports its own key, mutes it, and passes its
    speech on in order to its own partner."""
    keys = "159"
    callers, partners, digits = [phones() for _ in keys], [phones() for _ in keys], [[] for _ in keys]
    sources = []
    for caller, partner, found in zip(callers, partners, digits):
        source = await leg_for(engine, caller, event=None)
        await pair(engine, source, await leg_for(engine, partner))
        source.on_digit = found.append
        sources.append(source)
    speech = np.tile(g711.ulaw_decode(tone_frame(600, "PCMU")), 4)
    sent = [frames_of(np.concatenate((speech, dtmf(key, 0.2), speech))) for key in keys]
    for frames in zip(*sent):  # one frame of every caller, then the next: a batch holds all legs
        for caller, source, payload in zip(callers, sources, frames):
            caller.send_audio(source, payload)
        await asyncio.sleep(0.002)
    for partner, frames, found, key in zip(partners, sent, digits, keys):
        received = await partner.receive_many(len(frames))
        assert found == [key]
        heard = [payload for _, payload in received]
        assert heard[:4] == frames[:4] and heard[-4:] == frames[-4:]
        assert all(ToneDetector().frame_digit(g711.ulaw_decode(payload)) is None for payload in heard)


async def test_inband_detection_can_be_turned_off(phones):
    engine = MediaEngine(HOST, (BASE + 100, BASE + 199), hold_music(), inband_dtmf=False)
    try:
        phone_a, phone_b = phones(), phones()
        a, b = await leg_for(engine, phone_a, event=None), await leg_for(engine, phone_b, event=None)
        await pair(engine, a, b)
        digits: list[str] = []
        b.on_digit = digits.append
        sent = frames_of(dtmf("#", 0.2))
        for payload in sent:
            phone_b.send_audio(b, payload)
        received = await phone_a.receive_many(len(sent))
        assert digits == [] and [payload for _, payload in received] == sent  # relayed untouched
    finally:
        engine.close()
        await asyncio.sleep(0)

# -- partner changes ----------------------------------------------------------------------


class Sender:
    """A phone's outgoing stream with its own SSRC, sequence and timestamp bases."""

    def __init__(self, phone: Phone, leg: MediaLeg, ssrc: int, sequence: int, timestamp: int) -> None:
        self.phone, self.leg = phone, leg
        self.ssrc, self.sequence, self.timestamp = ssrc, sequence, timestamp

    def send(self, payload: bytes, payload_type: int = PCMU, ticks: int = 160) -> None:
        self.phone.send(self.leg, build_packet(payload_type, self.sequence, self.timestamp, self.ssrc, payload))
        self.sequence = (self.sequence + 1) % 2**16
        self.timestamp = (self.timestamp + ticks) % 2**32


async def test_hold_talk_and_another_partner_continue_one_stream(engine, phones):
    phone_a, phone_b, phone_c = phones(), phones(), phones()
    a, b = await leg_for(engine, phone_a), await leg_for(engine, phone_b)
    c = await leg_for(engine, phone_c, "G722", G722_PT)
    from_b = Sender(phone_b, b, 0xB0B0B0B0, 65530, 2**32 - 400)  # both wrap during the test
    from_c = Sender(phone_c, c, 0xC0C0C0C0, 12345, 777)
    a.hold()
    packets = await phone_a.receive_many(5)
    changes = [0]
    a.listen_to(b)
    changes.append(len(packets))
    tone_b = tone_frame(1000, "PCMU")
    for _ in range(10):
        from_b.send(tone_b)
        packets += [await phone_a.receive()]
    a.listen_to(c)  # G.722 to PCMU goes through PCM: the same stream rules
    changes.append(len(packets))
    encoder = new_coder(lookup("G722"))
    for frame in range(10):
        from_c.send(encoder.encode(tone(500, 0.02, 16000, start=frame * 0.02)), G722_PT)
        packets += [await phone_a.receive()]
    a.hold()
    changes.append(len(packets))
    packets += await phone_a.receive_many(5)

    headers = [header for header, _ in packets]
    assert {header.ssrc for header in headers} == {headers[0].ssrc}
    assert all(header.payload_type == PCMU for header in headers)
    for earlier, later in zip(headers, headers[1:]):
        assert later.sequence == (earlier.sequence + 1) % 2**16
        step = (later.timestamp - earlier.timestamp) % 2**32
        assert 160 <= step < 8000 and step % 160 == 0 or later.marker and 160 <= step < 8000
    assert [i for i, header in enumerate(headers) if header.marker] == changes
    assert [payload for _, payload in packets[changes[1] : changes[2]]] == [tone_b] * 10


# -- source filtering and re-latching -------------------------------------------------------


async def test_injected_packets_are_dropped_even_with_the_latched_ssrc(engine, phones):
    phone_a, phone_b, attacker = phones(), phones(), phones()
    a, b = await leg_for(engine, phone_a), await leg_for(engine, phone_b)
    await pair(engine, a, b)
    genuine = Sender(phone_b, b, 0x11111111, 100, 16000)
    voice, noise = tone_frame(1000, "PCMU"), tone_frame(2000, "PCMU")
    genuine.send(voice)
    assert (await phone_a.receive())[1] == voice
    forged = Sender(attacker, b, 0x11111111, 101, 16160)  # a guessed SSRC does not help while b talks
    for _ in range(5):
        forged.send(noise)
        genuine.send(voice)
    received = await phone_a.receive_many(5)
    await phone_a.assert_quiet()
    assert all(payload == voice for _, payload in received)
    assert b.packets_dropped == 5
    b.hold()
    header, _ = await phone_b.receive()  # b's own audio still goes to the latched address
    await attacker.assert_quiet()


async def test_a_silent_peer_may_move_with_its_ssrc_after_a_nat_rebinding(engine, phones):
    phone_a, old_port, new_port, stranger = phones(), phones(), phones(), phones()
    a, b = await leg_for(engine, phone_a), await leg_for(engine, old_port)
    await pair(engine, a, b)
    before = Sender(old_port, b, 0x22222222, 500, 80000)
    voice = tone_frame(1000, "PCMU")
    before.send(voice)
    await phone_a.receive()
    await asyncio.sleep(0.6)  # the latched source falls silent (latch.REBIND_SILENCE_SECONDS)
    Sender(stranger, b, 0x33333333, 1, 1).send(voice)  # another SSRC: still not accepted
    await until(lambda: b.packets_dropped == 1)
    after = Sender(new_port, b, 0x22222222, before.sequence, before.timestamp)
    after.send(voice)
    assert (await phone_a.receive())[1] == voice
    phone_a.send_audio(a, tone_frame(500, "PCMU"))
    header, payload = await new_port.receive()  # b's stream now goes to the new address
    assert payload == tone_frame(500, "PCMU")
    before.send(voice)  # the old address speaks again: never locked out, it takes the stream back
    assert (await phone_a.receive())[1] == voice
    phone_a.send_audio(a, tone_frame(600, "PCMU"))
    assert (await old_port.receive())[1] == tone_frame(600, "PCMU")
    after.send(voice)  # and the new one, not silent long enough, is the foreign one now
    await until(lambda: b.packets_dropped == 2)
    await phone_a.assert_quiet()


# -- codecs and transcoding ------------------------------------------------------------------

OPUS_PT = 111
WIDE_HZ = 5000.0  # above the 4 kHz limit of narrowband: survives only a wideband path


def tone_frames(codec: str, hz: float, count: int, amplitude: float = 6000.0) -> list[bytes]:
    """`count` 20 ms frames of a continuous tone, encoded in sequence by one coder."""
    spec = lookup(codec)
    pcm = tone(hz, count * 0.02, spec.rate, amplitude)
    coder = new_coder(spec)
    size = spec.frame_samples
    return [coder.encode(pcm[i : i + size]) for i in range(0, len(pcm), size)]


def heard(codec: str, payloads: list[bytes]) -> tuple[np.ndarray, int]:
    """Decode what a phone received, as floats in [-1, 1), and the rate."""
    coder = new_coder(lookup(codec))
    pcm = np.concatenate([coder.decode(payload) for payload in payloads])
    return pcm.astype(np.float64) / 32768, lookup(codec).rate


def assert_tone(samples: np.ndarray, rate: int, hz: float, others: tuple[float, ...] = (300.0, 1500.0, 2500.0)) -> None:
    body = samples[len(samples) // 4 :]  # past codec and filter start-up
    level = goertzel_db(body, rate, hz)
    assert level > -25, level  # the 6000/32768 tone reads about -15 dB
    assert all(level - goertzel_db(body, rate, other) > 30 for other in others if other != hz)


async def exchange(
    engine: MediaEngine, phones: Callable[[], Phone], codec_a: str, pt_a: int, codec_b: str, pt_b: int
) -> tuple[Sender, Phone, Sender, Phone]:
    phone_a, phone_b = phones(), phones()
    a, b = await leg_for(engine, phone_a, codec_a, pt_a), await leg_for(engine, phone_b, codec_b, pt_b)
    await pair(engine, a, b)
    return Sender(phone_a, a, 0xA, 10, 1000), phone_a, Sender(phone_b, b, 0xB, 20, 2000), phone_b


async def send_and_receive(sender: Sender, receiver: Phone, frames: list[bytes], payload_type: int, ticks: int):
    received = []
    for frame in frames:
        sender.send(frame, payload_type, ticks)
        received.append(await receiver.receive())
    return received


async def test_two_g722_legs_talk_in_wideband_relayed_as_is(engine, phones):
    from_a, phone_a, from_b, phone_b = await exchange(engine, phones, "G722", G722_PT, "G722", G722_PT)
    frames = tone_frames("G722", WIDE_HZ, 25)
    received = await send_and_receive(from_b, phone_a, frames, G722_PT, 160)
    assert [payload for _, payload in received] == frames  # the fast path: bytes unchanged
    assert all(header.payload_type == G722_PT for header, _ in received)
    assert_tone(*heard("G722", [payload for _, payload in received]), WIDE_HZ)


@pytest.mark.parametrize(("wide", "wide_pt"), [("G722", G722_PT), ("OPUS", OPUS_PT)])
async def test_a_wideband_leg_and_a_pcmu_leg_transcode_both_ways(engine, phones, wide, wide_pt):
    wide_ticks = lookup(wide).frame_ticks
    from_wide, wide_phone, from_pcmu, pcmu_phone = await exchange(engine, phones, wide, wide_pt, "PCMU", PCMU)
    into_pcmu = await send_and_receive(from_wide, pcmu_phone, tone_frames(wide, 1000, 25), wide_pt, wide_ticks)
    assert all(header.payload_type == PCMU for header, _ in into_pcmu)
    assert all(len(payload) == 160 for _, payload in into_pcmu)
    assert_tone(*heard("PCMU", [payload for _, payload in into_pcmu]), 1000)
    into_wide = await send_and_receive(from_pcmu, wide_phone, tone_frames("PCMU", 700, 25), PCMU, 160)
    headers = [header for header, _ in into_wide]
    assert all(header.payload_type == wide_pt for header in headers)
    steps = {(later.timestamp - earlier.timestamp) % 2**32 for earlier, later in zip(headers, headers[1:])}
    assert steps == {wide_ticks}  # the partner's spacing, in this leg's RTP clock
    assert_tone(*heard(wide, [payload for _, payload in into_wide]), 700)


async def test_opus_and_g722_legs_keep_wideband_through_transcoding(engine, phones):
    from_opus, opus_phone, from_g722, g722_phone = await exchange(engine, phones, "OPUS", OPUS_PT, "G722", G722_PT)
    into_g722 = await send_and_receive(from_opus, g722_phone, tone_frames("OPUS", WIDE_HZ, 25), OPUS_PT, 960)
    assert_tone(*heard("G722", [payload for _, payload in into_g722]), WIDE_HZ)
    into_opus = await send_and_receive(from_g722, opus_phone, tone_frames("G722", WIDE_HZ, 25), G722_PT, 160)
    assert_tone(*heard("OPUS", [payload for _, payload in into_opus]), WIDE_HZ)


@pytest.mark.parametrize(("codec", "payload_type"), [("G722", G722_PT), ("OPUS", OPUS_PT), ("PCMA", 8)])
async def test_hold_audio_in_every_codec(engine, phones, codec, payload_type):
    phone = phones()
    leg = await leg_for(engine, phone, codec, payload_type)
    leg.hold()
    packets = await phone.receive_many(40)
    headers = [header for header, _ in packets]
    assert all(header.payload_type == payload_type for header in headers)
    steps = {(later.timestamp - earlier.timestamp) % 2**32 for earlier, later in zip(headers, headers[1:])}
    assert steps <= {lookup(codec).frame_ticks * n for n in (1, 2, 3, 4)}
    samples, rate = heard(codec, [payload for _, payload in packets])
    pedal = goertzel_db(samples[: rate // 2], rate, PAD_HZ)  # the music's steady pedal note
    assert pedal > goertzel_db(samples[: rate // 2], rate, 1209) + 20


# -- prompts mixed over a conversation --------------------------------------------------------

PROMPT_HZ = 1500.0


async def test_a_prompt_is_heard_over_the_partner_who_keeps_talking(engine, phones):
    phone_a, phone_b = phones(), phones()
    a, b = await leg_for(engine, phone_a), await leg_for(engine, phone_b)
    await pair(engine, a, b)
    from_b = Sender(phone_b, b, 0xB, 1, 1)
    voice = tone_frame(1000, "PCMU")
    from_b.send(voice)
    before = [await phone_a.receive()]
    a.play_over(tone(PROMPT_HZ, 0.5, 8000, 4000))

    async def talk() -> None:  # b keeps talking, one frame per 20 ms, through the prompt and after
        for _ in range(100):
            from_b.send(voice)
            await asyncio.sleep(0.02)

    talking = asyncio.create_task(talk())
    packets = []
    try:
        while not talking.done():
            packets.append(await phone_a.receive())
    except asyncio.TimeoutError:
        pass
    await talking
    await asyncio.sleep(0.1)  # the stream's tail arrives
    while True:
        try:
            packets.append(await phone_a.receive(timeout=0.05))
        except asyncio.TimeoutError:
            break
    headers = [header for header, _ in before + packets]
    assert {header.ssrc for header in headers} == {headers[0].ssrc}
    assert all(later.sequence == (earlier.sequence + 1) % 2**16 for earlier, later in zip(headers, headers[1:]))
    marked = [i for i, header in enumerate(headers) if header.marker]
    assert marked[0] == 0 and len(marked) == 3  # start of the stream, prompt starts, prompt ends
    mixed = [payload for _, payload in (before + packets)[marked[1] : marked[2]]]
    assert 24 <= len(mixed) <= 27  # the prompt's 25 frames, paced by our clock
    samples = g711.ulaw_decode(b"".join(mixed[3:])).astype(np.float64) / 32768
    partner_under = goertzel_db(samples, 8000, 1000)
    assert goertzel_db(samples, 8000, PROMPT_HZ) > -25 and partner_under > -32  # both heard
    after = [payload for _, payload in (before + packets)[marked[2] :]]
    assert len(after) > 20 and all(payload == voice for payload in after)  # relayed as is again
    partner_alone = goertzel_db(g711.ulaw_decode(b"".join(after)).astype(np.float64) / 32768, 8000, 1000)
    assert 8 < partner_alone - partner_under < 13  # ducked under the prompt (12 dB, less its ramps)
    # b hears none of it.
    await phone_b.assert_quiet()


async def test_a_prompt_over_hold_audio_pauses_the_hold_pattern(engine, phones):
    phone = phones()
    leg = await leg_for(engine, phone, "G722", G722_PT)
    leg.hold()
    await phone.receive_many(3)
    leg.play_over(tone(PROMPT_HZ, 0.3, 8000, 4000))
    packets = await phone.receive_many(15 + 25)
    samples, rate = heard("G722", [payload for _, payload in packets[:15]])
    assert_tone(samples, rate, PROMPT_HZ, others=(PAD_HZ,))
    assert packets[0][0].marker and packets[15][0].marker  # prompt in, hold pattern back
    hold, rate = heard("G722", [payload for _, payload in packets[15:]])
    assert goertzel_db(hold, rate, PAD_HZ) > goertzel_db(hold, rate, PROMPT_HZ) + 20


async def test_a_leg_whose_peer_holds_it_sends_nothing_not_even_a_prompt(engine, phones):
    phone = phones()
    leg = await leg_for(engine, phone, "G722", G722_PT)
    leg.hold()
    await phone.receive_many(3)
    leg.set_sending(False)  # the caller put us on hold (sendonly/inactive)
    await phone.drain()  # hold audio still in flight
    leg.play_over(tone(PROMPT_HZ, 0.3, 8000, 4000))
    await phone.assert_quiet()
    leg.set_sending(True)
    leg.hold()  # pairing tells it what to hear again
    assert len(await phone.receive_many(5)) == 5


async def test_each_prompt_that_ends_is_reported_once_and_a_replaced_one_never(engine, phones):
    phone = phones()
    leg = await leg_for(engine, phone)
    ended: list[float] = []
    leg.on_prompt_end = lambda: ended.append(asyncio.get_running_loop().time())
    leg.hold()
    started = asyncio.get_running_loop().time()
    leg.play_over(tone(PROMPT_HZ, 1.0, 8000, 4000))
    await asyncio.sleep(0.1)
    leg.play_over(tone(PROMPT_HZ, 0.2, 8000, 4000))  # replaces the first: only this one ends
    await until(lambda: len(ended) == 1)
    assert 0.25 < ended[0] - started < 0.6
    leg.play_over(np.zeros(0, dtype=np.int16))  # nothing to play ends at once
    await until(lambda: len(ended) == 2)
    leg.play_over(tone(PROMPT_HZ, 0.2, 8000, 4000))
    leg.hear_nothing()  # a prompt plays on over silence
    leg.set_sending(False)  # and ends even when the peer holds us
    await until(lambda: len(ended) == 3)
    leg.play_over(tone(PROMPT_HZ, 0.2, 8000, 4000))
    leg.close()  # a closed leg reports nothing more
    await asyncio.sleep(0.4)
    assert len(ended) == 3


# -- RTCP ------------------------------------------------------------------------------------------

RTCP_PHONE_PORT = BASE + 200  # the phone's RTP port; its RTCP socket takes the odd one above


async def test_rtcp_reports_stats_and_bye_on_loopback(engine, monkeypatch):
    monkeypatch.setattr(media, "report_interval", lambda: 0.3)
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind((HOST, RTCP_PHONE_PORT))
    rtcp.bind((HOST, RTCP_PHONE_PORT + 1))
    rtp.setblocking(False)
    rtcp.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        leg = await engine.open_leg()
        leg.start((HOST, RTCP_PHONE_PORT), lookup("PCMU"), PCMU, EVENT)
        leg.hold()
        sequences = [s for s in range(1000, 1050) if s not in (1010, 1020, 1030)]
        for sequence in sequences:
            packet = build_packet(PCMU, sequence, sequence * 160, 0x5151, tone_frame(1000, "PCMU"))
            rtp.sendto(packet, (HOST, leg.local_port))
        await until(lambda: leg.packets_in == len(sequences))
        our_ssrc = parse_header(await loop.sock_recv(rtp, 2048)).ssrc  # type: ignore[union-attr]
        # Our report arrives on the RTCP port: an SR (the leg sends hold audio) about the phone's stream.
        report = parse(await asyncio.wait_for(loop.sock_recv(rtcp, 2048), 2.0), 0x5151)
        assert report is not None and report.sender_ssrc == our_ssrc and report.sr_ntp_middle is not None
        assert report.about_us is not None and report.about_us.cumulative_lost == 3
        # The phone reports on the leg's stream: 7 lost, 160 ticks (20 ms) of jitter.
        reception = ReceptionStats(8000)
        for sequence in range(1, 51):
            if sequence % 7:
                reception.update(build_packet(PCMU, sequence, 0, our_ssrc), sequence * 0.02)
        rtcp.sendto(build_report(0x5151, b"phone", reception, 0.0, 0.0, None), (HOST, leg.local_port + 1))
        await until(lambda: leg.stats().peer_lost is not None)
        stats = leg.stats()
        assert (stats.packets_in, stats.packets_expected, stats.packets_lost) == (47, 50, 3)
        assert stats.loss_fraction == 0.06 and stats.peer_lost == 7 and stats.packets_out > 0
        leg.close()
        while True:  # the last packet on the RTCP port is a BYE
            last = await asyncio.wait_for(loop.sock_recv(rtcp, 2048), 2.0)
            parsed = parse(last, 0x5151)
            if parsed is not None and parsed.bye:
                break
    finally:
        rtp.close()
        rtcp.close()


async def test_30_ms_packets_into_opus_are_reframed_into_20_ms_frames(engine, phones):
    from_pcmu, pcmu_phone, from_opus, opus_phone = await exchange(engine, phones, "PCMU", PCMU, "OPUS", OPUS_PT)
    pcm = tone(700, 0.6, 8000)
    for first in range(0, len(pcm), 240):  # 20 packets of 30 ms
        from_pcmu.send(g711.ulaw_encode(pcm[first : first + 240]), PCMU, 240)
    from_pcmu.send(b"", PCMU, 0)  # an empty payload changes nothing
    received = await opus_phone.receive_many(30)
    await opus_phone.assert_quiet()
    headers = [header for header, _ in received]
    assert all(later.sequence == (earlier.sequence + 1) % 2**16 for earlier, later in zip(headers, headers[1:]))
    assert all((later.timestamp - earlier.timestamp) % 2**32 >= 960 for earlier, later in zip(headers, headers[1:]))
    assert_tone(*heard("OPUS", [payload for _, payload in received]), 700)


@pytest.mark.parametrize(("codec", "payload_type"), [("OPUS", OPUS_PT), ("G722", G722_PT), ("PCMA", 8)])
async def test_garbage_payloads_on_the_pcm_path_raise_nothing(engine, phones, codec, payload_type):
    problems: list[object] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: problems.append(context))
    rng = np.random.default_rng(7)
    phone_src, phone_pcmu, phone_wide = phones(), phones(), phones()
    source = await leg_for(engine, phone_src, codec, payload_type, event=None)  # in-band detection on
    pcmu = await leg_for(engine, phone_pcmu)
    wide = await leg_for(engine, phone_wide, "OPUS" if codec != "OPUS" else "G722", OPUS_PT if codec != "OPUS" else 9)
    pcmu.listen_to(source)
    wide.listen_to(source)
    sender = Sender(phone_src, source, 0x77, 0, 0)
    for _ in range(200):
        size = int(rng.integers(0, 400))
        sender.send(rng.integers(0, 256, size, dtype=np.uint8).tobytes(), payload_type, int(rng.integers(0, 2000)))
    await until(lambda: source.packets_in == 200)
    await asyncio.sleep(0.1)  # a quiet window: a late failure would show in `problems`
    assert problems == []
    await phone_pcmu.drain(limit=2000)
    frames = tone_frames(codec, 1000, 25)
    received = await send_and_receive(sender, phone_pcmu, frames, payload_type, lookup(codec).frame_ticks)
    assert_tone(*heard("PCMU", [payload for _, payload in received]), 1000)
