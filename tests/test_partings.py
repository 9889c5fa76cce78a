"""How conversations end without a word from us linking the two calls.

A partner who vanishes (its RTP stops, no BYE) while two callers talk: the survivor is told the line
seems to have dropped and is paired with the next caller; the silent call is ended later. The
survivor and the next caller are real pjsua2 callers (recorded); the one who vanishes is a raw SIP
peer sending a tone as RTP, so its audio can stop without a hang-up.

A pair whose talk time ran out and who let the choice pass: our two BYEs give no reason that links them.

The silence watch's deadlines, on a fake clock (`silence_check`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
import structlog
from port_table import port_ranges
from rawsip import Dialer, RawPeer, address, serving, to_tag
from test_end_to_end import A_HZ, B_HZ, C_HZ, CONNECTED_AFTER, assert_hears, prompt_seconds
from test_journey_interop import TOLERANCE, chirp_wav, heard_at

from voiceline.audio import g711
from voiceline.calls import RESUME_CHECK, SilenceVerdict, silence_check
from voiceline.audio.rtp import build_packet
from voiceline.config import from_mapping
from voiceline.sim.analysis import goertzel_db, read_wav
from voiceline.sim.plugin import QUICK_JOURNEY, VoicelineServer
from voiceline.sim.runner import CallSpec
from voiceline.sip.message import response_to, serialize
from voiceline.sip.sdp import parse_sdp

PARTNER_SILENCE, INACTIVITY = 2.0, 8.0
_next_range = port_ranges("test_partings", 20)  # RTP ports of the services this file starts
FRAME = 160  # PCMU samples per 20 ms packet


END, PART, HEARD_AGAIN = SilenceVerdict.END, SilenceVerdict.PART, SilenceVerdict.HEARD_AGAIN


def test_a_silent_call_is_ended_at_the_inactivity_timeout_counted_from_its_last_packet() -> None:
    assert silence_check(10.0, 12.0, 60.0, 8.0, False, None) == (None, 70.0)  # waiting: no partner to part from
    assert silence_check(10.0, 69.9, 60.0, 8.0, False, None) == (None, 70.0)
    assert silence_check(10.0, 70.0, 60.0, 8.0, False, None) == (END, None)
    assert silence_check(30.0, 70.0, 60.0, 8.0, False, None) == (None, 90.0)  # a packet since: the deadline moved


def test_a_paired_caller_silent_for_partner_silence_is_parted_then_looked_at_every_second() -> None:
    assert silence_check(10.0, 12.0, 60.0, 8.0, True, None) == (None, 18.0)  # the earliest deadline wakes the watch
    assert silence_check(10.0, 17.9, 60.0, 8.0, True, None) == (None, 18.0)
    assert silence_check(10.0, 18.0, 60.0, 8.0, True, None) == (PART, 18.0 + RESUME_CHECK)
    # Parted at 18: still nothing, looked at again a second later, until the inactivity timeout ends it.
    assert silence_check(10.0, 19.0, 60.0, 8.0, False, 18.0) == (None, 19.0 + RESUME_CHECK)
    assert silence_check(10.0, 70.0, 60.0, 8.0, False, 18.0) == (END, None)
    # Its audio came back: a waiting caller again, with only the inactivity deadline ahead.
    assert silence_check(19.5, 20.0, 60.0, 8.0, False, 18.0) == (HEARD_AGAIN, 79.5)


def test_either_limit_may_be_off() -> None:
    assert silence_check(10.0, 500.0, 0.0, 0.0, True, None) == (None, None)
    assert silence_check(10.0, 12.0, 0.0, 8.0, True, None) == (None, 18.0)
    assert silence_check(10.0, 12.0, 0.0, 8.0, False, None) == (None, None)
    assert silence_check(10.0, 18.0, 60.0, 0.0, True, None) == (None, 70.0)


@contextlib.asynccontextmanager
async def tone_rtp(server_rtp: tuple[str, int], rtp: socket.socket, hz: float) -> AsyncIterator[None]:
    """Send a PCMU tone to `server_rtp` every 20 ms for the length of the block; then nothing, ever."""
    t = np.arange(FRAME * 50) / 8000
    tone = g711.ulaw_encode((8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16))  # one second, whole periods

    async def send() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for sequence in range(1, 1 << 16):
            at = (sequence - 1) % 50 * FRAME
            rtp.sendto(build_packet(0, sequence, sequence * FRAME, 0x5EED, tone[at : at + FRAME]), server_rtp)
            await asyncio.sleep(max(0.0, start + sequence * 0.02 - loop.time()))

    sending = asyncio.create_task(send())
    try:
        yield
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending


async def logged(server: VoicelineServer, name: str, count: int) -> list[dict[str, Any]]:
    return await asyncio.to_thread(server.wait_for_event, name, count, 30.0)


@pytest.mark.interop
async def test_a_caller_vanishing_without_bye_leaves_the_survivor_told_and_paired_with_the_next_caller(
    voiceline_server: Callable[..., VoicelineServer], sim_calls: Callable[..., Any]
) -> None:
    server = voiceline_server(
        {"sip": {"answer_delay": 0.1}, "media": {"partner_silence": PARTNER_SILENCE, "inactivity_timeout": INACTIVITY}}
    )
    target = (server.host, server.port)
    line = server.uri("100")
    callers = asyncio.create_task(
        asyncio.to_thread(
            sim_calls,
            [
                CallSpec(line, tone_hz=A_HZ, seconds=22.0),  # the survivor, paired with the vanishing one
                CallSpec(line, tone_hz=C_HZ, seconds=18.0, start_after=3.0),  # the next caller
            ],
        )
    )
    vanishing = await RawPeer.open()
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind(("127.0.0.1", 0))
    try:
        dialer = Dialer(vanishing, target, to_user="100")
        dialer.invite(rtp_port=rtp.getsockname()[1])
        ok = await vanishing.response(status=200, method="INVITE", timeout=10.0)
        dialer.ack(to_tag(ok))
        async with tone_rtp(("127.0.0.1", parse_sdp(ok.body).media[0].port), rtp, B_HZ):
            await logged(server, "pairing.talking", 1)  # with the survivor
            await logged(server, "pairing.waiting", 2)  # the first of the pair (the other was paired at once), the next caller
            await asyncio.sleep(1.5)  # the survivor hears the vanishing one's tone a while
        # Gone: no RTP, no BYE. The silent call is not paired with anyone, and is ended after the inactivity timeout.
        bye = await vanishing.request("BYE", timeout=INACTIVITY + 5.0)
        vanishing.send(serialize(response_to(bye, 200)), target)
        survivor, following = await callers
    finally:
        rtp.close()
        vanishing.close()
    for report in (survivor, following):
        assert report.connected and report.media_started and report.error is None, report
    assert survivor.connected_at is not None and following.connected_at is not None
    # On the survivor's recording: the vanished one's tone, then PARTNER_SILENCE of nothing, then the prompt.
    [dropped] = heard_at(survivor, "line_dropped", over=(A_HZ,))
    tone_ended = last_heard(survivor.recording, B_HZ, dropped)
    assert PARTNER_SILENCE - TOLERANCE < dropped - tone_ended < PARTNER_SILENCE + 1.0, (tone_ended, dropped)
    # Then, once it has been told, paired with the next caller at once: the connect cue, then the next caller's tone.
    told = dropped + prompt_seconds("line_dropped")
    assert [at for at in heard_at(survivor, "connect_cue", threshold=0.9) if at > dropped] == pytest.approx([told], abs=TOLERANCE)
    assert_hears(survivor, C_HZ, A_HZ, told + CONNECTED_AFTER, told + CONNECTED_AFTER + 3.0)
    offset = following.connected_at - survivor.connected_at
    assert_hears(following, A_HZ, C_HZ, told - offset + CONNECTED_AFTER, told - offset + CONNECTED_AFTER + 3.0)
    assert bye.headers.get("Call-ID") == dialer.call_id
    # At info, only the line: which call went silent, and whose partner it was, is never there.
    [event] = [event for event in server.log_events() if event.get("event") == "pairing.partner_dropped"]
    assert "call" not in event and "partner" not in event


def last_heard(recording: str, hz: float, before: float, window: float = 0.1) -> float:
    """The end of the last `window` before `before` seconds in which the tone `hz` stands out."""
    samples, rate = read_wav(recording)
    size = int(window * rate)
    loud = [
        (first + size) / rate
        for first in range(0, int(before * rate) - size, size)
        if goertzel_db(samples[first : first + size], rate, hz) > -40.0
    ]
    assert loud, f"{hz} Hz never heard"
    return loud[-1]


@pytest.mark.integration
async def test_a_pair_whose_talk_time_ran_out_is_hung_up_with_no_reason_that_links_the_two(tmp_path: Any) -> None:
    low, high = next(_next_range)
    # What the two hear is not this test's matter: the line's own short recordings stand in for the
    # spoken prompts from the pairing to the goodbye, so the talk time and the choice come sooner.
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    for prompt_id in ("connected", "talk_time_warning", "talk_time_over", "end_of_talk_choice", "end_of_talk_or_hang_up", "goodbye"):
        chirp_wav(recordings / f"{prompt_id}.wav", seconds=0.3)
    config = from_mapping(
        {
            "sip": {"listen": "127.0.0.1:0", "answer_delay": 0.05},
            "media": {"rtp_ports": f"{low}-{high}", "inactivity_timeout": 0, "partner_silence": 0},
            "storage": {"data_dir": str(tmp_path / "data")},
            "talking": {"max_talk": 1.0, "warn_before": 0.5, "end_choice_wait": 0.2},
            "lines": [{"name": "default", "numbers": ["*"], "prompts": str(recordings)}],
            **QUICK_JOURNEY,
        }
    )
    with structlog.testing.capture_logs() as logs:
        async with serving(config) as app:
            first, second = await RawPeer.open(), await RawPeer.open()
            try:
                # Two callers (two numbers): one caller is never paired with itself.
                for peer, rtp_port, number in ((first, 4000, "1001"), (second, 4002, "1002")):
                    dialer = Dialer(peer, address(app), from_user=number)
                    dialer.invite(rtp_port=rtp_port)
                    dialer.ack(to_tag(await peer.response(status=200, method="INVITE", timeout=5.0)))
                # Connect prompts, the warning, the end-of-talk choice, its wait and the goodbye: then our BYEs.
                for peer in (first, second):
                    bye = await peer.request("BYE", timeout=40.0)
                    peer.send(serialize(response_to(bye, 200)), address(app))
            finally:
                first.close()
                second.close()
    ended = [entry for entry in logs if entry["event"] in ("call.ended", "call.journey_ended")]
    assert [entry.get("reason") for entry in ended if entry["event"] == "call.ended"] == ["journey_ended"] * 2
    assert len([entry for entry in ended if entry["event"] == "call.journey_ended"]) == 2
    at_info = [entry for entry in logs if entry["log_level"] != "debug"]
    assert not [entry for entry in at_info if "talk_time_over" in str(entry)]
    assert [entry["reason"] for entry in logs if entry["event"] == "call.journey_end_reason"] == ["talk_time_over"] * 2
