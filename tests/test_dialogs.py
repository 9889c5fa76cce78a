"""Dialog features against the real service in-process: re-INVITE/UPDATE offers (hold, resume,
new address), offerless INVITEs, glare, INFO DTMF, session timers, reaping and drain.

Driven by bare UDP SIP peers (tests/rawsip.py) and plain RTP sockets; audio checked by content.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from port_table import port_ranges
from rawsip import Dialer, RawPeer, address, serving, to_tag
from waiting import CONNECTING_SECONDS, until
from voiceline.app import VoiceLine
from voiceline.audio.g711 import ulaw_decode, ulaw_encode
from voiceline.audio.hold import PAD_HZ
from voiceline.audio.rtp import build_packet
from voiceline.journey_config import JourneyConfig, WelcomeConfig
from voiceline.config import Config, MediaConfig, SipConfig, StorageConfig
from voiceline.sim.analysis import goertzel_db
from voiceline.sip.message import SipResponse, parse_via, response_to, serialize
from voiceline.sip.sdp import parse_sdp
from voiceline.sip.core import Call

pytestmark = pytest.mark.integration

_next_range = port_ranges("test_dialogs", 20)  # this file's RTP ports
TONE_HZ = 1000.0


def make_config(tmp_path: Path, media: dict[str, object] | None = None, **sip: object) -> Config:
    low, high = next(_next_range)
    # A short T1: our BYEs to peers that never answer give up (Timer F) soon, so shutdown is quick.
    return Config(
        sip=replace(SipConfig(listen="127.0.0.1:0", answer_delay=0.05, t1=0.03), **sip),  # type: ignore[arg-type]
        media=replace(MediaConfig(rtp_ports=f"{low}-{high}"), **(media or {})),  # type: ignore[arg-type]
        storage=StorageConfig(data_dir=str(tmp_path / "data")),
        journey=JourneyConfig(welcome=WelcomeConfig(enabled=False, offer_choice=False)),  # paired as soon as answered
    ).validate()


def running(
    tmp_path: Path, media: dict[str, object] | None = None, **sip: object
) -> contextlib.AbstractAsyncContextManager[VoiceLine]:
    return serving(make_config(tmp_path, media, **sip))


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[VoiceLine]:
    async with running(tmp_path) as app:
        yield app


@pytest.fixture
async def peer() -> AsyncIterator[RawPeer]:
    p = await RawPeer.open()
    yield p
    p.close()


def the_call(app: VoiceLine) -> Call:
    assert app.agent is not None
    [call] = app.agent.core.calls
    return call


class Phone(asyncio.DatagramProtocol):
    """A caller's RTP: records what it hears and, when asked, speaks a tone paced at 20 ms."""

    def __init__(self) -> None:
        self.heard: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.server_port = 0
        self._speaking: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls) -> Phone:
        _, phone = await asyncio.get_running_loop().create_datagram_endpoint(cls, local_addr=("127.0.0.1", 0))
        return phone

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.heard.append(data)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def speak(self, hz: float) -> None:
        self._speaking = asyncio.get_running_loop().create_task(self._speak(hz))

    async def _speak(self, hz: float) -> None:
        tone = (8000 * np.sin(2 * np.pi * hz * np.arange(160 * 50) / 8000)).astype(np.int16)
        ssrc = secrets.randbits(32)
        for n in range(3000):  # at most a minute
            frame = tone[(n % 50) * 160 : (n % 50 + 1) * 160]
            assert self.transport is not None
            self.transport.sendto(build_packet(0, n, 160 * n, ssrc, ulaw_encode(frame)), ("127.0.0.1", self.server_port))
            await asyncio.sleep(0.02)

    async def listen(self, seconds: float) -> np.ndarray:
        """What it hears over the next `seconds` (PCMU decoded)."""
        start = len(self.heard)
        await asyncio.sleep(seconds)
        packets = self.heard[start:]
        return np.concatenate([ulaw_decode(p[12:]) for p in packets]) if packets else np.zeros(0, np.int16)

    def close(self) -> None:
        if self._speaking is not None:
            self._speaking.cancel()
        if self.transport is not None:
            self.transport.close()


async def call_in(peer: RawPeer, server: tuple[str, int], phone: Phone, extra: str = "") -> tuple[Dialer, SipResponse]:
    dialer = Dialer(peer, server)
    dialer.invite(rtp_port=phone.port, formats="0 101", extra=extra)
    ok = await peer.response(status=200, method="INVITE")
    dialer.ack(to_tag(ok))
    phone.server_port = parse_sdp(ok.body).media[0].port
    return dialer, ok


def direction(sdp: bytes) -> str:
    attributes = [name for name, _ in parse_sdp(sdp).media[0].attributes]
    return next(a for a in attributes if a in ("sendrecv", "sendonly", "recvonly", "inactive"))


def is_tone(samples: np.ndarray, hz: float) -> bool:
    return len(samples) > 1600 and goertzel_db(samples, 8000, hz) - goertzel_db(samples, 8000, PAD_HZ) > 20


def is_hold_audio(samples: np.ndarray) -> bool:
    return len(samples) > 1600 and goertzel_db(samples, 8000, PAD_HZ) - goertzel_db(samples, 8000, TONE_HZ) > 20


async def test_reinvite_hold_plays_hold_audio_to_the_partner_and_resume_restores_the_bridge(
    service: VoiceLine, peer: RawPeer
) -> None:
    server = address(service)
    a, b = await Phone.open(), await Phone.open()
    peer_b = await RawPeer.open()
    try:
        dialer_a, _ = await call_in(peer, server, a)
        await call_in(peer_b, server, b)
        a.speak(TONE_HZ)
        b.speak(TONE_HZ)
        await until(lambda: service.ops.status()["lines"]["default"]["talking"] == 2, timeout=CONNECTING_SECONDS)
        assert is_tone(await b.listen(0.6), TONE_HZ)  # talking: B hears A

        dialer_a.in_dialog("INVITE", sdp_port=a.port, direction="sendonly")  # A puts the line on hold
        held = await peer.response(method="INVITE")
        assert held.status == 200 and direction(held.body) == "recvonly"
        dialer_a.ack(dialer_a.to_tag)
        await asyncio.sleep(0.2)  # A's tone already on its way to B drains before B listens
        assert is_hold_audio(await b.listen(0.8))  # the partner hears hold audio, still paired
        assert len(await a.listen(0.5)) == 0  # and nothing is sent to the held caller
        assert service.ops.status()["lines"]["default"]["talking"] == 2 and service.ops.status()["lines"]["default"]["waiting"] == 0

        dialer_a.in_dialog("INVITE", sdp_port=a.port, direction="sendrecv")  # resume
        resumed = await peer.response(method="INVITE")
        assert resumed.status == 200 and direction(resumed.body) == "sendrecv"
        dialer_a.ack(dialer_a.to_tag)
        await asyncio.sleep(0.2)  # hold audio already on its way drains before they listen
        assert is_tone(await b.listen(0.6), TONE_HZ)  # the bridge is back both ways
        assert is_tone(await a.listen(0.6), TONE_HZ)
        # The answer's version went up with each change (RFC 3264 8).
        versions = [parse_sdp(r.body).origin.split()[2] for r in (held, resumed)]
        assert int(versions[1]) == int(versions[0]) + 1
    finally:
        for phone in (a, b):
            phone.close()
        peer_b.close()


def in_pool(service: VoiceLine) -> int:
    """Callers of the default line its pool may pair now (a held one is not among them)."""
    assert service.calls is not None
    journeys = service.calls.lines["default"].journeys
    return sum(1 for call in service.calls.live if (journey := journeys.journey(call)) is not None and journey.seeking)


async def test_inactive_update_holds_and_reinvite_without_sdp_offers_in_the_200(service: VoiceLine, peer: RawPeer) -> None:
    phone = await Phone.open()
    try:
        dialer, _ = await call_in(peer, address(service), phone)
        assert len(await phone.listen(0.3)) > 5  # waiting: hold audio
        dialer.in_dialog("UPDATE", sdp_port=phone.port, direction="inactive")
        update = await peer.response(method="UPDATE")
        assert update.status == 200 and direction(update.body) == "inactive"
        await asyncio.sleep(0.1)  # hold audio already on its way drains before the phone listens
        assert len(await phone.listen(0.4)) == 0 and the_call(service).on_hold
        assert in_pool(service) == 0  # a held caller is paired with nobody

        dialer.in_dialog("INVITE")  # no SDP: we offer, the ACK answers
        offer = await peer.response(method="INVITE")
        assert offer.status == 200 and direction(offer.body) == "sendrecv"
        assert parse_sdp(offer.body).media[0].formats[0] == "0"  # the call's codec
        dialer.ack(dialer.to_tag, sdp_port=phone.port, direction="sendrecv")
        await until(lambda: not the_call(service).on_hold and in_pool(service) == 1)
        assert is_hold_audio(await phone.listen(0.8))  # waiting again, hearing hold audio
    finally:
        phone.close()


async def test_update_moves_media_to_a_new_address(service: VoiceLine, peer: RawPeer) -> None:
    first, second = await Phone.open(), await Phone.open()
    try:
        dialer, _ = await call_in(peer, address(service), first)
        assert len(await first.listen(0.3)) > 5
        dialer.in_dialog("UPDATE", sdp_port=second.port)
        assert (await peer.response(method="UPDATE")).status == 200
        await asyncio.sleep(0.1)  # audio already on its way to the first address drains
        assert len(await second.listen(0.4)) > 10
        assert len(await first.listen(0.3)) == 0
    finally:
        first.close()
        second.close()


async def test_offerless_invite_gets_our_offer_and_the_ack_answers(service: VoiceLine, peer: RawPeer) -> None:
    phone = await Phone.open()
    try:
        dialer = Dialer(peer, address(service))
        dialer.invite(rtp_port=None)
        ok = await peer.response(status=200)
        offer = parse_sdp(ok.body)
        assert offer.media[0].formats == ["0", "8", "9", "111", "101"] and direction(ok.body) == "sendrecv"
        assert b"a=rtpmap:9 G722/8000\r\n" in ok.body and b"a=rtpmap:111 opus/48000/2\r\n" in ok.body
        dialer.ack(to_tag(ok), sdp_port=phone.port)
        await until(lambda: service.ops.status()["lines"]["default"]["waiting"] == 1)
        assert is_hold_audio(await phone.listen(0.8))
    finally:
        phone.close()


async def test_offerless_invite_whose_ack_has_no_answer_is_ended_with_bye(service: VoiceLine, peer: RawPeer) -> None:
    dialer = Dialer(peer, address(service))
    dialer.invite(rtp_port=None)
    ok = await peer.response(status=200)
    dialer.ack(to_tag(ok))
    bye = await peer.request("BYE")
    assert bye.headers.get("Call-ID") == dialer.call_id
    assert service.agent is not None and service.agent.core.calls == []


async def test_glare_gets_491(service: VoiceLine, peer: RawPeer) -> None:
    dialer, _ = await call_in(peer, address(service), await Phone.open())
    dialer.in_dialog("INVITE")  # offerless: our offer is pending until the ACK
    assert (await peer.response(method="INVITE")).status == 200
    dialer.in_dialog("UPDATE", sdp_port=4000)  # an offer while ours is unanswered
    assert (await peer.response(method="UPDATE")).status == 491
    dialer.in_dialog("INVITE", sdp_port=4000)  # a second re-INVITE before the first's ACK
    assert (await peer.response(method="INVITE")).status == 491
    dialer.in_dialog("UPDATE")  # a refresh without an offer is fine
    assert (await peer.response(method="UPDATE")).status == 200


async def test_reinvite_with_another_codec_gets_488_and_the_session_goes_on(service: VoiceLine, peer: RawPeer) -> None:
    phone = await Phone.open()
    try:
        dialer, _ = await call_in(peer, address(service), phone)  # PCMU
        dialer.in_dialog("INVITE", body=f"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                         f"m=audio {phone.port} RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n", content_type="application/sdp")
        refused = await peer.response(method="INVITE")
        assert refused.status == 488
        dialer.ack(to_tag(refused), for_error=True)
        assert len(await phone.listen(0.3)) > 5 and the_call(service).audio.codec.name == "PCMU"  # type: ignore[union-attr]
    finally:
        phone.close()


async def test_info_dtmf_relay_reaches_the_handler(service: VoiceLine, peer: RawPeer) -> None:
    digits: list[tuple[str, str]] = []
    assert service.calls is not None
    service.calls.call_dtmf = lambda call, digit: digits.append((call.id, digit))  # type: ignore[method-assign]
    dialer, _ = await call_in(peer, address(service), await Phone.open())
    await until(lambda: service.ops.status()["lines"]["default"]["waiting"] == 1)
    dialer.in_dialog("INFO", body="Signal=5\r\nDuration=160\r\n", content_type="application/dtmf-relay")
    assert (await peer.response(method="INFO")).status == 200
    dialer.in_dialog("INFO", body="#", content_type="application/dtmf")
    assert (await peer.response(method="INFO")).status == 200
    dialer.in_dialog("INFO", body="Signal=Z\r\n", content_type="application/dtmf-relay")
    assert (await peer.response(method="INFO")).status == 400
    dialer.in_dialog("INFO", body="<xml/>", content_type="application/media_control+xml")
    unsupported = await peer.response(method="INFO")
    assert unsupported.status == 415 and "application/dtmf-relay" in (unsupported.headers.get("Accept") or "")
    dialer.in_dialog("INFO")  # empty: a keep-alive
    assert (await peer.response(method="INFO")).status == 200
    call_id = the_call(service).id
    assert digits == [(call_id, "5"), (call_id, "#")]


async def test_merged_invite_gets_482_and_too_small_session_interval_gets_422(service: VoiceLine, peer: RawPeer) -> None:
    dialer = Dialer(peer, address(service))
    dialer.invite(rtp_port=4000)
    await peer.response(status=100)
    # The same request reaching us by a second path: same From tag, Call-ID and CSeq, another branch.
    dialer.invite(rtp_port=4000)
    assert (await peer.response(status=482)).headers.get("Call-ID") == dialer.call_id
    small = Dialer(peer, address(service))
    small.invite(rtp_port=4000, extra="Session-Expires: 30\r\nSupported: timer\r\n")
    too_small = await peer.response(status=422)
    assert too_small.headers.get("Min-SE") == "90"


async def test_record_route_is_echoed_and_our_bye_follows_the_route_set(tmp_path: Path, peer: RawPeer) -> None:
    proxy = await RawPeer.open()
    try:
        async with running(tmp_path, max_call_duration=0.5) as app:
            route = f"<sip:127.0.0.1:{proxy.port};lr>"
            dialer = Dialer(peer, address(app))
            dialer.invite(rtp_port=4000, extra=f"Record-Route: {route}\r\n")
            ok = await peer.response(status=200)
            assert ok.headers.get_all("Record-Route") == [route]
            dialer.ack(to_tag(ok))
            bye = await proxy.request("BYE")  # maximum duration reached: the BYE goes via the route
            assert bye.headers.get_all("Route") == [route] and bye.uri.endswith(f":{peer.port}")
    finally:
        proxy.close()


async def test_reinvite_contact_refreshes_the_remote_target(tmp_path: Path, peer: RawPeer) -> None:
    moved = await RawPeer.open()
    try:
        async with running(tmp_path, max_call_duration=0.6) as app:
            dialer, _ = await call_in(peer, address(app), await Phone.open())
            text = dialer._headers("INVITE", "z9hG4bKmove1", 2, dialer.to_tag).replace(
                f"Contact: <sip:{dialer.from_user}@127.0.0.1:{peer.port}>",
                f"Contact: <sip:{dialer.from_user}@127.0.0.1:{moved.port}>",
            )
            peer.send(f"INVITE sip:voiceline@127.0.0.1 SIP/2.0\r\n{text}Content-Length: 0\r\n\r\n", address(app))
            offer = await peer.response(method="INVITE")
            dialer.cseq = 2
            dialer.ack(dialer.to_tag, sdp_port=4000)
            assert offer.status == 200
            bye = await moved.request("BYE")
            assert bye.headers.get("Call-ID") == dialer.call_id
    finally:
        moved.close()


async def test_unrefreshed_session_is_ended_with_bye(tmp_path: Path, peer: RawPeer) -> None:
    async with running(tmp_path, session_expires=3, min_session_expires=1) as service:
        dialer = Dialer(peer, address(service))
        dialer.invite(rtp_port=4000, extra="Supported: timer\r\nSession-Expires: 3;refresher=uac\r\n")
        ok = await peer.response(status=200)
        assert ok.headers.get("Session-Expires") == "3;refresher=uac" and ok.headers.get("Require") == "timer"
        dialer.ack(to_tag(ok))
        start = asyncio.get_running_loop().time()
        dialer.in_dialog("UPDATE", extra="Supported: timer\r\nSession-Expires: 3;refresher=uac\r\n")  # one refresh
        assert (await peer.response(method="UPDATE")).headers.get("Session-Expires") == "3;refresher=uac"
        bye = await peer.request("BYE", timeout=5)  # then none: 3 - 1 s after the last refresh
        assert asyncio.get_running_loop().time() - start >= 1.5
        assert bye.headers.get("Call-ID") == dialer.call_id


async def answer_refresh(peer: RawPeer, method: str) -> None:
    """Play the peer that receives our refresh: answer it 200 (with an SDP answer to a re-INVITE)."""
    refresh = await peer.request(method, timeout=5)
    assert (refresh.headers.get("Session-Expires") or "").endswith("refresher=uac")
    body = b""
    extra = []
    if method == "INVITE":
        assert parse_sdp(refresh.body).media[0].formats[0] == "0"
        body = refresh.body.replace(b"o=voiceline", b"o=peer").replace(b"m=audio %d " % parse_sdp(refresh.body).media[0].port, b"m=audio 4000 ")
        extra = [("Content-Type", "application/sdp"), ("Contact", f"<sip:anon@127.0.0.1:{peer.port}>")]
    response = response_to(refresh, 200, headers=[*extra, ("Session-Expires", "3;refresher=uac")], body=body)
    via = parse_via(refresh.headers.get("Via") or "")
    peer.send(serialize(response), (via.host, via.port or 5060))


@pytest.mark.parametrize(("allow", "method"), [("", "INVITE"), ("Allow: INVITE, ACK, BYE, UPDATE\r\n", "UPDATE")])
async def test_we_refresh_a_peer_without_timer_support(tmp_path: Path, peer: RawPeer, allow: str, method: str) -> None:
    async with running(tmp_path, session_expires=3, min_session_expires=1) as service:
        dialer = Dialer(peer, address(service))
        dialer.invite(rtp_port=4000, extra=allow)
        ok = await peer.response(status=200)
        assert ok.headers.get("Session-Expires") == "3;refresher=uas"
        dialer.ack(to_tag(ok))
        await answer_refresh(peer, method)  # at half the interval
        if method == "INVITE":
            ack = await peer.request("ACK")  # we ACK the 2xx to our re-INVITE
            assert (ack.headers.get("CSeq") or "").endswith("ACK")
        await answer_refresh(peer, method)  # the refresh restarted the interval: another one follows
        assert the_call(service).state.value == "confirmed"


async def test_silent_call_is_reaped_but_a_talking_or_held_one_is_not(tmp_path: Path, peer: RawPeer) -> None:
    async with running(tmp_path, media={"inactivity_timeout": 1.0}) as app:
        silent, talking, held = await Phone.open(), await Phone.open(), await Phone.open()
        peers = [peer, await RawPeer.open(), await RawPeer.open()]
        try:
            silent_dialer, _ = await call_in(peers[0], address(app), silent)
            await call_in(peers[1], address(app), talking)
            talking.speak(TONE_HZ)
            held_dialer, _ = await call_in(peers[2], address(app), held)
            held_dialer.in_dialog("INVITE", sdp_port=held.port, direction="sendonly")
            held_dialer.ack((await peers[2].response(status=200, method="INVITE")) and held_dialer.to_tag)
            bye = await peers[0].request("BYE", timeout=4)
            assert bye.headers.get("Call-ID") == silent_dialer.call_id
            await asyncio.sleep(1.0)  # another inactivity timeout passes
            assert app.agent is not None and len(app.agent.core.calls) == 2  # the talking and the held call
        finally:
            for phone in (silent, talking, held):
                phone.close()
            for p in peers[1:]:
                p.close()


async def test_drain_refuses_new_calls_and_lets_current_ones_finish(tmp_path: Path, peer: RawPeer) -> None:
    async with running(tmp_path, drain_timeout=30.0) as app:
        dialer, _ = await call_in(peer, address(app), await Phone.open())
        stop = asyncio.Event()
        draining = asyncio.create_task(app.drain(stop))
        await until(lambda: app.agent is not None and app.agent.draining)
        newcomer = Dialer(peer, address(app))
        newcomer.invite(rtp_port=4000)
        refused = await peer.response(status=503)
        assert refused.headers.get("Retry-After") and refused.headers.get("Call-ID") == newcomer.call_id
        assert not draining.done()  # the call in progress goes on
        dialer.in_dialog("BYE")
        assert (await peer.response(method="BYE")).status == 200
        await asyncio.wait_for(draining, 2)  # the last call ended: the drain is over


async def test_unacknowledged_reinvite_ends_the_call(tmp_path: Path, peer: RawPeer) -> None:
    async with running(tmp_path, t1=0.02) as app:
        dialer, _ = await call_in(peer, address(app), await Phone.open())
        dialer.in_dialog("INVITE", sdp_port=4000, direction="sendonly")
        assert (await peer.response(method="INVITE")).status == 200
        assert (await peer.response(method="INVITE")).status == 200  # retransmitted: no ACK yet
        bye = await peer.request("BYE", timeout=5)  # Timer H (64 * T1): the session ends (RFC 3261 13.3.1.4)
        assert bye.headers.get("Call-ID") == dialer.call_id and app.agent is not None and app.agent.core.calls == []


async def test_caller_answering_our_offer_with_sendonly_joins_on_hold(service: VoiceLine, peer: RawPeer) -> None:
    phone = await Phone.open()
    try:
        dialer = Dialer(peer, address(service))
        dialer.invite(rtp_port=None)
        ok = await peer.response(status=200)
        dialer.ack(to_tag(ok), sdp_port=phone.port, direction="sendonly")
        await until(lambda: service.agent is not None and service.agent.calls and the_call(service).on_hold)
        assert in_pool(service) == 0
        assert len(await phone.listen(0.4)) == 0
        dialer.in_dialog("INVITE", sdp_port=phone.port)  # resume
        assert direction((await peer.response(status=200, method="INVITE")).body) == "sendrecv"
        dialer.ack(dialer.to_tag)
        assert is_hold_audio(await phone.listen(0.8)) and in_pool(service) == 1
    finally:
        phone.close()


async def test_our_refresh_refused_422_is_sent_again_with_the_peers_min_se(tmp_path: Path, peer: RawPeer) -> None:
    async with running(tmp_path, session_expires=3, min_session_expires=1) as service:
        dialer = Dialer(peer, address(service))
        dialer.invite(rtp_port=4000, extra="Allow: INVITE, ACK, BYE, UPDATE\r\n")
        dialer.ack(to_tag(await peer.response(status=200)))
        first = await peer.request("UPDATE", timeout=5)
        assert (first.headers.get("Session-Expires") or "").startswith("3;")
        via = parse_via(first.headers.get("Via") or "")
        peer.send(serialize(response_to(first, 422, headers=[("Min-SE", "6")])), (via.host, via.port or 5060))
        again = await peer.request("UPDATE", timeout=2)  # at once, asking for the peer's minimum
        assert (again.headers.get("Session-Expires") or "").startswith("6;")
        assert int((again.headers.get("CSeq") or "0").split()[0]) > int((first.headers.get("CSeq") or "0").split()[0])
        assert the_call(service).state.value == "confirmed"
