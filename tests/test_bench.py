"""The `make bench` load generator: its measurements, its SIP UAC, and a tiny run against a real server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from voiceline.audio.codecs import Resampler, new_coder
from voiceline.audio.hold import hold_music
from voiceline.bench.engine import KINDS, measure_engine
from voiceline.bench.generator import NG_PAIRS, TRANSCODE_FLAGS, sdp_payload_type
from voiceline.bench.measure import (
    BUCKET_NS,
    BUCKETS,
    PAIR_TONES_HZ,
    SEND_RING,
    LatencyHistogram,
    LevelResult,
    SendTimes,
    SequenceMatch,
    ToneMatcher,
    WindowCounts,
    encoded_tone_frame,
    largest_within_budget,
    pair_tone_hz,
    tone_frame,
)
from voiceline.bench.ng import NgError, bdecode, bencode
from voiceline.bench.runner import (
    LOOPBACK,
    RTPENGINE,
    VOICELINE,
    BenchOptions,
    busy_seconds,
    format_side_by_side,
    media_options,
    queued_bytes,
    run_baseline,
    run_levels,
    socket_inodes,
    start_rtpengine,
    stop_server,
    summarise,
    wait_until_caught_up,
)
from voiceline.bench.uac import MAX_TRANSMISSIONS, RETRANSMIT_SECONDS, SCENARIOS, BenchCall, CallState
from voiceline.codec_table import CODECS, OPUS, PCMU
from voiceline.sim.analysis import goertzel_db
from voiceline.sim.plugin import VoicelineServer
from voiceline.sip.message import SipRequest, SipResponse, parse_message, response_to, serialize
from voiceline.sip.sdp import negotiate, parse_sdp

MS = 1_000_000


def level(
    pairs: int,
    sent: int,
    received: int,
    latencies_ms: list[float],
    held: int | None = None,
    server_cpu: float = 0.0,
    system_cpu: float = 0.0,
    machine_cpu: float = 0.0,
    baseline_cpu: float | None = None,
    generator_cpu: float = 0.0,
    baseline_generator_cpu: float | None = None,
) -> LevelResult:
    histogram = LatencyHistogram()
    for latency in latencies_ms:
        histogram.add(int(latency * MS))
    return LevelResult(
        pairs=pairs,
        pairs_held=pairs if held is None else held,
        counts=WindowCounts(sent=sent, received=received),
        latency=histogram,
        setup_rate=0.0,
        server_cpu=server_cpu,
        server_rss_mb=0.0,
        generator_cpu=generator_cpu,
        seconds=1.0,
        system_cpu=system_cpu,
        machine_cpu=machine_cpu,
        baseline_cpu=baseline_cpu,
        baseline_generator_cpu=baseline_generator_cpu,
    )


# -- measurement ---------------------------------------------------------------------


def test_percentiles_are_bucket_upper_edges() -> None:
    histogram = LatencyHistogram()
    for _ in range(98):
        histogram.add(250_000)  # 0.25 ms
    histogram.add(4_000_000)
    histogram.add(9_000_000)
    assert histogram.total == 100
    assert histogram.percentile_ms(0.50) == pytest.approx(0.26)
    assert histogram.percentile_ms(0.98) == pytest.approx(0.26)
    assert histogram.percentile_ms(0.99) == pytest.approx(4.01)
    assert histogram.percentile_ms(1.0) == pytest.approx(9.01)


def test_out_of_range_latencies_are_clamped_and_empty_is_zero() -> None:
    histogram = LatencyHistogram()
    assert histogram.percentile_ms(0.99) == 0.0
    histogram.add(-5)  # clocks a hair apart
    histogram.add(BUCKETS * BUCKET_NS * 10)
    assert histogram.counts[0] == 1 and histogram.counts[-1] == 1


def test_histograms_merge() -> None:
    one, other = LatencyHistogram(), LatencyHistogram()
    one.add(1 * MS)
    other.add(1 * MS)
    other.add(3 * MS)
    one.merge(other)
    assert one.total == 3 and one.percentile_ms(0.5) == pytest.approx(1.01)


def test_loss_is_the_share_of_window_probes_that_never_came_back() -> None:
    assert level(10, 10_000, 9_990, [0.1]).loss == pytest.approx(0.001)
    assert level(10, 0, 0, []).loss == 0.0
    counts = WindowCounts(sent=5, received=4, foreign=1)
    counts.merge(WindowCounts(sent=5, received=5))
    assert (counts.sent, counts.received, counts.foreign) == (10, 9, 1)


def test_budget_needs_low_loss_low_p99_and_every_pair_held() -> None:
    fast = [0.3] * 990 + [4.0] * 10
    # 100 pairs for 1 s: 200 legs x 50 packets.
    assert level(100, 10_000, 10_000, fast).within_budget
    assert not level(100, 10_000, 9_980, fast).within_budget  # 0.2 % lost
    assert not level(100, 10_000, 10_000, [0.3] * 980 + [6.0] * 20).within_budget  # p99 6 ms
    assert not level(100, 10_000, 10_000, fast, held=99).within_budget
    assert not level(100, 0, 0, []).within_budget  # nothing measured proves nothing
    assert not level(100, 9_600, 9_600, fast).within_budget  # the generator fell behind: not the full load


def test_largest_within_budget_stops_at_the_first_failed_level() -> None:
    good, bad = [0.2] * 100, [0.2] * 90 + [20.0] * 10
    results = [level(pairs, 100 * pairs, 100 * pairs, bad if pairs == 300 else good) for pairs in (400, 100, 200, 300)]
    assert largest_within_budget(results) == 200
    assert largest_within_budget(results[:2]) == 400
    assert largest_within_budget([level(100, 10_000, 10_000, bad)]) == 0


def test_cpu_per_relayed_packet_and_the_tail_percentile() -> None:
    # 20 % of a core for 1 s over 10 000 packets relayed: 20 us each.
    result = level(100, 10_000, 10_000, [0.2] * 9980 + [7.0] * 20, server_cpu=20.0, system_cpu=35.0)
    assert result.per_packet_us(result.server_cpu) == pytest.approx(20.0)
    assert result.per_packet_us(result.system_cpu) == pytest.approx(35.0)
    assert result.p99_ms == pytest.approx(0.21) and result.p999_ms == pytest.approx(7.01)
    assert level(100, 0, 0, []).per_packet_us(50.0) == 0.0


def test_the_whole_system_figure_is_the_machine_beyond_the_no_relay_baseline() -> None:
    # The machine 90 % busy relaying 10 000 packets in 1 s, 60 % with the legs sending straight to
    # each other: the relay (wherever the kernel ran its part) cost 30 us a packet.
    assert level(100, 10_000, 10_000, [0.2], machine_cpu=90.0, baseline_cpu=60.0).whole_us == pytest.approx(30.0)
    assert level(100, 10_000, 10_000, [0.2], machine_cpu=90.0).whole_us is None  # no baseline measured


def test_the_attributed_figure_adds_what_the_generator_spent_beyond_its_baseline() -> None:
    # The kernel forwarding in the generator's sends: the relay 1 %, the generator 31 % against 20 %
    # with no relay, over 10 000 packets in 1 s: 12 us a packet.
    result = level(100, 10_000, 10_000, [0.2], server_cpu=1.0, generator_cpu=31.0, baseline_generator_cpu=20.0)
    assert result.attributed_us == pytest.approx(12.0)
    assert level(100, 10_000, 10_000, [0.2], server_cpu=1.0).attributed_us is None


def test_the_summary_gives_medians_and_voicelines_ratio_to_rtpengine() -> None:
    base = {"baseline_cpu": 50.0, "generator_cpu": 20.0, "baseline_generator_cpu": 10.0}
    ours = [
        level(100, 10_000, 10_000, [0.2], server_cpu=cpu, system_cpu=2 * cpu, machine_cpu=50 + cpu, **base)
        for cpu in (30.0, 20.0, 25.0)
    ]
    theirs = [
        level(100, 10_000, 10_000, [0.1], server_cpu=cpu, system_cpu=cpu, machine_cpu=50 + 2 * cpu, **base)
        for cpu in (10.0, 12.0)
    ]
    without_kernel = [
        level(100, 10_000, 10_000, [0.2], server_cpu=33.0, system_cpu=44.0, machine_cpu=94.0, **base)
    ]
    lines = summarise(
        {
            ("pcmu", VOICELINE, 100): ours,
            ("pcmu", RTPENGINE, 100): theirs,
            ("pcmu", f"{VOICELINE}:kernel_forwarding=off", 100): without_kernel,
        }
    )
    rows = {line.split()[2]: line.split()[3:] for line in lines[1:]}
    assert rows[VOICELINE] == ["25.00", "50.00", "25.00", "35.00", "2.27/4.55/1.14/1.67"]
    assert rows[RTPENGINE] == ["11.00", "11.00", "22.00", "21.00", "-"]
    assert rows["voiceline:kernel_forwarding=off"] == ["33.00", "44.00", "44.00", "43.00", "3.00/4.00/2.00/2.05"]


def test_a_voiceline_relay_may_carry_media_settings() -> None:
    assert media_options(VOICELINE) == []
    assert media_options("voiceline:kernel_forwarding=off,learning_packets=6") == [
        ("kernel_forwarding", '"off"'),
        ("learning_packets", "6"),
    ]
    with pytest.raises(ValueError):
        media_options("voiceline:kernel_forwarding")


def test_a_pair_tone_is_found_after_transcoding_both_ways_and_nothing_else_is() -> None:
    """What each transcoding leg listens for: its pair's tone, PCMU -> Opus and Opus -> PCMU, for every
    pair tone, in the frames the legs send (each sent over and over)."""
    narrow, wide = ToneMatcher(PCMU.rate, PCMU.frame_samples), ToneMatcher(OPUS.rate, OPUS.frame_samples)
    for hz in PAIR_TONES_HZ:
        assert goertzel_db(tone_frame(hz, PCMU.rate, PCMU.frame_samples) / 32768, PCMU.rate, hz) > -10
        pcmu_frame, opus_frame = encoded_tone_frame(PCMU, hz), encoded_tone_frame(OPUS, hz)
        pcmu, opus_in, opus_out, decoder = new_coder(PCMU), new_coder(OPUS), new_coder(OPUS), new_coder(OPUS)
        up, down = Resampler(PCMU.rate, OPUS.rate), Resampler(OPUS.rate, PCMU.rate)
        to_opus = [wide.strongest(opus_out.decode(opus_in.encode(up.process(pcmu.decode(pcmu_frame))))) for _ in range(20)]
        to_pcmu = [narrow.strongest(pcmu.decode(pcmu.encode(down.process(decoder.decode(opus_frame))))) for _ in range(20)]
        assert to_opus[-15:] == to_pcmu[-15:] == [hz] * 15, hz  # settled after the codecs' first frames
    both = tone_frame(700, PCMU.rate, PCMU.frame_samples) // 2 + tone_frame(800, PCMU.rate, PCMU.frame_samples) // 2
    assert narrow.strongest(both) is None  # two pair tones alike: neither stands out
    assert narrow.strongest(np.zeros(PCMU.frame_samples, np.int16)) is None
    assert narrow.strongest(np.zeros(10, np.int16)) is None  # not a frame
    with pytest.raises(ValueError):
        ToneMatcher(PCMU.rate, 170)  # the pair tones would fall between its bins
    music = hold_music(PCMU.rate)
    frames = [narrow.strongest(music[at : at + 160]) for at in range(0, len(music) - 160, 160)]
    assert sum(hz is not None for hz in frames) < 0.01 * len(frames)  # the server's music is no pair's tone
    assert {pair_tone_hz(pair) for pair in range(len(PAIR_TONES_HZ))} == set(PAIR_TONES_HZ)
    assert pair_tone_hz(7) != pair_tone_hz(8)


def test_send_times_are_kept_by_sequence_for_the_last_ring() -> None:
    sent = SendTimes()
    for sequence in range(65_530, 65_536 + SEND_RING):
        sent.record(sequence & 0xFFFF, 1000 * sequence)
    assert sent.at(3) == 1000 * (65_536 + 3)
    assert sent.at(65_535) is None  # overwritten: older than the ring
    assert sent.at(SEND_RING + 10) is None  # not sent yet


def test_a_relayed_sequence_is_matched_to_its_source_once_one_packet_came_through_within_a_frame() -> None:
    """The relay numbers its packets as the source's plus 5000; the first two arrive late (the
    source had sent two more by then), later ones within a frame."""
    match = SequenceMatch()
    # Source packet 100 relayed as 5100 arrives when the source has sent up to 102: two frames late.
    assert match.source_sequence(5100, marker=False, newest_sent=102) == 102  # not knowable yet
    assert match.source_sequence(5101, marker=False, newest_sent=103) == 103
    # Packet 102 arrives before 103 is sent: the offset is now exact, and stays so for late ones.
    assert match.source_sequence(5102, marker=False, newest_sent=102) == 102
    assert match.offset == 5000
    assert match.source_sequence(5103, marker=False, newest_sent=105) == 103
    # Across the sequence wrap.
    assert match.source_sequence((65_535 + 5000) & 0xFFFF, marker=False, newest_sent=65_535) == 65_535
    assert match.source_sequence((65_536 + 5002) & 0xFFFF, marker=False, newest_sent=3) == 2
    # A new source (marked): its own offset from then on, even a smaller one.
    assert match.source_sequence(40, marker=True, newest_sent=20) == 20
    assert match.source_sequence(41, marker=False, newest_sent=22) == 21


def test_the_transcoding_scenario_pairs_a_pcmu_leg_with_an_opus_leg_voiceline_accepts() -> None:
    scenario = SCENARIOS["pcmu-opus"]
    assert scenario.levels == (50, 100)  # transcoding fills a core at about 100 pairs
    offers = [parse_sdp(scenario.leg(second).offer("127.0.0.1", 40002).encode()) for second in (False, True)]
    negotiated = [negotiate(offer, tuple(CODECS.values())) for offer in offers]
    assert [audio.codec for audio in negotiated] == [PCMU, OPUS]
    assert [audio.telephone_event_pt for audio in negotiated] == [101, 101]
    assert SCENARIOS["pcmu"].leg(second=True) is SCENARIOS["pcmu"]


def test_rtpengine_is_asked_to_offer_opus_and_answered_in_its_payload_type() -> None:
    """The offer (from the PCMU leg) goes to the Opus leg with Opus added; the Opus leg answers with
    the payload type rtpengine gave it."""
    assert bdecode(bencode(TRANSCODE_FLAGS)) == {"codec": {"transcode": ["opus"]}}
    offered = (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        "m=audio 20002 RTP/AVP 0 96 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:96 opus/48000/2\r\n"
        "a=rtpmap:101 telephone-event/8000\r\n"
    )
    assert sdp_payload_type(offered, "opus/48000/2") == 96
    assert sdp_payload_type(offered, "PCMU/8000") == 0
    with pytest.raises(ValueError):
        sdp_payload_type(offered, "G722/8000")


def test_a_side_by_side_row_shows_the_pairs_held_and_untranscoded_legs() -> None:
    result = level(25, 2_500, 2_500, [0.2], held=24)
    assert format_side_by_side("pcmu-opus", VOICELINE, result).split()[2:4] == ["25", "24"]
    untranscoded = replace(result, own_codec_legs=2)
    assert format_side_by_side("pcmu-opus", VOICELINE, untranscoded).endswith("2 legs heard their own codec, untranscoded")


# -- rtpengine's ng protocol ------------------------------------------------------------


def test_bencode_round_trips_ng_commands() -> None:
    command = {"command": "offer", "call-id": "c1", "flags": ["trust-address"], "sdp": "v=0\r\n", "n": -3}
    encoded = bencode(command)
    assert encoded.startswith(b"d7:call-id2:c17:command5:offer")  # keys sorted, as bencode requires
    assert bdecode(encoded) == command


@pytest.mark.parametrize("data", [b"d3:sdp", b"i12", b"5:ab", b"d3:sdp1:xe!", b"x"])
def test_malformed_bencode_is_an_ng_error(data: bytes) -> None:
    with pytest.raises(NgError):
        bdecode(data)


# -- the UAC -------------------------------------------------------------------------

LOCAL, SERVER = ("127.0.0.1", 5999), ("127.0.0.1", 5060)
ANSWER = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 24002 RTP/AVP 0\r\n"


def sent_request(data: bytes) -> SipRequest:
    message = parse_message(data)
    assert isinstance(message, SipRequest)
    return message


def answer(invite: SipRequest, status: int, body: bytes = ANSWER) -> SipResponse:
    extra = [("Contact", "<sip:voiceline@127.0.0.1:5060;transport=udp>")] if status < 300 else []
    return response_to(invite, status, to_tag="srv1", headers=extra, body=body if status < 300 else b"")


def test_invite_offers_pcmu_and_telephone_event_at_the_leg_port() -> None:
    invite = sent_request(BenchCall(LOCAL, SERVER, 40002).invite(0.0))
    assert invite.method == "INVITE" and invite.headers.get("CSeq") == "1 INVITE"
    media = parse_sdp(invite.body).media[0]
    assert (media.port, media.formats) == (40002, ["0", "101"])


@pytest.mark.parametrize(
    ("scenario", "formats", "rtpmap"),
    [("pcmu", ["0", "101"], "PCMU/8000"), ("pcmu-inband", ["0"], "PCMU/8000"), ("g722", ["9", "101"], "G722/8000")],
)
def test_each_scenario_offers_its_codec_with_or_without_telephone_event(
    scenario: str, formats: list[str], rtpmap: str
) -> None:
    invite = sent_request(BenchCall(LOCAL, SERVER, 40002, SCENARIOS[scenario]).invite(0.0))
    media = parse_sdp(invite.body).media[0]
    assert (media.port, media.formats) == (40002, formats)
    assert f"a=rtpmap:{formats[0]} {rtpmap}" in invite.body.decode()
    assert ("telephone-event" in invite.body.decode()) == ("101" in formats)


def test_answer_is_acked_in_the_dialog_and_gives_the_server_rtp_address() -> None:
    call = BenchCall(LOCAL, SERVER, 40002)
    invite = sent_request(call.invite(0.0))
    ack = sent_request(call.on_response(answer(invite, 200), 0.1) or b"")
    assert call.state is CallState.ANSWERED and call.remote_rtp == ("127.0.0.1", 24002)
    assert ack.method == "ACK" and ack.headers.get("CSeq") == "1 ACK"
    assert ack.uri == "sip:voiceline@127.0.0.1:5060;transport=udp"
    assert "tag=srv1" in (ack.headers.get("To") or "")
    assert call.on_response(answer(invite, 200), 0.6) == serialize(ack)  # a retransmitted 200 gets the same ACK
    assert call.due(5.0) is None  # nothing left to retransmit
    bye = sent_request(call.hangup(6.0) or b"")
    assert bye.method == "BYE" and bye.headers.get("CSeq") == "2 BYE"
    call.on_response(response_to(bye, 200), 6.1)
    assert call.state is CallState.ENDED


def test_a_rejected_call_fails_and_acks_the_invite_transaction() -> None:
    call = BenchCall(LOCAL, SERVER, 40002)
    invite = sent_request(call.invite(0.0))
    ack = sent_request(call.on_response(answer(invite, 503), 0.1) or b"")
    assert call.state is CallState.FAILED
    assert ack.headers.get("Via") == invite.headers.get("Via")  # same branch: the INVITE's transaction


def test_an_answer_without_usable_sdp_fails() -> None:
    call = BenchCall(LOCAL, SERVER, 40002)
    invite = sent_request(call.invite(0.0))
    call.on_response(answer(invite, 200, body=b"garbage"), 0.1)
    assert call.state is CallState.FAILED and call.remote_rtp is None


def test_invite_is_retransmitted_then_given_up() -> None:
    call = BenchCall(LOCAL, SERVER, 40002)
    first = call.invite(0.0)
    assert call.due(RETRANSMIT_SECONDS / 2) is None
    now = 0.0
    for _ in range(MAX_TRANSMISSIONS - 1):
        now += RETRANSMIT_SECONDS
        assert call.due(now) == first
    assert call.due(now + RETRANSMIT_SECONDS) is None and call.state is CallState.FAILED


def test_a_bye_from_the_server_ends_the_call() -> None:
    call = BenchCall(LOCAL, SERVER, 40002)
    invite = sent_request(call.invite(0.0))
    call.on_response(answer(invite, 200), 0.1)
    bye = SipRequest("BYE", "sip:bench@127.0.0.1:5999", invite.headers.copy())
    bye.headers.set("CSeq", "1 BYE")
    reply = parse_message(call.on_request(bye))
    assert isinstance(reply, SipResponse) and reply.status == 200
    assert call.state is CallState.ENDED


def test_the_machines_busy_time_holds_all_the_cpu_a_process_spent_in_short_bursts() -> None:
    """The busy time the whole-system figures are taken from misses none of a process's CPU, spent as
    the generator spends it: bursts on a 1 ms grid."""
    cpus = os.cpu_count() or 1
    busy, wall, cpu = busy_seconds(), time.monotonic(), time.process_time()
    while time.process_time() - cpu < 0.15:
        burst = time.monotonic()
        while time.monotonic() - burst < 0.0003:
            pass
        time.sleep(0.0007)
    busy, wall, cpu = busy_seconds() - busy, time.monotonic() - wall, time.process_time() - cpu
    resolution = 0.01 * (cpus + 1)  # /proc/stat counts in hundredths of a second
    assert cpu - resolution <= busy <= cpus * wall + resolution


@pytest.mark.integration
def test_the_window_waits_until_the_relay_has_read_what_its_sockets_hold() -> None:
    """A burst of call set-ups can leave a loaded relay seconds of audio behind in its sockets; a
    window measured while it catches up would measure the burst. Here a "relay" (this process)
    reads its backlog half a second on."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as relay, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
        relay.bind((LOOPBACK, 0))
        inode = os.fstat(relay.fileno()).st_ino
        assert inode in socket_inodes(os.getpid())
        assert queued_bytes({inode}) == 0
        for _ in range(3):
            phone.sendto(bytes(172), relay.getsockname())
        assert queued_bytes({inode}) >= 3 * 172
        reader = threading.Timer(0.5, lambda: [relay.recv(2048) for _ in range(3)])
        reader.start()
        try:
            waited = wait_until_caught_up(os.getpid(), legs=1)  # caught up below 256 bytes: none of the three
        finally:
            reader.join()
        assert queued_bytes({inode}) == 0
        assert 0.5 <= waited < 5.0


# -- a real run --------------------------------------------------------------------------


@pytest.mark.interop
def test_a_tiny_run_relays_every_probe_both_ways(voiceline_server: Callable[..., VoicelineServer]) -> None:
    """One pair, then a second, over two generator processes (so pairs may span them)."""
    server = voiceline_server({"sip": {"answer_delay": 0.0}})
    results = run_levels((server.host, server.port), server.process.pid, BenchOptions([1, 2], 1.0, workers=2))
    assert [result.pairs for result in results] == [1, 2]
    for result in results:
        assert result.pairs_held == result.pairs
        assert result.counts.sent > 0
        assert result.counts.received == result.counts.sent and result.loss == 0.0
        assert result.latency.total == result.counts.received
        assert result.server_rss_mb > 0


@pytest.mark.interop
def test_inband_dtmf_legs_relay_every_probe(voiceline_server: Callable[..., VoicelineServer]) -> None:
    """Callers without telephone-event: the server watches their audio for DTMF, and still relays it all."""
    server = voiceline_server({"sip": {"answer_delay": 0.0}})
    options = BenchOptions([2], 1.0, workers=1, scenario=SCENARIOS["pcmu-inband"])
    (result,) = run_levels((server.host, server.port), server.process.pid, options)
    assert result.pairs_held == 2 and result.counts.sent > 0
    assert result.counts.received == result.counts.sent


@pytest.mark.interop
def test_the_baseline_pairs_the_generators_legs_straight_to_each_other() -> None:
    """No relay: every probe comes back (from the partner leg itself), and the machine's busy time
    is measured for the whole-system figure."""
    results = run_baseline(BenchOptions([1, 2], 1.0, workers=2))
    assert [result.pairs for result in results] == [1, 2]
    for result in results:
        assert result.pairs_held == result.pairs and result.counts.sent > 0
        assert result.counts.received == result.counts.sent and result.loss == 0.0
        # The machine's busy time comes from /proc/stat's clock ticks, sampled 100 times a second, and
        # misses most of a load this light (a few ms of bursts), so it is only checked to be read.
        assert result.server_cpu == 0.0 and result.machine_cpu >= 0.0 and result.generator_cpu > 0.0


def run_rtpengine_levels(options: BenchOptions) -> list[LevelResult]:
    """`options`' levels against an rtpengine started on this run's port lane, its pairs set up over ng."""
    from port_table import port_block  # claims this run's lane: only tests that bind fixed ports need it

    first, last = port_block("test_bench")
    with tempfile.TemporaryDirectory(prefix="voiceline-bench-test-") as directory:
        process, ng = start_rtpengine(Path(directory), f"{first + 2}-{last}", ng_port=first)
        try:
            return run_levels(ng, process.pid, options, pairing=NG_PAIRS)
        finally:
            assert stop_server(process) == 0


@pytest.mark.interop
def test_the_same_generator_drives_rtpengine_over_ng() -> None:
    """Pairs set up with ng offer/answer in each generator process; rtpengine relays every probe both ways."""
    results = run_rtpengine_levels(BenchOptions([1, 2], 1.0, workers=2))
    assert [result.pairs for result in results] == [1, 2]
    for result in results:
        assert result.pairs_held == result.pairs and result.counts.sent > 0
        assert result.counts.received == result.counts.sent and result.loss == 0.0
        assert result.latency.total == result.counts.received


def assert_transcoded(results: list[LevelResult], levels: list[int]) -> None:
    """Every pair transcoded: each leg heard its partner's tone decoded in its own codec (so it
    received its own codec, transcoded: a PCMU leg decoding Opus bytes, or one given its partner's
    frames untouched, would hear no tone), every packet sent in the window arrived, and the sequence
    matching gave latencies a loopback relay has (a wrong offset would be a frame or more off)."""
    assert [result.pairs for result in results] == levels
    for result in results:
        assert result.pairs_held == result.pairs and result.own_codec_legs == 0
        assert result.counts.sent >= 0.9 * 2 * result.pairs * 50 * result.seconds
        assert result.counts.received == result.counts.sent and result.loss == 0.0
        assert result.latency.total == result.counts.received
        assert 0 < result.p50_ms < 10 and result.latency.counts[0] < result.latency.total


@pytest.mark.interop
def test_voiceline_transcodes_each_pcmu_caller_to_its_opus_partner(voiceline_server: Callable[..., VoicelineServer]) -> None:
    """Two processes, set up one after the other, each placing its calls one at a time: the pool
    pairs every PCMU caller with the Opus caller placed after it."""
    server = voiceline_server({"sip": {"answer_delay": 0.0}, "welcome": {"enabled": False, "offer_choice": False}})
    options = BenchOptions([1, 2], 1.0, workers=2, scenario=SCENARIOS["pcmu-opus"])
    assert_transcoded(run_levels((server.host, server.port), server.process.pid, options), [1, 2])


@pytest.mark.interop
def test_rtpengine_transcodes_each_pair_set_up_over_ng() -> None:
    results = run_rtpengine_levels(BenchOptions([1, 2], 1.0, workers=2, scenario=SCENARIOS["pcmu-opus"]))
    assert_transcoded(results, [1, 2])


@pytest.mark.interop
@pytest.mark.parametrize("kind", KINDS)
async def test_the_engine_alone_relays_every_leg_both_ways(kind: str) -> None:
    """`--engine-only`: paired legs of a real engine relay (or transcode) what the sender process
    sends them; waiting legs, unpaired, are sent hold music (with reassurances mixed in) at the
    same packet rate."""
    from port_table import port_block

    first, last = port_block("test_bench")
    result = await measure_engine(2, kind, 1.0, (first + 2, last))
    assert (result.pairs, result.kind) == (2, kind)
    # 4 legs x 50 packets a second, each relayed once to its partner (waiting: 50 of music each).
    assert 0.9 * 200 <= result.packets <= 1.1 * 200
    assert result.total_us == result.user_us + result.system_us >= 0


def can_use_realtime() -> bool:
    probe = "import os; os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


@pytest.mark.interop
def test_realtime_priority_puts_the_server_under_sched_rr(voiceline_server: Callable[..., VoicelineServer]) -> None:
    server = voiceline_server({"media": {"realtime_priority": 3}})
    events = [event["event"] for event in server.log_events()]
    if can_use_realtime():
        assert os.sched_getscheduler(server.process.pid) == os.SCHED_RR
        assert os.sched_getparam(server.process.pid).sched_priority == 3
        assert "process.realtime" in events
    else:
        assert os.sched_getscheduler(server.process.pid) == os.SCHED_OTHER
        assert "process.realtime_unavailable" in events
