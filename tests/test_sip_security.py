"""Attacks on SIP signalling, tried against the running service on loopback as an attacker would.

The service runs in-process on 127.0.0.1 with trunks on 127.0.0.2-3 ("carrier")
and 127.0.0.5 ("other"); 127.0.0.4 belongs to no trunk. Each test makes the
attack and asserts it fails: the call is untouched, the stranger gets the
configured refusal or nothing, no caller-chosen name is looked up.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from port_table import port_ranges
from rawsip import Dialer, RawPeer, address, serving, to_tag
from waiting import CONNECTING_SECONDS, until
from voiceline.app import VoiceLine
from voiceline.config import from_mapping
from voiceline.sim.plugin import QUICK_JOURNEY
from voiceline.sim.plugin import VoicelineServer
from voiceline.sip.message import SipRequest, response_to, serialize
from voiceline.sip.sdp import parse_sdp
from voiceline.sip.call_state import CallState
from voiceline.sip.core import Call

pytestmark = pytest.mark.integration

_next_range = port_ranges("test_sip_security", 20)  # this file's RTP ports

CARRIER, SECOND_CARRIER_HOST, STRANGER, OTHER_TRUNK = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
TRUNKS: list[dict[str, Any]] = [
    {"name": "carrier", "sources": [CARRIER, SECOND_CARRIER_HOST]},
    {"name": "other", "sources": [OTHER_TRUNK]},
]
LINES = [{"name": "general", "numbers": ["*"]}]
DTMF_HASH = "Signal=#\r\nDuration=160\r\n"


def running(
    tmp_path: Path, trunks: list[dict[str, Any]] = TRUNKS, media: dict[str, Any] | None = None, **sip: Any
) -> contextlib.AbstractAsyncContextManager[VoiceLine]:
    low, high = next(_next_range)
    config = from_mapping(
        {
            # A short T1: BYEs to peers that never answer give up soon, so stopping is quick.
            "sip": {"listen": "127.0.0.1:0", "answer_delay": 0.05, "t1": 0.03, **sip},
            "media": {"rtp_ports": f"{low}-{high}", **(media or {})},
            "storage": {"data_dir": str(tmp_path / "data"), "poll_interval": 0.2},
            "trunks": trunks,
            "lines": LINES,
            **QUICK_JOURNEY,
        }
    )
    return serving(config)


@contextlib.asynccontextmanager
async def peers(*hosts: str) -> AsyncIterator[list[RawPeer]]:
    opened = [await RawPeer.open(host) for host in hosts]
    try:
        yield opened
    finally:
        for peer in opened:
            peer.close()


async def confirmed_call(
    app: VoiceLine, peer: RawPeer, rtp_port: int = 4000, extra: str = "", contact_uri: str = ""
) -> Dialer:
    dialer = Dialer(peer, address(app))
    assert peer.transport is not None
    dialer.contact_uri = contact_uri or f"sip:anon@{peer.transport.get_extra_info('sockname')[0]}:{peer.port}"
    dialer.invite(rtp_port=rtp_port, extra=extra)
    ok = await peer.response(status=200, method="INVITE")
    dialer.ack(to_tag(ok))
    return dialer


def call_of(app: VoiceLine, dialer: Dialer) -> Call:
    assert app.agent is not None
    return next(call for call in app.agent.core.calls if call.dialog.call_id == dialer.call_id)


def forger(victim: Dialer, peer: RawPeer, from_tag: str | None = None) -> Dialer:
    """An attacker who knows the victim's Call-ID and tags (or guesses the From tag) and jumps ahead in CSeq."""
    forged = Dialer(peer, victim.server)
    forged.call_id, forged.to_tag = victim.call_id, victim.to_tag
    forged.from_tag = victim.from_tag if from_tag is None else from_tag
    forged.cseq = victim.cseq + 100
    return forged


def cancel_of(invite: bytes) -> bytes:
    """The CANCEL for an INVITE as its sender would build it: same Via (branch, sent-by), From, To, Call-ID."""
    request_line, *lines = invite.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    kept = [line.replace(" INVITE", " CANCEL") if line.startswith("CSeq:") else line for line in lines]
    kept = [line for line in kept if not line.startswith(("Content-", "Contact:"))]
    return "\r\n".join([request_line.replace("INVITE", "CANCEL", 1), *kept, "Content-Length: 0", "", ""]).encode()


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def answer(peer: RawPeer, request: SipRequest, server: tuple[str, int]) -> None:
    peer.send(serialize(response_to(request, 200)), server)


# -- forged requests inside a call ---------------------------------------------------


@pytest.mark.parametrize(
    ("attacker", "guessed_from_tag", "refusal"),
    [
        (STRANGER, False, 403),  # no trunk's address: the unknown-source answer
        (OTHER_TRUNK, False, 481),  # a trunk, but not the call's
        (CARRIER, True, 481),  # the call's own trunk, From tag guessed
    ],
)
async def test_forged_in_dialog_requests_fail_and_the_call_is_untouched(
    tmp_path: Path, attacker: str, guessed_from_tag: bool, refusal: int
) -> None:
    async with running(tmp_path) as app, peers(CARRIER, CARRIER, attacker) as (victim_peer, partner_peer, evil):
        victim = await confirmed_call(app, victim_peer, rtp_port=4000)
        await confirmed_call(app, partner_peer, rtp_port=4002)
        await until(lambda: app.ops.status()["lines"]["general"]["talking"] == 2, timeout=CONNECTING_SECONDS)

        forged = forger(victim, evil, from_tag=secrets.token_hex(4) if guessed_from_tag else None)
        forged.in_dialog("INVITE", sdp_port=6000)  # move the victim's media to the attacker
        assert (await evil.response(method="INVITE")).status == refusal
        forged.in_dialog("UPDATE", sdp_port=6000, direction="inactive")
        assert (await evil.response(method="UPDATE")).status == refusal
        forged.in_dialog("INFO", body=DTMF_HASH, content_type="application/dtmf-relay")  # '#' splits a pair
        assert (await evil.response(method="INFO")).status == refusal
        forged.in_dialog("BYE")
        assert (await evil.response(method="BYE")).status == refusal

        call = call_of(app, victim)
        assert call.state is CallState.CONFIRMED and call.audio is not None
        assert (call.audio.remote_host, call.audio.remote_port) == ("127.0.0.1", 4000) and not call.on_hold
        assert app.ops.status()["lines"]["general"]["talking"] == 2
        victim.in_dialog("BYE")  # the next CSeq of the real caller: the forged CSeq 100 ahead changed nothing
        assert (await victim_peer.response(method="BYE")).status == 200


async def test_the_calls_trunk_may_send_from_another_of_its_addresses(tmp_path: Path) -> None:
    """A carrier's proxies share a call's traffic: the trunk, not one address, owns the dialog."""
    async with running(tmp_path) as app, peers(CARRIER, SECOND_CARRIER_HOST) as (first, second):
        dialer = await confirmed_call(app, first)
        dialer.peer = second
        dialer.in_dialog("BYE")
        assert (await second.response(method="BYE")).status == 200
        assert app.agent is not None and app.agent.core.calls == []


async def test_a_cancel_from_anyone_but_the_inviter_leaves_the_invite_alone(tmp_path: Path) -> None:
    async with running(tmp_path, answer_delay=2.0) as app, peers(CARRIER, STRANGER, OTHER_TRUNK) as (
        carrier,
        stranger,
        other,
    ):
        server = address(app)
        victim = Dialer(carrier, server)
        victim.invite(rtp_port=4000)
        await carrier.response(status=180)
        cancel = cancel_of(victim.last_invite)  # the victim's branch and sent-by, copied
        stranger.send(cancel, server)
        assert (await stranger.response(method="CANCEL")).status == 403
        other.send(cancel, server)
        assert (await other.response(method="CANCEL")).status == 481

        assert app.agent is not None
        [call] = app.agent.core.calls
        assert call.state is CallState.RINGING
        assert not any(raw.startswith(b"SIP/2.0 487") for raw in carrier.raw)
        victim.cancel()  # the inviter's own CANCEL still works
        assert (await carrier.response(method="CANCEL")).status == 200
        assert (await carrier.response(method="INVITE")).status == 487


# -- drop means silence ----------------------------------------------------------------


def raw_request(
    method: str, peer: RawPeer, server: tuple[str, int], to_tag: str = "", cseq: str = "1", max_forwards: str = "70",
    version: str = "SIP/2.0",
) -> str:  # fmt: skip
    tag = f";tag={to_tag}" if to_tag else ""
    return (
        f"{method} sip:line@{server[0]}:{server[1]} {version}\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};branch=z9hG4bK{secrets.token_hex(6)};rport\r\n"
        f"From: <sip:anon@127.0.0.1>;tag={secrets.token_hex(4)}\r\n"
        f"To: <sip:line@{server[0]}>{tag}\r\n"
        f"Call-ID: {secrets.token_hex(8)}\r\n"
        f"CSeq: {cseq} {method}\r\n"
        f"Contact: <sip:anon@127.0.0.1:{peer.port}>\r\n"
        f"Max-Forwards: {max_forwards}\r\n"
        "Content-Length: 0\r\n\r\n"
    )


# Each kind used to be answered whatever the source: 400, 505, 483, 481, 481, 200 (with Server:), 405.
ANSWERED_KINDS: list[dict[str, str]] = [
    {"method": "OPTIONS", "cseq": "notanumber"},
    {"method": "INVITE", "version": "SIP/3.0"},
    {"method": "INVITE", "max_forwards": "0"},
    {"method": "BYE", "to_tag": "madeup"},
    {"method": "CANCEL"},
    {"method": "OPTIONS", "to_tag": "madeup"},
    {"method": "MESSAGE"},
]


@pytest.mark.parametrize(("mode", "answer_to_stranger"), [("drop", None), ("reject", 403)])
async def test_an_unknown_source_gets_only_what_unknown_source_says_and_each_request_is_counted(
    tmp_path: Path, mode: str, answer_to_stranger: int | None
) -> None:
    async with running(tmp_path, unknown_source=mode) as app, peers(STRANGER, CARRIER) as (stranger, carrier):
        server = address(app)
        assert app.agent is not None
        for kind in ANSWERED_KINDS:
            stranger.send(raw_request(peer=stranger, server=server, **kind), server)
        await until(lambda: app.agent is not None and app.agent.counters.received == len(ANSWERED_KINDS))
        assert app.agent.transactions.active == 0  # nothing kept for the stranger
        for kind in ANSWERED_KINDS:  # the same from a trunk: answered as before
            carrier.send(raw_request(peer=carrier, server=server, **kind), server)
        await until(lambda: len(carrier.raw) >= len(ANSWERED_KINDS))
        await asyncio.sleep(0.3)  # what the stranger would have got has long arrived
        assert {status_of(raw) for raw in carrier.raw} == {200, 400, 405, 481, 483, 505}
        if answer_to_stranger is None:
            assert stranger.raw == []
        else:
            assert [status_of(raw) for raw in stranger.raw] == [answer_to_stranger] * len(ANSWERED_KINDS)
            assert all(b"\r\nServer:" in raw for raw in stranger.raw)
        assert app.storage is not None
        storage = app.storage

        async def unknown_source_refusals() -> int:
            return sum(row["count"] for row in await storage.refusals() if row["reason"] == "unknown_source")

        await until(lambda: not app.trunks or not app.trunks.policy.refused)  # moved to the hourly statistics
        await until(unknown_source_refusals)
        assert await unknown_source_refusals() == len(ANSWERED_KINDS)


# -- no caller-chosen name is resolved --------------------------------------------------


@pytest.fixture
async def looked_up(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every name the service's event loop is asked to resolve."""
    loop = asyncio.get_running_loop()
    names: list[str] = []
    real = loop.getaddrinfo

    async def recording(host: Any, *args: Any, **kwargs: Any) -> Any:
        names.append(str(host))
        return await real(host, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", recording)
    return names


@pytest.mark.parametrize(
    ("contact_uri", "extra"),
    [
        ("sip:anon@caller-chosen.invalid:{port}", ""),
        ("", "Record-Route: <sip:proxy.caller-chosen.invalid;lr>\r\n"),
    ],
)
async def test_our_bye_never_resolves_a_name_the_caller_chose(
    tmp_path: Path, looked_up: list[str], contact_uri: str, extra: str
) -> None:
    async with running(tmp_path, max_call_duration=0.5) as app, peers(CARRIER) as (carrier,):
        dialer = await confirmed_call(app, carrier, contact_uri=contact_uri.format(port=carrier.port), extra=extra)
        bye = await carrier.request("BYE")  # at the end of the call: to where the INVITE came from
        assert bye.headers.get("Call-ID") == dialer.call_id
        answer(carrier, bye, address(app))
    assert not [name for name in looked_up if "invalid" in name]


async def test_a_host_name_of_the_calls_own_trunk_is_used_at_its_resolved_address(
    tmp_path: Path, looked_up: list[str]
) -> None:
    named = [{"name": "named", "sources": ["localhost"]}]
    async with running(tmp_path, trunks=named, max_call_duration=0.5) as app, peers("127.0.0.1", "127.0.0.1") as (
        caller,
        contact,
    ):
        lookups_before = len(looked_up)
        await confirmed_call(app, caller, contact_uri=f"sip:anon@localhost:{contact.port}")
        bye = await contact.request("BYE")  # the Contact's port at the trunk name's address
        answer(contact, bye, address(app))
        assert len(looked_up) == lookups_before  # from what the trunk's resolution already knew


# -- unusable headers are refused up front; one call's error never stops housekeeping ----


@pytest.mark.parametrize(
    ("contact_uri", "extra"), [("sip:a@b@127.0.0.2", ""), ("sip:anon@127.0.0.2", "Record-Route: <sip:a@b@proxy;lr>\r\n")]
)
async def test_an_invite_with_an_unusable_contact_or_route_gets_400_and_no_call(
    tmp_path: Path, contact_uri: str, extra: str
) -> None:
    async with running(tmp_path) as app, peers(CARRIER) as (carrier,):
        dialer = Dialer(carrier, address(app))
        dialer.contact_uri = contact_uri
        dialer.invite(rtp_port=4000, extra=extra)
        assert (await carrier.response(method="INVITE")).status == 400
        assert app.agent is not None and app.agent.core.calls == []


async def test_a_reinvite_with_an_unusable_contact_gets_400_and_changes_nothing(tmp_path: Path) -> None:
    async with running(tmp_path) as app, peers(CARRIER) as (carrier,):
        dialer = await confirmed_call(app, carrier)
        call = call_of(app, dialer)
        target = call.dialog.remote_target
        dialer.contact_uri = "sip:a@b@127.0.0.2"
        dialer.in_dialog("INVITE", sdp_port=6000)
        assert (await carrier.response(method="INVITE")).status == 400
        assert call.dialog.remote_target == target
        assert call.audio is not None and call.audio.remote_port == 4000  # the offer in it was not taken either
        dialer.contact_uri = ""
        dialer.in_dialog("BYE")
        assert (await carrier.response(method="BYE")).status == 200


async def test_a_call_whose_bye_cannot_be_built_still_ends_and_the_reaper_goes_on(tmp_path: Path) -> None:
    """Should an unusable value ever get past the INVITE checks, hanging up that call fails alone."""
    async with running(tmp_path, media={"inactivity_timeout": 0.5}) as app, peers(CARRIER, CARRIER) as (broken, silent):
        broken_dialer = await confirmed_call(app, broken)
        call_of(app, broken_dialer).dialog.remote_target = "sip:a@b@127.0.0.2"  # what a missed check would leave
        with structlog.testing.capture_logs() as logs:
            silent_dialer = await confirmed_call(app, silent, rtp_port=4002)
            bye = await silent.request("BYE", timeout=5.0)  # the next silent call is still reaped
            assert bye.headers.get("Call-ID") == silent_dialer.call_id
            answer(silent, bye, address(app))
            await until(lambda: app.agent is not None and app.agent.core.calls == [])  # neither call leaked
        failures = [entry for entry in logs if entry["event"] == "call.hangup_failed"]
        assert failures and failures[0]["error"] == "SipParseError" and failures[0]["exc_info"]


# -- floods ------------------------------------------------------------------------------


async def test_a_message_flood_from_one_source_is_rate_limited_and_keeps_no_state(tmp_path: Path) -> None:
    async with running(tmp_path) as app, peers(CARRIER, SECOND_CARRIER_HOST) as (flooder, neighbour):
        assert app.agent is not None
        server = address(app)
        limit = app.agent.overload.limits.other
        body = "x" * 4000
        loop = asyncio.get_running_loop()
        started = loop.time()
        for n in range(3000):
            method = "MESSAGE" if n % 2 else f"X{n}"  # made-up method names share the one bucket
            text = raw_request(method, flooder, server).replace("Content-Length: 0", f"Content-Length: {len(body)}")
            flooder.send(text + body, server)
            if n % 50 == 49:
                await asyncio.sleep(0)  # let the service read: the socket buffer would drop the rest
        await until(lambda: app.agent is not None and app.agent.overload.counters.rate_limited > 0)
        await asyncio.sleep(0.3)  # the rest of the flood is read and answered: the counts are final
        elapsed = loop.time() - started
        answered = [status_of(raw) for raw in flooder.raw]
        assert set(answered) == {405}
        assert limit.burst <= len(answered) <= limit.burst + limit.rate * elapsed + 1
        assert app.agent.overload.counters.rate_limited >= app.agent.counters.received - len(answered) - 1
        assert app.agent.overload.tracked_sources == 1  # one bucket for the source, whatever the methods
        assert app.agent.transactions.active == 0  # and no transaction held for a 405
        Dialer(neighbour, server).out_of_dialog("OPTIONS")  # another address of the same carrier is unaffected
        assert (await neighbour.response()).status == 200


# -- a real process: SIGTERM after a malformed Contact -----------------------------------


async def test_sigterm_after_a_malformed_contact_sends_byes_and_exits_cleanly(
    voiceline_server: Callable[..., VoicelineServer],
) -> None:
    server = voiceline_server({"media": {"inactivity_timeout": 1.0}})
    target = (server.host, server.port)
    loop = asyncio.get_running_loop()
    async with peers("127.0.0.1", "127.0.0.1", "127.0.0.1") as (bad, silent, talking):
        malformed = Dialer(bad, target)
        malformed.contact_uri = "sip:a@b@127.0.0.1"
        malformed.invite(rtp_port=4000)
        assert (await bad.response(method="INVITE")).status == 400

        silent_dialer = Dialer(silent, target)
        silent_dialer.invite(rtp_port=4002)
        silent_dialer.ack(to_tag(await silent.response(status=200, method="INVITE")))
        reaped = await silent.request("BYE", timeout=5.0)  # the reaper runs
        answer(silent, reaped, target)

        rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rtp.bind(("127.0.0.1", 0))
        talking_dialer = Dialer(talking, target)
        talking_dialer.invite(rtp_port=rtp.getsockname()[1])
        ok = await talking.response(status=200, method="INVITE")
        talking_dialer.ack(to_tag(ok))
        server_rtp = ("127.0.0.1", parse_sdp(ok.body).media[0].port)
        rtp.sendto(struct.pack("!BBHII", 0x80, 0, 1, 160, 0x1234) + bytes(160), server_rtp)

        stopping = loop.run_in_executor(None, server.stop)  # SIGTERM, then wait for the exit
        bye = await talking.request("BYE", timeout=5.0)
        assert bye.headers.get("Call-ID") == talking_dialer.call_id
        answer(talking, bye, target)
        assert await stopping == 0 and not server.killed
        rtp.close()
    text = server.log_text()
    assert "Traceback" not in text
    assert not [event for event in server.log_events() if event.get("level") in ("error", "critical")]
    assert any(event.get("event") == "service.stopped" for event in server.log_events())
