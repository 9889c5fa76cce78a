"""The state the kernel path hands back: the map entry's layout, and how its counts and stream
position fold into a leg's reception statistics and outbound stream (no kernel needed)."""

from __future__ import annotations

from voiceline.audio.kernel.forwarding import RewriteState
from voiceline.audio.rtcp import ReceptionStats
from voiceline.audio.rtp import HEADER_SIZE, MAX_PAYLOAD, OutboundStream, StreamPosition, build_packet, parse_header


def test_the_state_round_trips_through_the_map_layout():
    state = RewriteState(False, 2**40 + 5, 65535, 2**32 - 1, 12345, 2**31 + 7, 65000, 2, 1234, 10**9, 10**11, 2**41)
    packed = state.pack()
    assert len(packed) == 80  # struct leg in rtp_forward.bpf.c
    assert RewriteState.unpack(packed) == state


def rtp(sequence: int, timestamp: int = 0, ssrc: int = 0x5EED) -> bytes:
    return build_packet(0, sequence % 2**16, timestamp % 2**32, ssrc, bytes(160))


def test_packets_counted_elsewhere_keep_loss_exact_across_a_wrap():
    reception = ReceptionStats(8000)
    for sequence in range(65530, 65536):
        reception.update(rtp(sequence), 0.0)
    reception.forwarded(100, (65535 + 100) % 2**16, 1, 12.5)  # the kernel took 100 more, wrapping once
    reception.update(rtp(65536 + 100), 2.0)
    assert (reception.expected, reception.received, reception.lost) == (107, 107, 0)
    assert reception.jitter_seconds == 12.5 / 8000  # the kernel's; the packet after it starts a new transit
    reception.forwarded(10, 120, 0, 12.5)  # ten of the next twenty: the other ten were lost
    assert (reception.expected, reception.lost) == (127, 10)


def test_a_stream_resumes_where_another_relay_left_it():
    stream, buffer = OutboundStream(ssrc=7, sequence=100, timestamp=1000), bytearray(HEADER_SIZE + MAX_PAYLOAD)

    def relay(sequence: int, timestamp: int, now: float):
        packet = rtp(sequence, timestamp)
        size = stream.relay_into(buffer, packet, HEADER_SIZE, len(packet), 0, now)
        return parse_header(bytes(buffer[:size]))

    first = relay(500, 80000, 0.0)
    assert first is not None and first.marker and (first.sequence, first.timestamp) == (100, 1000)
    position = stream.position()
    assert not position.changed
    # Another relay sent the source's next 50 packets with the same offsets.
    shift_seq, shift_ts = position.sequence_shift, position.timestamp_shift
    newest = ((549 + shift_seq) % 2**16, (80000 + 49 * 160 + shift_ts) % 2**32)
    stream.resume(StreamPosition(False, 0.98, *newest, shift_seq, shift_ts), 50, 50 * 160)
    after = relay(550, 80000 + 50 * 160, 1.0)
    assert after is not None and not after.marker
    assert (after.sequence, after.timestamp) == ((newest[0] + 1) % 2**16, (newest[1] + 160) % 2**32)
    assert (stream.packets, stream.octets) == (52, 52 * 160)
    stream.source_changed()  # a new source continues from the newest packet, marked
    changed = relay(9, 9, 1.02)
    assert changed is not None and changed.marker and changed.sequence == (after.sequence + 1) % 2**16
    assert changed.timestamp == (after.timestamp + 160) % 2**32
