"""Media leg features on loopback with raw UDP phones: DTMF, partner changes, re-latching,
wideband codecs and transcoding, prompts mixed over a conversation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import numpy as np
import pytest
from test_dtmf import dtmf, silence
from test_media import HOST, PCMU, Phone, eventually, tone_frame

from voiceline.audio import g711
from voiceline.audio.dtmf import ToneDetector
from voiceline.audio.hold import chime_pattern
from voiceline.audio.media import MediaEngine, MediaLeg
from voiceline.audio.rtp import build_packet
from voiceline.sim.analysis import goertzel_db

PORTS = (42000, 42099)  # this module's share of the audio test range
EVENT = 101


@pytest.fixture
async def engine() -> AsyncIterator[MediaEngine]:
    engine = MediaEngine(HOST, PORTS, chime_pattern())
    yield engine
    engine.close()
    await asyncio.sleep(0)


@pytest.fixture
def phones() -> Iterator[Callable[[], Phone]]:
    made: list[Phone] = []

    def make() -> Phone:
        made.append(Phone())
        return made[-1]

    yield make
    for phone in made:
        phone.sock.close()


async def leg_for(
    engine: MediaEngine, phone: Phone, codec: str = "PCMU", payload_type: int = PCMU, event: int | None = EVENT
) -> MediaLeg:
    leg = await engine.open_leg()
    leg.start(phone.address, codec, payload_type, event)
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
