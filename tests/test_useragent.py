"""The real service in-process on loopback, driven by a bare UDP SIP peer."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from port_table import port_ranges
from rawsip import Dialer, RawPeer, address, serving
from waiting import CONNECTING_SECONDS, until
from voiceline.audio.hold import PAD_HZ
from voiceline.app import VoiceLine
from voiceline.journey_config import JourneyConfig, WelcomeConfig
from voiceline.config import Config, MediaConfig, SipConfig, StorageConfig
from voiceline.sip.message import parse_name_addr
from voiceline.sip.sdp import parse_sdp

pytestmark = pytest.mark.integration

_next_range = port_ranges("test_useragent", 20)  # this file's RTP ports


def make_config(tmp_path: Path, rtp_ports: int = 20, **sip: object) -> Config:
    low, _ = next(_next_range)
    return Config(
        # shutdown_timeout: stopping waits 1 s, not 4 s, for answers to BYEs the raw peers never give.
        sip=replace(SipConfig(listen="127.0.0.1:0", answer_delay=0.05, shutdown_timeout=1.0), **sip),  # type: ignore[arg-type]
        media=MediaConfig(rtp_ports=f"{low}-{low + rtp_ports - 1}"),
        storage=StorageConfig(data_dir=str(tmp_path / "data")),
        journey=JourneyConfig(welcome=WelcomeConfig(enabled=False, offer_choice=False)),  # paired as soon as answered
    ).validate()


def running(tmp_path: Path, rtp_ports: int = 20, **sip: object) -> contextlib.AbstractAsyncContextManager[VoiceLine]:
    return serving(make_config(tmp_path, rtp_ports, **sip))


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[VoiceLine]:
    async with running(tmp_path) as app:
        yield app


@pytest.fixture
async def peer() -> AsyncIterator[RawPeer]:
    p = await RawPeer.open()
    yield p
    p.close()


class RtpSink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.packets: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.packets.append(data)


async def rtp_sink() -> tuple[asyncio.DatagramTransport, RtpSink]:
    loop = asyncio.get_running_loop()
    transport, sink = await loop.create_datagram_endpoint(RtpSink, local_addr=("127.0.0.1", 0))
    return transport, sink


async def test_options_answered_with_allow(service: VoiceLine, peer: RawPeer) -> None:
    Dialer(peer, address(service)).out_of_dialog("OPTIONS")
    response = await peer.response()
    assert response.status == 200
    assert "INVITE" in response.headers.get_all("Allow")


async def test_unsupported_method_gets_405_with_allow(service: VoiceLine, peer: RawPeer) -> None:
    Dialer(peer, address(service)).out_of_dialog("SUBSCRIBE")
    response = await peer.response()
    assert response.status == 405 and "BYE" in response.headers.get_all("Allow")


async def test_bye_for_unknown_dialog_gets_481(service: VoiceLine, peer: RawPeer) -> None:
    dialer = Dialer(peer, address(service))
    dialer.to_tag = "nosuchtag"
    dialer.in_dialog("BYE")
    assert (await peer.response()).status == 481


async def test_garbage_is_dropped_and_service_keeps_answering(tmp_path: Path, peer: RawPeer) -> None:
    async with running(tmp_path, max_message_size=4096) as app:
        server = address(app)
        for junk in (b"\x00\xff" * 300, b"INVITE\r\n\r\n", b"SIP/2.0 200 OK\r\n\r\n", b"x" * 5000, b"\r\n\r\n"):
            peer.send(junk, server)
        Dialer(peer, server).out_of_dialog("OPTIONS")
        assert (await peer.response()).status == 200
        assert peer.raw and len(peer.raw) == 1  # nothing answered the garbage
        assert app.agent is not None
        assert app.agent.counters.oversized == 1 and app.agent.counters.malformed == 3


async def test_malformed_request_with_readable_headers_gets_400(service: VoiceLine, peer: RawPeer) -> None:
    server = address(service)
    peer.send(
        "OPTIONS sip:line@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};branch=z9hG4bKbad1\r\n"
        "From: <sip:anon@127.0.0.1>;tag=1\r\nTo: <sip:line@127.0.0.1>\r\n"
        "Call-ID: bad-cseq\r\nCSeq: notanumber OPTIONS\r\nContent-Length: 0\r\n\r\n",
        server,
    )
    await until(lambda: peer.raw)
    assert len(peer.raw) == 1 and peer.raw[0].startswith(b"SIP/2.0 400 ")
    assert b"Call-ID: bad-cseq" in peer.raw[0]


async def test_no_common_codec_gets_488(service: VoiceLine, peer: RawPeer) -> None:
    dialer = Dialer(peer, address(service))
    dialer.invite(rtp_port=4000, formats="18")
    response = await peer.response(status=488)
    dialer.ack(parse_name_addr(response.headers.get("To") or "").tag or "", for_error=True)
    await until(lambda: service.agent is not None and service.agent.core.calls == [])


async def test_call_is_answered_hears_hold_audio_and_ends_on_bye(service: VoiceLine, peer: RawPeer) -> None:
    rtp, sink = await rtp_sink()
    try:
        dialer = Dialer(peer, address(service))
        dialer.invite(rtp_port=rtp.get_extra_info("sockname")[1])
        await peer.response(status=100)
        ringing = await peer.response(status=180)
        ok = await peer.response(status=200)
        tag = parse_name_addr(ok.headers.get("To") or "").tag
        assert tag and parse_name_addr(ringing.headers.get("To") or "").tag == tag
        answer = parse_sdp(ok.body)
        assert answer.media[0].formats[0] == "0" and answer.connection == "127.0.0.1"
        dialer.ack(tag)
        server_rtp = (answer.connection, answer.media[0].port)
        for sequence in (*range(1, 11), *range(16, 26)):  # 5 of 25 lost on the way
            rtp.sendto(struct.pack("!BBHII", 0x80, 0, sequence, sequence * 160, 0x1234) + bytes(160), server_rtp)
        await until(lambda: len(sink.packets) >= 25)  # hold audio paced at 20 ms: half a second
        ssrcs = {struct.unpack_from("!I", p, 8)[0] for p in sink.packets}
        assert len(ssrcs) == 1
        assert service.ops.status()["lines"]["default"]["waiting"] == 1
        dialer.in_dialog("BYE")
        assert (await peer.response(method="BYE")).status == 200
        await until(lambda: service.ops.status()["lines"]["default"]["waiting"] == 0 and service.media is not None and service.media.legs == 0)
        assert service.storage is not None
        [hour] = await service.storage.hourly()  # the call counted anonymously, unpaired
        assert (hour["line"], hour["calls"], hour["paired"]) == ("default", 1, 0) and hour["wait_seconds"] > 0.4
        assert (hour["packets_expected"], hour["packets_lost"]) == (25, 5) and hour["jitter_ms_max"] >= 0
    finally:
        rtp.close()


async def test_invite_retransmission_does_not_make_a_second_call(service: VoiceLine, peer: RawPeer) -> None:
    dialer = Dialer(peer, address(service))
    dialer.invite(rtp_port=4000)
    await peer.response(status=100)
    dialer.resend_invite()
    dialer.resend_invite()
    ok = await peer.response(status=200)
    dialer.ack(parse_name_addr(ok.headers.get("To") or "").tag or "")
    await until(lambda: service.ops.status()["lines"]["default"]["waiting"] == 1)  # the ACK came after both retransmissions
    assert service.agent is not None and service.agent.counters.calls == 1
    assert len(service.agent.core.calls) == 1 and service.ops.status()["lines"]["default"]["waiting"] == 1


async def test_cancel_while_ringing_gets_487(tmp_path: Path, peer: RawPeer) -> None:
    async with running(tmp_path, answer_delay=2.0) as app:
        dialer = Dialer(peer, address(app))
        dialer.invite(rtp_port=4000)
        await peer.response(status=180)
        dialer.cancel()
        assert (await peer.response(method="CANCEL")).status == 200
        final = await peer.response(method="INVITE")
        assert final.status == 487
        dialer.ack(parse_name_addr(final.headers.get("To") or "").tag or "", for_error=True)
        await until(lambda: app.agent is not None and app.agent.core.calls == [] and app.media is not None and app.media.legs == 0)


async def test_lost_ack_retransmits_200_then_sends_bye(tmp_path: Path, peer: RawPeer) -> None:
    async with running(tmp_path, t1=0.02) as app:
        dialer = Dialer(peer, address(app))
        dialer.invite(rtp_port=4000)
        await peer.response(status=200)
        await peer.response(status=200)  # retransmitted (Timer G)
        bye = await peer.request("BYE", timeout=5)  # 64*T1 later, no ACK: we end the call
        assert bye.headers.get("Call-ID") == dialer.call_id
        assert app.agent is not None and app.agent.core.calls == []


async def test_shutdown_sends_bye_on_every_call(tmp_path: Path, peer: RawPeer) -> None:
    app = await VoiceLine.open(make_config(tmp_path))
    await app.start()
    dialer = Dialer(peer, address(app))
    dialer.invite(rtp_port=4000)
    ok = await peer.response(status=200)
    dialer.ack(parse_name_addr(ok.headers.get("To") or "").tag or "")
    await until(lambda: app.ops.status()["lines"]["default"]["waiting"] == 1)
    stopping = asyncio.create_task(app.stop())
    bye = await peer.request("BYE")
    peer.send(
        f"SIP/2.0 200 OK\r\nVia: {bye.headers.get('Via')}\r\nFrom: {bye.headers.get('From')}\r\n"
        f"To: {bye.headers.get('To')}\r\nCall-ID: {bye.headers.get('Call-ID')}\r\n"
        f"CSeq: {bye.headers.get('CSeq')}\r\nContent-Length: 0\r\n\r\n",
        address(app),
    )
    await asyncio.wait_for(stopping, 3)
    assert bye.headers.get("Call-ID") == dialer.call_id


async def answered_call(peer: RawPeer, server: tuple[str, int], rtp_port: int, formats: str) -> int:
    """Dial, take the 200, ACK it; returns the server's RTP port for this leg."""
    dialer = Dialer(peer, server)
    dialer.invite(rtp_port=rtp_port, formats=formats)
    ok = await peer.response(status=200)
    dialer.ack(parse_name_addr(ok.headers.get("To") or "").tag or "")
    return parse_sdp(ok.body).media[0].port


async def test_pcmu_caller_and_pcma_caller_hear_each_other_through_transcoding(
    service: VoiceLine, peer: RawPeer
) -> None:
    from voiceline.audio.g711 import alaw_decode, ulaw_encode
    from voiceline.audio.rtp import build_packet, parse_header
    from voiceline.sim.analysis import goertzel_db

    server = address(service)
    a_rtp, _ = await rtp_sink()
    b_rtp, b_sink = await rtp_sink()
    try:
        a_leg = await answered_call(peer, server, a_rtp.get_extra_info("sockname")[1], "0 101")
        await answered_call(peer, server, b_rtp.get_extra_info("sockname")[1], "8 101")
        await until(lambda: service.ops.status()["lines"]["default"]["talking"] == 2, timeout=CONNECTING_SECONDS)  # both confirmed, paired
        held = len(b_sink.packets)
        tone = (8000 * np.sin(2 * np.pi * 1000 * np.arange(160 * 50) / 8000)).astype(np.int16)
        for n in range(50):  # one second of PCMU from A, paced like a phone
            payload = ulaw_encode(tone[n * 160 : (n + 1) * 160])
            a_rtp.sendto(build_packet(0, 1000 + n, 160 * n, 0xA11CE, payload), ("127.0.0.1", a_leg))
            await asyncio.sleep(0.02)
        await until(lambda: len(b_sink.packets) - held >= 45)
        relayed = b_sink.packets[held:]
        headers = [parse_header(p) for p in relayed]
        assert len(relayed) >= 45 and all(h is not None and h.payload_type == 8 for h in headers)
        heard = np.concatenate([alaw_decode(p[12:]) for p in relayed])
        assert goertzel_db(heard, 8000, 1000) - goertzel_db(heard, 8000, PAD_HZ) > 30  # the partner, not hold music
        # One SSRC and a gap-free sequence across hold -> partner for B.
        all_headers = [parse_header(p) for p in b_sink.packets]
        assert len({h.ssrc for h in all_headers if h}) == 1
        seqs = [h.sequence for h in all_headers if h]
        assert all((b - a) & 0xFFFF == 1 for a, b in zip(seqs, seqs[1:]))
    finally:
        a_rtp.close()
        b_rtp.close()


async def test_reinvite_refresh_gets_the_same_answer_and_old_cseq_gets_500(service: VoiceLine, peer: RawPeer) -> None:
    dialer = Dialer(peer, address(service))
    dialer.invite(rtp_port=4000)
    ok = await peer.response(status=200)
    dialer.ack(parse_name_addr(ok.headers.get("To") or "").tag or "")
    dialer.in_dialog("INVITE", sdp_port=4000)
    refreshed = await peer.response(method="INVITE")
    assert refreshed.status == 200 and refreshed.body == ok.body
    dialer.ack(dialer.to_tag)
    with pytest.raises(TimeoutError):  # the ACK stopped the 200's retransmissions (first due after T1)
        await peer.response(method="INVITE", timeout=1.2)
    dialer.in_dialog("BYE", cseq=1)  # lower than the re-INVITE's CSeq
    assert (await peer.response(method="BYE")).status == 500
    dialer.in_dialog("BYE", cseq=5)
    assert (await peer.response(method="BYE")).status == 200


async def test_bye_before_ack_ends_the_call_and_the_200_retransmissions(tmp_path: Path, peer: RawPeer) -> None:
    async with running(tmp_path, t1=0.05) as app:
        dialer = Dialer(peer, address(app))
        dialer.invite(rtp_port=4000)
        ok = await peer.response(status=200)
        dialer.to_tag = parse_name_addr(ok.headers.get("To") or "").tag or ""
        dialer.in_dialog("BYE")
        assert (await peer.response(method="BYE")).status == 200
        await until(lambda: app.agent is not None and app.agent.calls == [])
        while not peer.inbox.empty():
            peer.inbox.get_nowait()
        with pytest.raises(TimeoutError):  # retransmissions were due every 50-200 ms
            await peer.response(method="INVITE", timeout=0.8)
        assert app.agent is not None and app.agent.core.calls == [] and app.media is not None and app.media.legs == 0


async def test_invite_without_contact_gets_400_through_its_transaction(service: VoiceLine, peer: RawPeer) -> None:
    dialer = Dialer(peer, address(service))
    dialer.invite(rtp_port=4000, contact=False)
    assert (await peer.response(status=400)).headers.get("Call-ID") == dialer.call_id
    dialer.resend_invite()  # a retransmission gets the same answer from the transaction
    assert (await peer.response(status=400)).headers.get("Call-ID") == dialer.call_id
    assert service.agent is not None and service.agent.core.calls == []


async def test_out_of_media_ports_gets_503_retransmitted_until_acked(tmp_path: Path, peer: RawPeer) -> None:
    async with running(tmp_path, rtp_ports=4, t1=0.05) as app:  # room for two legs
        for _ in range(2):  # answered and ACKed: no retransmission timers of theirs are due soon
            await answered_call(peer, address(app), 4000, "0")
        third = Dialer(peer, address(app))
        third.invite(rtp_port=4000)
        refused = await peer.response(status=503)
        assert refused.headers.get("Retry-After") and refused.headers.get("Call-ID") == third.call_id
        again = await peer.response(status=503)  # Timer G fired with no further traffic from us
        assert again.headers.get("Call-ID") == third.call_id
        third.ack(parse_name_addr(refused.headers.get("To") or "").tag or "", for_error=True)
        assert app.agent is not None and len(app.agent.core.calls) == 2


async def test_a_pair_s_waits_go_to_the_journey_statistics(service: VoiceLine, peer: RawPeer) -> None:
    written: list[tuple[str, dict[str, int], dict[str, float]]] = []

    async def record_journey(line: str, at: float, counts: Mapping[str, int], seconds: Mapping[str, float]) -> None:
        written.append((line, dict(counts), dict(seconds)))

    assert service.storage is not None
    service.storage.record_journey = record_journey  # type: ignore[method-assign]  # what storage makes of them is its own
    server = address(service)
    a_rtp, _ = await rtp_sink()
    b_rtp, _ = await rtp_sink()
    try:
        await answered_call(peer, server, a_rtp.get_extra_info("sockname")[1], "0 101")
        await until(lambda: service.ops.status()["lines"]["default"]["waiting"] == 1)
        await asyncio.sleep(0.5)  # A waits, B does not
        await answered_call(peer, server, b_rtp.get_extra_info("sockname")[1], "0 101")
        await until(lambda: bool(written))
        [(line, counts, seconds)] = written
        assert line == "default" and counts == {"wait_paired": 2} and 0.5 <= seconds["wait_paired"] < 3.0
    finally:
        a_rtp.close()
        b_rtp.close()
