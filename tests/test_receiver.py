"""The receiving side of a media leg, sans-I/O on a fake clock: what it says arrived, and what it drops."""

from __future__ import annotations

import numpy as np
import pytest
from pylibsrtp import Policy, Session
from test_dtmf import dtmf, event

from voiceline.audio import g711
from voiceline.audio.dtmf import frame_digits
from voiceline.audio.latch import Learning
from voiceline.audio.receiver import AUDIO, COMFORT_NOISE_PT, DIGIT, DROPPED, EVENT, LATCHED, PCM, TONES, Receiver
from voiceline.audio.rtcp import ReceptionStats, build_report, parse
from voiceline.audio.rtp import MAX_PAYLOAD, build_packet
from voiceline.audio.srtp import SrtpContext, SrtpKeys
from voiceline.codec_table import PCMA, PCMU

SDP = ("10.0.0.5", 4000)  # what the caller's SDP announced
NAT = "203.0.113.9"  # where the call's INVITE came from
STRANGER = ("198.51.100.66", 5000)
PT, EVENT_PT = 0, 101
LEARNING = Learning(packets=4, seconds=1.5)
VOICE = g711.ulaw_encode(np.full(160, 1000, dtype=np.int16))


def started(codec=PCMU, payload_type: int = PT, event_pt: int | None = EVENT_PT, **options) -> Receiver:
    receiver = Receiver(
        learning=LEARNING, inband_dtmf=options.pop("inband_dtmf", True), batch_tones=options.pop("batch_tones", False)
    )
    receiver.start(SDP, codec, payload_type, event_pt, 0.0, signalling_host=NAT, **options)
    return receiver


def audio(sequence: int, payload: bytes = VOICE, ssrc: int = 0x1234, payload_type: int = PT) -> bytes:
    return build_packet(payload_type, sequence, sequence * 160, ssrc, payload)


def test_audio_from_the_sdp_host_latches_at_once_and_gives_its_payload_span() -> None:
    receiver = started()
    source = (SDP[0], 4002)  # the SDP's host, another port: trusted
    assert receiver.receive(audio(7), source, 0.1) == AUDIO + LATCHED
    assert receiver.peer == source
    assert receiver.receive(audio(8), source, 0.12) == AUDIO
    assert receiver.packet[receiver.offset : receiver.end] == VOICE
    assert (receiver.packets_in, receiver.packets_dropped, receiver.last_received) == (2, 0, 0.12)
    assert (receiver.reception.ssrc, receiver.reception.highest_sequence, receiver.reception.expected) == (0x1234, 8, 2)


def test_a_packet_with_csrcs_extension_and_padding_gives_the_payload_between() -> None:
    receiver = started()
    header = bytes([0xB1, PT]) + (1).to_bytes(2, "big") + (160).to_bytes(4, "big") + (9).to_bytes(4, "big")
    csrc, extension = b"\x00\x00\x00\x05", b"\xbe\xde\x00\x01" + b"\x01\x02\x03\x04"
    packet = header + csrc + extension + VOICE + b"\x00\x00\x03"  # 3 bytes of padding
    assert receiver.receive(packet, (NAT, 6000), 0.1) == AUDIO + LATCHED
    assert receiver.packet[receiver.offset : receiver.end] == VOICE


def test_what_is_dropped_is_counted_and_latches_nothing() -> None:
    unstarted = Receiver()
    assert unstarted.receive(audio(1), SDP, 0.0) == DROPPED  # before start no payload type matches
    receiver = started()
    bad = [
        b"",
        audio(1)[:11],
        bytes([0x40]) + audio(1)[1:],  # version 1
        bytes([0xA0]) + audio(1)[1:-1] + b"\x00",  # padding count of zero
        audio(1, payload_type=8),  # not negotiated
        audio(1, bytes(MAX_PAYLOAD + 1)),
    ]
    assert [receiver.receive(packet, SDP, 0.1) for packet in bad] == [DROPPED] * len(bad)
    assert (receiver.packets_dropped, receiver.packets_in, receiver.peer, receiver.last_received) == (6, 0, None, 0.0)


def test_comfort_noise_from_the_peer_shows_it_is_there_without_being_relayed_or_counted_as_dropped() -> None:
    receiver = started()
    assert receiver.receive(audio(1), SDP, 0.1) == AUDIO + LATCHED
    noise = audio(2, payload=bytes([60]), payload_type=COMFORT_NOISE_PT)  # RFC 3389: a level, no spectrum
    assert receiver.receive(noise, SDP, 5.0) == DROPPED
    assert (receiver.last_received, receiver.packets_in, receiver.packets_dropped) == (5.0, 1, 0)
    assert receiver.receive(noise, STRANGER, 9.0) == DROPPED  # from anyone else: proves nothing
    assert (receiver.last_received, receiver.packets_dropped) == (5.0, 1)


def test_a_stranger_latches_only_after_probation_and_gives_way_to_the_caller() -> None:
    receiver = started()
    early = [receiver.receive(audio(n), STRANGER, 0.1 + 0.02 * n) for n in range(10)]
    assert early == [DROPPED] * 10  # in sequence, but inside the learning window
    assert receiver.receive(audio(10), STRANGER, 1.6) == AUDIO + LATCHED
    assert receiver.peer == STRANGER
    caller = (NAT, 61000)
    assert receiver.receive(audio(1, ssrc=0x77), caller, 1.62) == AUDIO + LATCHED  # a trusted host takes over
    assert receiver.receive(audio(11), STRANGER, 1.64) == DROPPED
    assert receiver.peer == caller


def test_telephone_events_give_one_digit_per_key_press_and_no_audio() -> None:
    receiver = started()
    digits = []
    for timestamp, code in ((1600, 5), (4800, 11)):
        for step, payload in enumerate([event(code), event(code), event(code, end=True), event(code, end=True)]):
            packet = build_packet(EVENT_PT, 10 * code + step, timestamp, 0x1234, payload)
            kind = receiver.receive(packet, SDP, 0.1) & ~LATCHED
            digits.append(receiver.digit if kind == DIGIT else kind)
    assert digits == ["5", EVENT, EVENT, EVENT, "#", EVENT, EVENT, EVENT]
    assert receiver.packets_in == 8


def test_without_telephone_event_audio_is_decoded_and_dtmf_found_and_muted() -> None:
    receiver = started(event_pt=None)
    speech = g711.ulaw_encode(np.full(160, 800, dtype=np.int16))
    assert receiver.receive(audio(0, speech), SDP, 0.0) == PCM + LATCHED
    assert np.array_equal(receiver.pcm, g711.ulaw_decode(speech)) and not receiver.muted
    key = dtmf("7", 0.1)
    found = []
    for n in range(5):
        assert receiver.receive(audio(1 + n, g711.ulaw_encode(key[160 * n : 160 * (n + 1)])), SDP, 0.02 * n) == PCM
        found.append(receiver.digit)
        assert not receiver.muted or not np.any(receiver.pcm)
    assert [digit for digit in found if digit] == ["7"]
    assert receiver.muted  # the key's frames go on as silence


def test_batched_tones_come_back_undecoded_and_the_leg_hands_back_the_same_findings() -> None:
    """The media engine's receivers leave in-band detection of G.711 to a batch across legs: each
    frame comes as TONES, and `tones_checked` with what the batch found gives the digit and the
    muting the receiver finds on its own."""
    alone, batched = started(event_pt=None), started(event_pt=None, batch_tones=True)
    key = np.concatenate((np.full(160, 800, dtype=np.int16), dtmf("7", 0.1), np.full(160, 800, dtype=np.int16)))
    for n in range(7):
        payload = g711.ulaw_encode(key[160 * n : 160 * (n + 1)])
        packet = audio(n, payload)
        assert alone.receive(packet, SDP, 0.02 * n) & ~LATCHED == PCM
        assert batched.receive(packet, SDP, 0.02 * n) & ~LATCHED == TONES
        assert batched.packet[batched.offset : batched.end] == payload
        pcm = g711.ulaw_decode(payload)
        batched.tones_checked(packet, batched.offset, batched.end, pcm, frame_digits(pcm[None, :], 8000)[0])
        assert (batched.digit, batched.muted) == (alone.digit, alone.muted)
        assert np.array_equal(batched.pcm, alone.pcm)
    assert alone.digit is None and not alone.muted  # the speech after the key is heard again


def test_batched_tones_are_decoded_here_while_pcm_is_wanted() -> None:
    receiver = started(event_pt=None, batch_tones=True)
    receiver.want_pcm(True)  # e.g. a listener under a prompt
    assert receiver.receive(audio(0), SDP, 0.0) == PCM + LATCHED
    receiver.want_pcm(False)
    assert receiver.receive(audio(1), SDP, 0.02) == TONES


def test_a_waiting_frame_without_a_digit_passes_as_it_is_only_while_nothing_changed() -> None:
    """What the batch may relay untouched: not during a key press, not once someone wants PCM."""
    receiver = started(event_pt=None, batch_tones=True)
    assert receiver.receive(audio(0), SDP, 0.0) == TONES + LATCHED
    assert receiver.tones_pass
    receiver.want_pcm(True)  # a prompt began for a listener while the frame waited
    assert not receiver.tones_pass
    receiver.want_pcm(False)
    pcm = g711.ulaw_decode(VOICE)
    receiver.tones_checked(audio(1), 12, 172, pcm, "7")  # a key's first frame
    assert not receiver.tones_pass  # its next frames must be tracked, digit or not


def test_inband_detection_off_relays_audio_untouched() -> None:
    receiver = started(event_pt=None, inband_dtmf=False)
    assert receiver.receive(audio(0, g711.ulaw_encode(dtmf("7", 0.02))), SDP, 0.0) == AUDIO + LATCHED


def test_pcm_is_decoded_only_while_someone_wants_it() -> None:
    receiver = started(codec=PCMA, payload_type=8)
    alaw = g711.alaw_encode(np.full(160, 500, dtype=np.int16))
    assert receiver.receive(audio(0, alaw, payload_type=8), SDP, 0.0) == AUDIO + LATCHED
    receiver.want_pcm(True)
    assert receiver.receive(audio(1, alaw, payload_type=8), SDP, 0.02) == PCM
    assert np.array_equal(receiver.pcm, g711.alaw_decode(alaw)) and receiver.digit is None
    receiver.want_pcm(False)
    assert receiver.receive(audio(2, alaw, payload_type=8), SDP, 0.04) == AUDIO


def test_a_new_sdp_address_is_learnt_afresh_and_the_same_one_keeps_the_peer() -> None:
    receiver = started()
    assert receiver.receive(audio(0), SDP, 0.0) == AUDIO + LATCHED
    assert not receiver.announce(SDP, 1.0) and receiver.peer == SDP
    moved = ("10.0.0.6", 4100)
    assert receiver.announce(moved, 2.0) and receiver.peer is None
    assert receiver.receive(audio(1), SDP, 2.02) == DROPPED  # no longer a trusted host: on probation
    assert receiver.receive(audio(0, ssrc=9), moved, 2.04) == AUDIO + LATCHED


def test_srtp_forgeries_are_dropped_before_they_can_latch() -> None:
    caller_key, our_key = bytes(range(1, 31)), bytes(range(31, 61))
    srtp = SrtpContext(SrtpKeys("AES_CM_128_HMAC_SHA1_80", send_key=our_key, receive_key=caller_key))
    receiver = started(srtp=srtp)
    caller = Session(Policy(key=caller_key, ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=Policy.SRTP_PROFILE_AES128_CM_SHA1_80))
    forged = bytearray(caller.protect(audio(1)))
    forged[-1] ^= 1
    assert receiver.receive(bytes(forged), SDP, 0.0) == DROPPED
    assert receiver.receive(audio(2), SDP, 0.0) == DROPPED  # plain RTP on an SRTP stream
    assert (receiver.peer, srtp.auth_failures, receiver.packets_dropped) == (None, 2, 2)
    assert receiver.receive(caller.protect(audio(3)), SDP, 0.02) == AUDIO + LATCHED
    assert receiver.packet[receiver.offset : receiver.end] == VOICE


def test_rtcp_is_taken_only_from_the_latched_peers_host() -> None:
    receiver = started()
    report_of_us = ReceptionStats(8000)
    for sequence in range(1, 11):
        if sequence != 5:
            report_of_us.update(build_packet(PT, sequence, 0, 0xABCD), sequence * 0.02)
    report = build_report(0x1234, b"phone", report_of_us, 0.0, 0.0, (160, 9, 1440))
    assert parse(report, 0xABCD) is not None
    assert not receiver.receive_rtcp(report, (SDP[0], 4001), 0xABCD, 0.0)  # nothing latched yet
    receiver.receive(audio(0), SDP, 0.0)
    assert not receiver.receive_rtcp(report, (STRANGER[0], 4001), 0xABCD, 0.1)
    assert receiver.peer_report is None and receiver.rtcp_source is None
    assert receiver.receive_rtcp(report, (SDP[0], 4001), 0xABCD, 0.2)
    assert receiver.peer_report is not None and receiver.peer_report[0] == 1
    assert receiver.rtcp_source == (SDP[0], 4001) and receiver.reception.last_sr_at == 0.2


@pytest.mark.parametrize("kind", [PCM, DIGIT, EVENT])
def test_plain_audio_is_told_from_everything_else_by_one_comparison(kind: int) -> None:
    # The leg's fast path relays on `kind == AUDIO` and sends anything `> AUDIO` the slow way.
    assert DROPPED < AUDIO < kind and (kind + LATCHED) & ~LATCHED == kind and AUDIO & LATCHED == 0
