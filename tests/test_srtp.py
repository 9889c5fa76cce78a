"""SDES-SRTP: a=crypto in SDP, the per-trunk policy, SRTP media legs, and the service on loopback
with raw SIP and raw SRTP peers (pylibsrtp stands in for the caller's SRTP stack)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pylibsrtp import Policy, Session

from port_table import port_block
from rawsip import Dialer, RawPeer, address, serving, to_tag
from test_media import HOST, PCMU, Phone, goertzel_power, phones, tone_frame  # phones: the fixture, shared
from test_privacy_canary import written_files
from waiting import until
from voiceline.audio import g711, media, srtp
from voiceline.audio.hold import hold_music
from voiceline.audio.media import MediaEngine, MediaLeg
from voiceline.audio.rtcp import ReceptionStats, build_report, parse
from voiceline.audio.rtp import build_packet, parse_header
from voiceline.audio.srtp import SrtpContext, SrtpKeys
from voiceline.codec_table import PCMU as PCMU_CODEC
from voiceline.config import from_mapping
from voiceline.routing import Trunk, TrunkError
from voiceline.sip.offer_answer import OfferAnswer
from voiceline.sip.sdp import (
    CRYPTO_KEY_LENGTH,
    CRYPTO_SUITES,
    Crypto,
    NoCommonCodec,
    SdpError,
    negotiate,
    parse_crypto,
    parse_sdp,
)

pytestmark = pytest.mark.integration

SUITE_80, SUITE_32 = "AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32"
CALLER_KEY = bytes(range(1, 31))  # the caller's master key || salt, as its SDP carries it
CALLER_INLINE = base64.b64encode(CALLER_KEY).decode()
BASE, LAST = port_block("test_srtp")
LEG_PORTS = (BASE, BASE + 99)  # this module's media legs
RTCP_PHONE_PORT = BASE + 100  # a phone's RTP port; its RTCP socket takes the odd one above
_service_ranges = iter(range(BASE + 120, LAST + 1, 20))
A_HZ, B_HZ = 700.0, 1200.0  # multiples of 50 Hz: tone_frame repeats exactly every frame


def sdp(proto: str = "RTP/SAVP", crypto: tuple[str, ...] = (f"1 {SUITE_80} inline:{CALLER_INLINE}",), port: int = 4000) -> bytes:
    return (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        f"m=audio {port} {proto} 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
        "a=fmtp:101 0-16\r\na=sendrecv\r\n" + "".join(f"a=crypto:{line}\r\n" for line in crypto)
    ).encode()


def plain_sdp(port: int = 4000) -> bytes:
    return sdp("RTP/AVP", (), port)


def answer_crypto(answer: bytes) -> tuple[str, Crypto]:
    """The answer's audio profile and its one a=crypto line."""
    (media_line,) = parse_sdp(answer).media
    (value,) = [value for name, value in media_line.attributes if name == "crypto"]
    crypto = parse_crypto(value or "")
    assert crypto is not None
    return media_line.proto, crypto


# -- a=crypto --------------------------------------------------------------------------------------


def test_crypto_attribute_round_trip_and_key_kept_out_of_repr() -> None:
    crypto = Crypto(7, SUITE_32, CALLER_KEY)
    assert crypto.attribute() == f"a=crypto:7 {SUITE_32} inline:{CALLER_INLINE}"
    assert parse_crypto(crypto.attribute().removeprefix("a=crypto:")) == crypto
    assert parse_crypto(f"1 {SUITE_80} inline:{CALLER_INLINE}|2^31") == Crypto(1, SUITE_80, CALLER_KEY)  # a lifetime
    assert CALLER_INLINE not in repr(crypto) and CALLER_INLINE not in repr(parse_sdp(sdp()))


@pytest.mark.parametrize(
    "value",
    [
        f"1 AES_256_CM_HMAC_SHA1_80 inline:{base64.b64encode(bytes(46)).decode()}",  # a suite we do not do
        f"1 {SUITE_80} inline:{CALLER_INLINE}|2^20|1:4",  # an MKI: we key by SDP alone
        f"1 {SUITE_80} inline:{CALLER_INLINE}|1:4",
        f"1 {SUITE_80} inline:{CALLER_INLINE};inline:{CALLER_INLINE}",  # several keys
        f"1 {SUITE_80} inline:{CALLER_INLINE} UNENCRYPTED_SRTP",  # session parameters
        f"1 {SUITE_80} inline:{base64.b64encode(bytes(20)).decode()}",  # too short
        f"1 {SUITE_80} inline:@@@@{CALLER_INLINE[4:]}",  # not base64
        f"1234567890 {SUITE_80} inline:{CALLER_INLINE}",  # a tag of more than 9 digits
        f"1 {SUITE_80}",
    ],
)
def test_crypto_lines_we_cannot_honour_are_not_used(value: str) -> None:
    assert parse_crypto(value) is None


def test_suite_names_agree_between_sdp_and_media() -> None:
    assert set(CRYPTO_SUITES) == set(srtp.SUITES) and CRYPTO_KEY_LENGTH == srtp.KEY_LENGTH


# -- negotiation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "offer", "outcome"),
    [
        ("off", plain_sdp(), "plain"),
        ("off", sdp(), "refused"),  # RFC 3264: the stream is declined, so no usable stream: 488
        ("optional", plain_sdp(), "plain"),
        ("optional", sdp(), "srtp"),
        ("optional", sdp("RTP/AVP"), "plain"),  # a=crypto means nothing outside SAVP (RFC 4568)
        ("required", sdp(), "srtp"),
        ("required", plain_sdp(), "refused"),
        ("required", sdp("RTP/AVP"), "refused"),
        ("required", sdp(crypto=(f"1 {SUITE_80} inline:{CALLER_INLINE}|1:4",)), "refused"),  # no usable key
        ("optional", sdp(crypto=()), "refused"),
    ],
)
def test_negotiation_follows_the_trunk_policy(policy: str, offer: bytes, outcome: str) -> None:
    if outcome == "refused":
        with pytest.raises(NoCommonCodec):
            negotiate(parse_sdp(offer), (PCMU_CODEC,), policy)
        return
    audio = negotiate(parse_sdp(offer), (PCMU_CODEC,), policy)
    assert (audio.crypto is not None) == (outcome == "srtp")


def test_answer_keeps_the_offers_tag_and_suite_with_our_own_key() -> None:
    offer = parse_sdp(
        sdp(
            crypto=(
                f"1 AES_256_CM_HMAC_SHA1_80 inline:{base64.b64encode(bytes(46)).decode()}",
                f"2 {SUITE_32} inline:{CALLER_INLINE}",
                f"3 {SUITE_80} inline:{CALLER_INLINE}",
            )
        )
    )
    session = OfferAnswer("127.0.0.1", (PCMU_CODEC,), local_port=20000, srtp="optional")
    answer = session.answer(offer, session.negotiate_offer(offer))
    proto, ours = answer_crypto(answer)
    assert proto == "RTP/SAVP" and (ours.tag, ours.suite) == (2, SUITE_32)  # the first suite we do
    assert ours.key == session.local_key and ours.key != CALLER_KEY and len(ours.key) == 30
    assert session.audio is not None and session.audio.crypto == Crypto(2, SUITE_32, CALLER_KEY)
    ours_text = base64.b64encode(ours.key).decode()
    for text in (repr(session), repr(session.audio)):
        assert ours_text not in text and CALLER_INLINE not in text and ours.key.hex() not in text


def test_reoffers_keep_keys_rekey_when_the_offer_does_and_never_drop_srtp() -> None:
    session = OfferAnswer("127.0.0.1", (PCMU_CODEC,), local_port=20000, srtp="optional")
    first = parse_sdp(sdp())
    answer = session.answer(first, session.negotiate_offer(first))
    again = parse_sdp(sdp())
    assert session.answer(again, session.negotiate_offer(again)) == answer  # a refresh: nothing changes
    new_key = secrets.token_bytes(30)
    rekeyed = parse_sdp(sdp(crypto=(f"1 {SUITE_80} inline:{base64.b64encode(new_key).decode()}",)))
    audio = session.negotiate_offer(rekeyed)
    assert audio.crypto is not None and audio.crypto.key == new_key
    _, ours = answer_crypto(session.answer(rekeyed, audio))
    assert ours.key == session.local_key  # our own key stays
    with pytest.raises(NoCommonCodec):  # a downgrade to plain RTP mid-call: 488, the call goes on as SRTP
        session.negotiate_offer(parse_sdp(plain_sdp()))
    plain = OfferAnswer("127.0.0.1", (PCMU_CODEC,), local_port=20000, srtp="optional")
    plain.answer(parse_sdp(plain_sdp()), plain.negotiate_offer(parse_sdp(plain_sdp())))
    with pytest.raises(NoCommonCodec):  # and a plain call stays plain
        plain.negotiate_offer(parse_sdp(sdp()))


def test_our_offers_follow_the_policy() -> None:
    required = OfferAnswer("127.0.0.1", (PCMU_CODEC,), local_port=20000, srtp="required")
    proto, ours = answer_crypto(required.offer())
    assert proto == "RTP/SAVP" and (ours.tag, ours.suite, ours.key) == (1, SUITE_80, required.local_key)
    with pytest.raises(SdpError):  # an answer must take the offered tag
        required.take_answer(sdp(crypto=(f"2 {SUITE_80} inline:{CALLER_INLINE}",)))
    required.offer()
    with pytest.raises(SdpError):  # and must not fall back to plain RTP
        required.take_answer(plain_sdp())
    required.offer()
    audio = required.take_answer(sdp())
    assert audio.crypto is not None and audio.crypto.key == CALLER_KEY
    assert answer_crypto(required.offer())[1] == ours  # a refresh offers the same again

    optional = OfferAnswer("127.0.0.1", (PCMU_CODEC,), local_port=20000, srtp="optional")
    assert b"RTP/AVP" in optional.offer() and b"a=crypto" not in optional.local_sdp  # a plain peer can answer
    assert optional.take_answer(plain_sdp()).crypto is None


def test_trunk_srtp_policy_is_checked_and_stored() -> None:
    with pytest.raises(TrunkError, match="srtp"):
        Trunk("carrier", sources=("192.0.2.1",), srtp="maybe")
    trunk = Trunk.from_settings("carrier", {"sources": ["192.0.2.1"], "srtp": "required"})
    assert trunk.srtp == "required" and Trunk.from_settings("carrier", trunk.settings()) == trunk
    assert Trunk("carrier", sources=("192.0.2.1",)).srtp == "off"


def test_trunk_srtp_from_the_command_line(tmp_path: Path) -> None:
    def voiceline(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "voiceline", *args, "--data-dir", str(tmp_path / "data")]
        return subprocess.run(command, capture_output=True, text=True, timeout=30)

    assert voiceline("trunk", "add", "carrier", "--source", "192.0.2.1", "--srtp", "required").returncode == 0
    assert '"srtp": "required"' in voiceline("trunk", "show", "carrier", "--json").stdout
    assert voiceline("trunk", "update", "carrier", "--srtp", "optional").returncode == 0
    assert '"srtp": "optional"' in voiceline("trunk", "show", "carrier", "--json").stdout
    assert voiceline("trunk", "update", "carrier", "--srtp", "sometimes").returncode == 2


# -- SRTP contexts and media legs ------------------------------------------------------------------


def peer_session(key: bytes, outbound: bool) -> Session:
    """The caller's own SRTP stack: libsrtp through pylibsrtp, independent of our SrtpContext."""
    ssrc_type = Policy.SSRC_ANY_OUTBOUND if outbound else Policy.SSRC_ANY_INBOUND
    return Session(Policy(key=key, ssrc_type=ssrc_type, srtp_profile=Policy.SRTP_PROFILE_AES128_CM_SHA1_80))


def test_protect_unprotect_round_trip_and_tampering_is_dropped() -> None:
    leg_key = secrets.token_bytes(30)
    context = SrtpContext(SrtpKeys(SUITE_80, send_key=leg_key, receive_key=CALLER_KEY))
    packet = build_packet(PCMU, 1, 160, 0x1234, tone_frame(A_HZ, "PCMU"))
    protected = context.protect(packet)
    assert protected is not None and protected != packet and len(protected) == len(packet) + 10
    assert peer_session(leg_key, outbound=False).unprotect(protected) == packet
    from_caller = peer_session(CALLER_KEY, outbound=True).protect(packet)
    assert context.unprotect(from_caller) == packet
    assert context.unprotect(from_caller) is None  # a replay
    tampered = bytearray(peer_session(CALLER_KEY, outbound=True).protect(build_packet(PCMU, 2, 320, 0x1234, bytes(160))))
    tampered[20] ^= 1
    assert context.unprotect(bytes(tampered)) is None
    assert context.unprotect(packet) is None  # plain RTP on an SRTP leg
    assert context.auth_failures == 3
    assert leg_key.hex() not in repr(context) and CALLER_INLINE not in repr(context.keys)


class SrtpPhone:
    """A raw UDP phone speaking SRTP with its own libsrtp sessions."""

    def __init__(self, phone: Phone, leg_key: bytes) -> None:
        self.phone = phone
        self._send = peer_session(CALLER_KEY, outbound=True)
        self._receive = peer_session(leg_key, outbound=False)
        self._sequence = 0

    def send_audio(self, leg: MediaLeg, payload: bytes, count: int = 1) -> None:
        for _ in range(count):
            packet = build_packet(PCMU, self._sequence, self._sequence * 160, 0xA0A0A0A0, payload)
            self.phone.send(leg, self._send.protect(packet))
            self._sequence += 1

    async def receive_pcm(self, count: int) -> np.ndarray:
        """`count` packets, each of which must authenticate with the leg's key, decoded."""
        frames = []
        for _ in range(count):
            data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.phone.sock, 2048), 2.0)
            packet = self._receive.unprotect(data)  # raises unless it is SRTP under the leg's key
            header = parse_header(packet)
            assert header is not None
            frames.append(g711.decoder("PCMU")(packet[header.payload_offset : header.payload_end]))
        return np.concatenate(frames)


async def receive_plain_pcm(phone: Phone, count: int) -> np.ndarray:
    frames = [payload for _, payload in await phone.receive_many(count)]
    return np.concatenate([g711.decoder("PCMU")(frame) for frame in frames])


def assert_tone(pcm: np.ndarray, hz: float, other: float) -> None:
    assert goertzel_power(pcm, hz) > 1000 * goertzel_power(pcm, other)


@pytest.fixture
async def engine() -> AsyncIterator[MediaEngine]:
    engine = MediaEngine(HOST, LEG_PORTS, hold_music())
    yield engine
    engine.close()
    await asyncio.sleep(0)


async def srtp_and_plain_legs(
    engine: MediaEngine, phones: Callable[[], Phone]
) -> tuple[SrtpPhone, MediaLeg, Phone, MediaLeg]:
    leg_key = secrets.token_bytes(30)
    secure_phone, plain_phone = SrtpPhone(phones(), leg_key), phones()
    secure, plain = await engine.open_leg(), await engine.open_leg()
    secure.start(secure_phone.phone.address, PCMU_CODEC, PCMU, 101, srtp=SrtpKeys(SUITE_80, leg_key, CALLER_KEY))
    plain.start(plain_phone.address, PCMU_CODEC, PCMU, 101)
    secure.listen_to(plain)
    plain.listen_to(secure)
    return secure_phone, secure, plain_phone, plain


async def test_an_srtp_leg_and_a_plain_leg_relay_to_each_other(engine, phones) -> None:
    secure_phone, secure, plain_phone, plain = await srtp_and_plain_legs(engine, phones)
    secure_phone.send_audio(secure, tone_frame(A_HZ, "PCMU"), count=10)
    assert_tone(await receive_plain_pcm(plain_phone, 10), A_HZ, B_HZ)  # decrypted for the plain side
    for _ in range(10):
        plain_phone.send_audio(plain, tone_frame(B_HZ, "PCMU"))
    assert_tone(await secure_phone.receive_pcm(10), B_HZ, A_HZ)  # encrypted with the leg's own key
    stats = secure.stats()
    assert (stats.srtp_suite, stats.srtp_auth_failures, stats.packets_in) == (SUITE_80, 0, 10)
    assert plain.stats().srtp_suite is None


async def test_forged_and_plain_packets_never_latch_or_reach_the_partner(engine, phones) -> None:
    secure_phone, secure, plain_phone, plain = await srtp_and_plain_legs(engine, phones)
    attacker = phones()
    forged = bytearray(peer_session(secrets.token_bytes(30), outbound=True).protect(
        build_packet(PCMU, 0, 0, 0xA0A0A0A0, tone_frame(B_HZ, "PCMU"))
    ))
    attacker.send(secure, bytes(forged))  # SRTP under a key the attacker made up
    attacker.send_audio(secure, tone_frame(B_HZ, "PCMU"))  # plain RTP sprayed at the port
    await until(lambda: secure.packets_dropped == 2)
    await plain_phone.assert_quiet()
    secure_phone.send_audio(secure, tone_frame(A_HZ, "PCMU"), count=5)
    assert_tone(await receive_plain_pcm(plain_phone, 5), A_HZ, B_HZ)
    plain_phone.send_audio(plain, tone_frame(B_HZ, "PCMU"), count=5)
    assert_tone(await secure_phone.receive_pcm(5), B_HZ, A_HZ)  # still to the real phone
    await attacker.assert_quiet()
    assert secure.stats().srtp_auth_failures == 2 and secure.packets_in == 5


async def test_srtcp_reports_both_ways(engine, monkeypatch) -> None:
    monkeypatch.setattr(media, "report_interval", lambda: 0.3)
    leg_key = secrets.token_bytes(30)
    rtp, rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    loop = asyncio.get_running_loop()
    try:
        rtp.bind((HOST, RTCP_PHONE_PORT))
        rtcp.bind((HOST, RTCP_PHONE_PORT + 1))
        rtcp.setblocking(False)
        leg = await engine.open_leg()
        leg.start((HOST, RTCP_PHONE_PORT), PCMU_CODEC, PCMU, 101, srtp=SrtpKeys(SUITE_80, leg_key, CALLER_KEY))
        leg.hold()  # it sends (hold audio), so its reports are SRs
        caller = peer_session(CALLER_KEY, outbound=True)
        rtp.sendto(caller.protect(build_packet(PCMU, 1, 0, 0x5151)), (HOST, leg.local_port))  # RTCP counts once RTP latched
        await until(lambda: leg.packets_in == 1)
        receive = peer_session(leg_key, outbound=False)
        report = parse(receive.unprotect_rtcp(await asyncio.wait_for(loop.sock_recv(rtcp, 2048), 2.0)), 0)
        assert report is not None and report.sr_ntp_middle is not None
        # The phone reports on the leg's stream: plain RTCP is ignored, SRTCP under its key is read.
        reception = ReceptionStats(8000)
        for sequence in range(1, 51):
            if sequence % 5:
                reception.update(build_packet(PCMU, sequence, 0, report.sender_ssrc), sequence * 0.02)
        phone_report = build_report(0x5151, b"phone", reception, 0.0, 0.0, None)
        rtcp.sendto(phone_report, (HOST, leg.local_port + 1))
        rtcp.sendto(caller.protect_rtcp(phone_report), (HOST, leg.local_port + 1))
        await until(lambda: leg.stats().peer_lost is not None)
        assert leg.stats().peer_lost == 9 and leg.stats().srtp_auth_failures == 1  # 5, 10 ... 45 missing
    finally:
        rtp.close()
        rtcp.close()


# -- the service on loopback -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def service(tmp_path: Path, policy: str, log_level: str = "info") -> AsyncIterator[Any]:
    low = next(_service_ranges)
    config = from_mapping(
        {
            "sip": {"listen": "127.0.0.1:0", "answer_delay": 0.05},
            "media": {"rtp_ports": f"{low}-{low + 19}"},
            "storage": {"data_dir": str(tmp_path / "data")},
            "trunks": [{"name": "carrier", "sources": ["127.0.0.0/8"], "srtp": policy}],
            "log": {"level": log_level},
        }
    )
    async with serving(config) as app:
        yield app


def send_sdp(dialer: Dialer, method: str, body: bytes) -> None:
    """An INVITE with `body` as its offer, or an ACK with it as the answer (Dialer writes plain SDP only)."""
    branch = "z9hG4bK" + secrets.token_hex(6)
    if method == "INVITE":
        dialer.branch = branch
    head = dialer._headers(method, branch, dialer.cseq, dialer.to_tag)
    text = f"{method} {dialer.request_uri} SIP/2.0\r\n{head}Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n"
    dialer.peer.send(text.encode() + body, dialer.server)


@pytest.mark.parametrize(
    ("policy", "offer", "status"),
    [("required", plain_sdp(), 488), ("off", sdp(), 488), ("optional", sdp(), 200), ("optional", plain_sdp(), 200)],
)
async def test_the_service_answers_offers_by_trunk_policy(tmp_path: Path, policy: str, offer: bytes, status: int) -> None:
    async with service(tmp_path, policy) as app:
        peer = await RawPeer.open()
        try:
            dialer = Dialer(peer, address(app))
            send_sdp(dialer, "INVITE", offer)
            response = await peer.response()
            while response.status < 200:
                response = await peer.response()
            assert response.status == status
            if status == 200:  # answered in kind: SAVP with our a=crypto, or plain without one
                assert (b"RTP/SAVP" in response.body) == (b"RTP/SAVP" in offer)
                assert (b"a=crypto:1 " + SUITE_80.encode() in response.body) == (b"RTP/SAVP" in offer)
            dialer.ack(to_tag(response), for_error=status != 200)
            if status == 200:
                dialer.in_dialog("BYE")
                await peer.response(200, "BYE")
        finally:
            peer.close()


async def test_an_srtp_caller_hears_hold_audio_under_the_answers_key_and_rekeys(tmp_path: Path) -> None:
    async with service(tmp_path, "required") as app:
        peer = await RawPeer.open()
        rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            rtp.bind((HOST, 0))
            rtp.setblocking(False)
            dialer = Dialer(peer, address(app))
            send_sdp(dialer, "INVITE", sdp(port=rtp.getsockname()[1]))
            answer = await peer.response(200)
            dialer.ack(to_tag(answer))
            _, ours = answer_crypto(answer.body)
            server_rtp = (HOST, parse_sdp(answer.body).media[0].port)
            receive = peer_session(ours.key, outbound=False)
            loop = asyncio.get_running_loop()
            for _ in range(5):  # alone on the line: hold audio, each packet authentic under our key
                packet = receive.unprotect(await asyncio.wait_for(loop.sock_recv(rtp, 2048), 2.0))
                assert parse_header(packet) is not None
            send = peer_session(CALLER_KEY, outbound=True)
            for sequence in range(3):
                rtp.sendto(send.protect(build_packet(PCMU, sequence, sequence * 160, 7, bytes(160))), server_rtp)
            assert app.calls is not None
            (leg,) = (live.leg for live in app.calls.live.values())
            await until(lambda: leg.packets_in == 3)
            assert leg.stats().srtp_suite == SUITE_80
            # The caller rekeys with a re-INVITE: its old key stops working, the new one works, ours stays.
            new_key = secrets.token_bytes(30)
            offer = sdp(crypto=(f"1 {SUITE_80} inline:{base64.b64encode(new_key).decode()}",), port=rtp.getsockname()[1])
            dialer.in_dialog("INVITE", body=offer.decode(), content_type="application/sdp")
            assert answer_crypto((await peer.response(200, "INVITE")).body)[1] == ours
            dialer.ack(dialer.to_tag)
            rtp.sendto(send.protect(build_packet(PCMU, 3, 480, 7, bytes(160))), server_rtp)
            await until(lambda: leg.stats().srtp_auth_failures == 1)
            rekeyed = peer_session(new_key, outbound=True)
            rtp.sendto(rekeyed.protect(build_packet(PCMU, 4, 640, 7, bytes(160))), server_rtp)
            await until(lambda: leg.packets_in == 4)
            dialer.in_dialog("BYE")
            await peer.response(200, "BYE")
        finally:
            rtp.close()
            peer.close()


async def test_a_required_trunk_offers_srtp_in_its_own_offer(tmp_path: Path) -> None:
    async with service(tmp_path, "required") as app:
        peer = await RawPeer.open()
        rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            rtp.bind((HOST, 0))
            rtp.setblocking(False)
            dialer = Dialer(peer, address(app))
            dialer.invite(None)  # no offer: ours comes in the 200, the answer in the ACK
            offer = await peer.response(200)
            proto, ours = answer_crypto(offer.body)
            assert proto == "RTP/SAVP" and (ours.tag, ours.suite) == (1, SUITE_80)
            dialer.to_tag = to_tag(offer)
            send_sdp(dialer, "ACK", sdp(port=rtp.getsockname()[1]))
            receive = peer_session(ours.key, outbound=False)  # hold audio under the key we offered
            packet = receive.unprotect(await asyncio.wait_for(asyncio.get_running_loop().sock_recv(rtp, 2048), 2.0))
            assert parse_header(packet) is not None
            dialer.in_dialog("BYE")
            await peer.response(200, "BYE")
        finally:
            rtp.close()
            peer.close()


def key_forms(key: bytes) -> list[bytes]:
    """How a master key (and its master-key part alone) could be written out."""
    forms = []
    for part in (key, key[:16]):
        encoded = base64.b64encode(part)
        forms += [part, encoded, encoded.rstrip(b"="), part.hex().encode(), part.hex().upper().encode(), repr(part).encode()]
    return forms


async def test_srtp_keys_are_written_nowhere(voiceline_server: Callable[..., Any]) -> None:
    server = voiceline_server(
        {
            "sip": {"answer_delay": 0.05},
            "log": {"level": "debug"},
            "trunks": [{"name": "carrier", "sources": ["127.0.0.0/8"], "srtp": "optional"}],
        }
    )
    caller_keys = [secrets.token_bytes(30) for _ in range(3)]
    inline = [base64.b64encode(key).decode() for key in caller_keys]
    peer = await RawPeer.open()
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rtp.bind((HOST, 0))
        port = rtp.getsockname()[1]
        dialer = Dialer(peer, (server.host, server.port))
        send_sdp(dialer, "INVITE", sdp(crypto=(f"1 {SUITE_80} inline:{inline[0]}",), port=port))
        answer = await peer.response(200)
        dialer.ack(to_tag(answer))
        _, ours = answer_crypto(answer.body)
        server_rtp = (HOST, parse_sdp(answer.body).media[0].port)
        # A re-INVITE that rekeys, and SRTP under the new key.
        dialer.in_dialog("INVITE", body=sdp(crypto=(f"1 {SUITE_80} inline:{inline[1]}",), port=port).decode(),
                         content_type="application/sdp")  # fmt: skip
        assert answer_crypto((await peer.response(200, "INVITE")).body)[1] == ours
        dialer.ack(dialer.to_tag)
        send = peer_session(caller_keys[1], outbound=True)
        for sequence in range(20):
            rtp.sendto(send.protect(build_packet(PCMU, sequence, sequence * 160, 7, bytes(160))), server_rtp)
        # A re-INVITE that tries plain RTP (488), a new call whose only key has an MKI (488).
        dialer.in_dialog("INVITE", body=plain_sdp(port).decode(), content_type="application/sdp")
        await peer.response(488, "INVITE")
        dialer.ack(dialer.to_tag, for_error=True)
        refused = Dialer(peer, (server.host, server.port))
        send_sdp(refused, "INVITE", sdp(crypto=(f"1 {SUITE_80} inline:{inline[2]}|2^20|1:4",), port=port))
        refused.ack(to_tag(await peer.response(488, "INVITE")), for_error=True)
        dialer.in_dialog("BYE")
        await peer.response(200, "BYE")
    finally:
        rtp.close()
        peer.close()
    assert server.stop() == 0
    events = [e["event"] for e in server.log_events()]
    assert "sip.request" in events and "call.media_stats" in events  # debug lines were written too
    (stats,) = [e for e in server.log_events() if e["event"] == "call.media_stats"]
    assert stats["srtp_suite"] == SUITE_80  # the call ran SRTP (its media is checked in-process above)
    files = written_files(server.data_dir, server.log_path.parent)
    assert any(f.name == "voiceline.db" for f in files) and server.log_path in files
    forms = [form for key in (*caller_keys, ours.key) for form in key_forms(key)]
    for path in files:
        if path.suffix == ".toml":
            continue  # the test's own config file
        content = path.read_bytes()
        assert not [form for form in forms if form in content], f"{path.name} holds an SRTP key"
