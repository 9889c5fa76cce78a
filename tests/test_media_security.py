"""Media attacks against the running service on loopback, and the NAT cases that must keep working.

Callers are raw SIP peers with plain RTP sockets; the attacker sends from 127.0.0.66, an address
neither the SDP nor the signalling names. What each side heard is checked by content (Goertzel).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from port_table import port_ranges
from rawsip import Dialer, RawPeer, address, serving, to_tag
from test_media import HOST, PCMU
from waiting import CONNECTING_SECONDS, until
from voiceline.app import VoiceLine
from voiceline.audio.g711 import ulaw_decode, ulaw_encode
from voiceline.audio.hold import hold_music
from voiceline.audio.media import MediaEngine
from voiceline.audio.rtcp import ReceptionStats, build_report
from voiceline.audio.rtp import build_packet, parse_header
from voiceline.codec_table import PCMU as PCMU_CODEC
from voiceline.journey_config import JourneyConfig, WelcomeConfig
from voiceline.config import Config, MediaConfig, SipConfig, StorageConfig
from voiceline.sim.analysis import goertzel_db
from voiceline.sip.sdp import parse_sdp

pytestmark = pytest.mark.integration

ATTACKER = "127.0.0.66"
NAT = "127.0.0.5"  # a caller's NAT: its SIP and RTP come from here, its SDP names 127.0.0.1
CALLER_HZ, PARTNER_HZ, ATTACKER_HZ = 697.0, 941.0, 1209.0
_port_blocks = port_ranges("test_media_security", 100)  # this file's RTP ports
SMALL_ENGINE_PORTS = next(_port_blocks)
Address = tuple[str, int]


def make_config(tmp_path: Path, ports: int = 40, **media: object) -> Config:
    low, _ = next(_port_blocks)
    return Config(
        sip=SipConfig(listen="127.0.0.1:0", answer_delay=0.05, t1=0.02),  # t1: unanswered BYEs at the end give up soon
        media=replace(MediaConfig(rtp_ports=f"{low}-{low + ports - 1}"), **media),  # type: ignore[arg-type]
        storage=StorageConfig(data_dir=str(tmp_path / "data")),
        journey=JourneyConfig(welcome=WelcomeConfig(enabled=False, offer_choice=False)),  # paired as soon as answered
    ).validate()


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[VoiceLine]:
    # The learning window is widened from 1.5 s so that a busy test machine cannot make the
    # caller's first packet later than a sprayer's probation (test_latch.py covers the window).
    async with serving(make_config(tmp_path, learning_seconds=5.0)) as app:
        yield app


class Phone(asyncio.DatagramProtocol):
    """An RTP socket on one loopback address: sends a mu-law tone, keeps every packet that arrives."""

    def __init__(self) -> None:
        self.packets: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, host: str = HOST) -> Phone:
        _, phone = await asyncio.get_running_loop().create_datagram_endpoint(cls, local_addr=(host, 0))
        return phone

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.packets.append(data)

    @property
    def address(self) -> Address:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")
        return host, port

    async def talk(self, dest: Address, hz: float, ssrc: int, first: int, count: int, pace: float = 0.01) -> int:
        """`count` 20 ms frames of a tone in sequence from `first` (its phase continuing with the
        sequence, so a stream resumed later is one tone); returns the next sequence number."""
        assert self.transport is not None
        for n in range(count):
            sequence = (first + n) % 65536
            samples = np.arange(sequence * 160, (sequence + 1) * 160)
            payload = ulaw_encode((8000 * np.sin(2 * np.pi * hz * samples / 8000)).astype(np.int16))
            self.transport.sendto(build_packet(PCMU, sequence, sequence * 160, ssrc, payload), dest)
            await asyncio.sleep(pace)
        return (first + count) % 65536

    def heard(self, since: int = 0) -> np.ndarray:
        """The audio of the packets received from index `since` on."""
        payloads = []
        for packet in self.packets[since:]:
            header = parse_header(packet)
            assert header is not None and header.payload_type == PCMU
            payloads.append(ulaw_decode(packet[header.payload_offset : header.payload_end]))
        return np.concatenate(payloads).astype(np.float64) / 32768 if payloads else np.zeros(0)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def assert_hears(samples: np.ndarray, hz: float, *absent: float) -> None:
    """`hz` is clearly there (the 8000/32768 tone reads about -12 dB) and every `absent` one is not."""
    level = goertzel_db(samples, 8000, hz)
    assert level > -25, level
    for other in absent:
        assert level - goertzel_db(samples, 8000, other) > 30, other


async def dial(server: Address, sip: RawPeer, sdp_port: int) -> Address:
    """A call whose SDP announces 127.0.0.1:`sdp_port`, answered and ACKed; returns our RTP address."""
    dialer = Dialer(sip, server)
    dialer.invite(rtp_port=sdp_port, formats="0 101")
    ok = await sip.response(status=200)
    dialer.ack(to_tag(ok))
    answer = parse_sdp(ok.body)
    return answer.connection or HOST, answer.media[0].port


class Party:
    """One caller: its SIP peer and RTP socket (on `host`), and the leg it reached."""

    def __init__(self, sip: RawPeer, phone: Phone) -> None:
        self.sip, self.phone = sip, phone
        self.leg: Address = ("", 0)

    @classmethod
    async def open(cls, host: str = HOST) -> Party:
        return cls(await RawPeer.open(host), await Phone.open(host))

    def close(self) -> None:
        self.sip.close()
        self.phone.close()


@pytest.fixture
async def parties() -> AsyncIterator[list[Party]]:
    """Callers and attackers made by the test, closed after it."""
    made: list[Party] = []
    yield made
    for party in made:
        party.close()


async def open_party(parties: list[Party], host: str = HOST) -> Party:
    parties.append(await Party.open(host))
    return parties[-1]


async def talking(service: VoiceLine, parties: list[Party], caller_host: str = HOST, sdp_port: int = 0) -> tuple[Party, Party]:
    """Partner A, then caller B (SIP and RTP from `caller_host`, SDP port `sdp_port` or its RTP
    socket's), both answered and paired, the hold audio heard before forgotten. Nobody has sent RTP yet."""
    server = address(service)
    partner, caller = await open_party(parties), await open_party(parties, caller_host)
    partner.leg = await dial(server, partner.sip, partner.phone.address[1])
    caller.leg = await dial(server, caller.sip, sdp_port or caller.phone.address[1])
    await until(lambda: service.ops.status()["lines"]["default"]["talking"] == 2, timeout=CONNECTING_SECONDS)
    await asyncio.sleep(0.05)  # hold frames still in flight
    partner.phone.packets.clear()
    caller.phone.packets.clear()
    return partner, caller


# -- attack 1: guessing the port and latching first ------------------------------------------


async def test_ports_of_consecutive_calls_are_not_in_order(tmp_path: Path, parties: list[Party]) -> None:
    async with serving(make_config(tmp_path, ports=100)) as app:
        party = await open_party(parties)
        ports = [(await dial(address(app), party.sip, 4000))[1] for _ in range(20)]
    low = int(app.config.media.rtp_ports.split("-")[0])
    assert len(set(ports)) == 20 and all(port % 2 == 0 and low <= port < low + 100 for port in ports)
    assert ports != sorted(ports) and ports != sorted(ports, reverse=True)
    # A guess of "the last port plus or minus two" is right about as often as any other guess.
    assert sum(abs(later - earlier) == 2 for earlier, later in zip(ports, ports[1:])) < 6


async def test_rtp_sprayed_before_the_callers_first_packet_is_never_relayed(
    service: VoiceLine, parties: list[Party]
) -> None:
    server = address(service)
    partner, caller = await open_party(parties), await open_party(parties)
    attacker = await open_party(parties, ATTACKER)
    partner.leg = await dial(server, partner.sip, partner.phone.address[1])
    # The caller's INVITE is answered: the attacker, who knows the port, sprays a good-looking stream
    # at it before the ACK and the caller's first packet, and keeps on while the two are paired.
    dialer = Dialer(caller.sip, server)
    dialer.invite(rtp_port=caller.phone.address[1], formats="0 101")
    ok = await caller.sip.response(status=200)
    caller.leg = (HOST, parse_sdp(ok.body).media[0].port)
    spray = await attacker.phone.talk(caller.leg, ATTACKER_HZ, 0x5EED, 1, 10)
    dialer.ack(to_tag(ok))
    await until(lambda: service.ops.status()["lines"]["default"]["talking"] == 2, timeout=CONNECTING_SECONDS)
    await asyncio.sleep(0.1)  # the connect prompts' last packet, sent as the two were bridged, arrives
    partner_heard = len(partner.phone.packets)
    spray = await attacker.phone.talk(caller.leg, ATTACKER_HZ, 0x5EED, spray, 20)
    caller_heard = len(caller.phone.packets)
    await partner.phone.talk(partner.leg, PARTNER_HZ, 0xA, 1, 25)  # the partner speaks first
    await asyncio.sleep(0.1)  # a quiet window: anything relayed would have arrived
    assert len(partner.phone.packets) == partner_heard  # nothing of the attacker's reached the partner
    assert_hears(caller.phone.heard(caller_heard), PARTNER_HZ, ATTACKER_HZ)  # sent to the SDP address
    caller_speaks = asyncio.create_task(caller.phone.talk(caller.leg, CALLER_HZ, 0xB, 1, 25))
    await attacker.phone.talk(caller.leg, ATTACKER_HZ, 0x5EED, spray, 25)
    await caller_speaks
    await partner.phone.talk(partner.leg, PARTNER_HZ, 0xA, 26, 25)
    await until(lambda: len(partner.phone.packets) - partner_heard >= 20)
    assert_hears(partner.phone.heard(partner_heard), CALLER_HZ, ATTACKER_HZ)
    assert_hears(caller.phone.heard(caller_heard), PARTNER_HZ, ATTACKER_HZ)
    assert attacker.phone.packets == []


# -- attack 3: taking over a quiet caller's stream --------------------------------------------


async def test_the_callers_ssrc_from_elsewhere_after_silence_does_not_take_over(
    service: VoiceLine, parties: list[Party]
) -> None:
    partner, caller = await talking(service, parties)
    attacker = await open_party(parties, ATTACKER)
    sequence = await caller.phone.talk(caller.leg, CALLER_HZ, 0xCA11, 100, 25)
    await asyncio.sleep(1.3)  # the caller is quiet
    partner_heard, caller_heard = len(partner.phone.packets), len(caller.phone.packets)
    # The attacker knows the caller's SSRC and continues its sequence numbers.
    takeover = asyncio.create_task(attacker.phone.talk(caller.leg, ATTACKER_HZ, 0xCA11, sequence, 50))
    await partner.phone.talk(partner.leg, PARTNER_HZ, 0xA, 1, 25)
    await takeover
    await asyncio.sleep(0.1)  # a quiet window: anything relayed would have arrived
    assert len(partner.phone.packets) == partner_heard and attacker.phone.packets == []
    await caller.phone.talk(caller.leg, CALLER_HZ, 0xCA11, sequence, 25)  # the caller speaks again
    await until(lambda: len(partner.phone.packets) - partner_heard >= 20)
    assert_hears(partner.phone.heard(partner_heard), CALLER_HZ, ATTACKER_HZ)
    assert_hears(caller.phone.heard(caller_heard), PARTNER_HZ)
    assert attacker.phone.packets == []


# -- NAT: callers whose RTP comes from elsewhere than their SDP says ----------------------------


async def test_a_caller_behind_nat_talks_from_its_signalling_address(service: VoiceLine, parties: list[Party]) -> None:
    announced = await Phone.open()  # the address in the caller's SDP, unreachable behind its NAT
    try:
        partner, caller = await talking(service, parties, caller_host=NAT, sdp_port=announced.address[1])
        announced.packets.clear()  # hold audio and the connect prompts, sent there before anything latched
        await caller.phone.talk(caller.leg, CALLER_HZ, 0xCA11, 1, 25)
        await partner.phone.talk(partner.leg, PARTNER_HZ, 0xA, 1, 25)
        await until(lambda: len(partner.phone.packets) >= 20 and len(caller.phone.packets) >= 20)
        assert_hears(partner.phone.heard(), CALLER_HZ)
        assert_hears(caller.phone.heard(), PARTNER_HZ)  # answered where its RTP came from
        assert len(announced.packets) < 25  # not the partner's voice
    finally:
        announced.close()


async def test_a_nat_rebinding_mid_call_keeps_the_conversation(service: VoiceLine, parties: list[Party]) -> None:
    partner, caller = await talking(service, parties, caller_host=NAT, sdp_port=4000)
    sequence = await caller.phone.talk(caller.leg, CALLER_HZ, 0xCA11, 1, 25, pace=0.02)
    rebound = await Phone.open(NAT)  # the NAT gives the caller's stream a new port, mid-sentence
    try:
        partner_heard = len(partner.phone.packets)
        await rebound.talk(caller.leg, CALLER_HZ, 0xCA11, sequence, 50, pace=0.02)
        assert len(partner.phone.packets) - partner_heard >= 15  # after the old port had been quiet a while
        assert_hears(partner.phone.heard(partner_heard), CALLER_HZ)
        old_port_heard = len(caller.phone.packets)
        await partner.phone.talk(partner.leg, PARTNER_HZ, 0xA, 1, 25)
        await until(lambda: len(rebound.packets) >= 20)
        assert_hears(rebound.heard(), PARTNER_HZ)
        assert len(caller.phone.packets) == old_port_heard
    finally:
        rebound.close()


async def test_a_caller_whose_media_comes_from_another_host_talks_after_probation(
    tmp_path: Path, parties: list[Party]
) -> None:
    async with serving(make_config(tmp_path, learning_seconds=0.3)) as app:
        partner, caller = await talking(app, parties, sdp_port=4000)
        media_server = await Phone.open("127.0.0.7")  # a carrier whose SDP and media disagree
        try:
            await asyncio.sleep(0.3)  # the learning window passes: the callers' own media had its chance
            sequence = await media_server.talk(caller.leg, CALLER_HZ, 0xCA11, 1, 3)  # too short a run
            await asyncio.sleep(0.1)  # a quiet window: anything relayed would have arrived
            assert partner.phone.packets == [] and media_server.packets == []
            await media_server.talk(caller.leg, CALLER_HZ, 0xCA11, sequence, 25)  # the fourth in sequence latches
            await partner.phone.talk(partner.leg, PARTNER_HZ, 0xA, 1, 25)
            await until(lambda: len(partner.phone.packets) >= 20 and len(media_server.packets) >= 20)
            assert_hears(partner.phone.heard(), CALLER_HZ)
            assert_hears(media_server.heard(), PARTNER_HZ)
        finally:
            media_server.close()


# -- RTCP ----------------------------------------------------------------------------------


async def test_rtcp_is_taken_only_from_the_latched_peers_host() -> None:
    engine = MediaEngine(HOST, (SMALL_ENGINE_PORTS[0], SMALL_ENGINE_PORTS[0] + 9), hold_music())
    phone, stranger = await Phone.open(), await Phone.open(ATTACKER)
    try:
        leg = await engine.open_leg()
        leg.start(phone.address, PCMU_CODEC, PCMU, None)
        leg.hold()
        await until(lambda: bool(phone.packets))
        header = parse_header(phone.packets[0])
        assert header is not None
        rtcp = (HOST, leg.local_port + 1)
        reception = ReceptionStats(8000)  # the phone's report on the leg's stream
        reception.update(build_packet(PCMU, 1, 0, header.ssrc), 0.0)
        report = build_report(0x5151, b"x", reception, 0.0, 0.0, None)
        assert phone.transport is not None and stranger.transport is not None
        phone.transport.sendto(report, rtcp)  # before the RTP latch: not yet
        await asyncio.sleep(0.1)  # a quiet window: the report has been read by now
        assert leg.stats().peer_lost is None
        await phone.talk((HOST, leg.local_port), CALLER_HZ, 0x5151, 1, 1)
        stranger.transport.sendto(report, rtcp)
        await asyncio.sleep(0.1)  # a quiet window: the report has been read by now
        assert leg.stats().peer_lost is None
        phone.transport.sendto(report, rtcp)
        await until(lambda: leg.stats().peer_lost is not None)
    finally:
        phone.close()
        stranger.close()
        engine.close()
        await asyncio.sleep(0)
