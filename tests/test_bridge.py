"""Who hears whom, sans-I/O: the bridge between receiving and sending sides, and the sending side
on a fake clock (a socket that records what it is given)."""

from __future__ import annotations

import numpy as np

from voiceline.audio import g711
from voiceline.audio.bridge import Bridge
from voiceline.audio.codecs import new_coder
from voiceline.audio.receiver import AUDIO, LATCHED, PCM, Receiver
from voiceline.audio.rtp import RtpHeader, build_packet, parse_header
from voiceline.audio.sender import Sender
from voiceline.codec_table import G722, PCMA, PCMU, Codec

PHONE = ("127.0.0.1", 4000)


class RecordingSocket:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int] | None]] = []

    def sendto(self, data: bytes | memoryview, addr: tuple[str, int] | None) -> None:
        self.sent.append((bytes(data), addr))

    def packets(self) -> list[tuple[RtpHeader, bytes]]:
        parsed = []
        for data, _ in self.sent:
            header = parse_header(data)
            assert header is not None
            parsed.append((header, data[header.payload_offset : header.payload_end]))
        return parsed


class Side:
    """One leg's two sides, started in `codec` as its static payload type."""

    def __init__(self, codec: Codec = PCMU, host: str = "127.0.0.1", port: int = 4000) -> None:
        assert codec.payload_type is not None
        self.codec, self.phone = codec, (host, port)
        self.socket = RecordingSocket()
        self.receiver = Receiver()
        self.receiver.start(self.phone, codec, codec.payload_type, 101, 0.0)
        self.sender = Sender(self.socket)
        self.sender.start(self.phone, codec, codec.payload_type)
        self.sequence = 0

    def speak(self, payload: bytes) -> int:
        """A packet from the phone into the receiving side; what it says arrived."""
        assert self.codec.payload_type is not None
        packet = build_packet(self.codec.payload_type, self.sequence, self.sequence * 160, 0x5151, payload)
        self.sequence += 1
        return self.receiver.receive(packet, self.phone, self.sequence * 0.02) & ~LATCHED


def relay_to_listeners(bridge: Bridge, source: Side, now: float) -> None:
    """What a leg does with AUDIO: each listener sends the packet on as its own."""
    receiver = source.receiver
    for listener in bridge.listeners(receiver):
        listener.relay(receiver.packet, receiver.offset, receiver.end, now)


VOICE = g711.ulaw_encode(np.full(160, 1200, dtype=np.int16))


def test_a_listener_of_the_same_codec_relays_the_payload_under_its_own_stream() -> None:
    bridge, a, b = Bridge(), Side(), Side(port=4002)
    bridge.connect(a.sender, b.receiver)
    assert bridge.listeners(b.receiver) == [a.sender] and bridge.source(a.sender) is b.receiver
    for _ in range(3):
        assert b.speak(VOICE) == AUDIO
        relay_to_listeners(bridge, b, 0.0)
    packets = a.socket.packets()
    assert [payload for _, payload in packets] == [VOICE] * 3
    assert {header.ssrc for header, _ in packets} == {a.sender.stream.ssrc} != {0x5151}
    assert [header.marker for header, _ in packets] == [True, False, False]
    assert {addr for _, addr in a.socket.sent} == {a.phone} and a.sender.packets_out == 3


def test_the_other_g711_law_is_relayed_through_a_table_without_decoding() -> None:
    bridge, alaw, ulaw = Bridge(), Side(PCMA), Side(PCMU, port=4002)
    bridge.connect(alaw.sender, ulaw.receiver)
    assert ulaw.speak(VOICE) == AUDIO
    relay_to_listeners(bridge, ulaw, 0.0)
    ((header, payload),) = alaw.socket.packets()
    assert header.payload_type == PCMA.payload_type
    assert payload == VOICE.translate(g711.translation("PCMU", "PCMA"))


def test_a_transcoding_listener_makes_its_source_decode_until_it_leaves() -> None:
    bridge, wide, ulaw, other = Bridge(), Side(G722), Side(PCMU, port=4002), Side(PCMU, port=4004)
    bridge.connect(other.sender, ulaw.receiver)
    assert ulaw.speak(VOICE) == AUDIO
    bridge.connect(wide.sender, ulaw.receiver)
    assert wide.sender.needs_pcm and not other.sender.needs_pcm
    assert ulaw.speak(VOICE) == PCM
    wide.sender.hear_pcm(ulaw.receiver.packet, ulaw.receiver.pcm, 0.02)
    ((header, payload),) = wide.socket.packets()
    assert header.payload_type == G722.payload_type and len(new_coder(G722).decode(payload)) == 320  # 20 ms at 16 kHz
    bridge.disconnect(wide.sender)
    assert not wide.sender.listening and bridge.listeners(ulaw.receiver) == [other.sender]
    assert ulaw.speak(VOICE) == AUDIO


def test_a_prompt_on_a_listener_asks_for_pcm_while_it_plays() -> None:
    bridge, a, b = Bridge(), Side(), Side(port=4002)
    bridge.connect(a.sender, b.receiver)
    a.sender.play_over(np.full(400, 3000, dtype=np.int16), 8000)  # 50 ms: three ticks
    bridge.listener_changed(a.sender)
    assert a.sender.paced and b.speak(VOICE) == PCM
    ended = [a.sender.tick(n * 0.02) for n in range(3)]
    assert ended == [False, False, True] and not a.sender.paced
    bridge.listener_changed(a.sender)
    assert b.speak(VOICE) == AUDIO
    assert [header.marker for header, _ in a.socket.packets()] == [True, False, False]


def test_a_prompt_plays_on_unheard_while_the_peer_holds_us() -> None:
    a = Side()
    a.sender.play_over(np.full(320, 3000, dtype=np.int16), 8000)
    a.sender.sending = False
    assert [a.sender.tick(n * 0.02) for n in range(2)] == [False, True]
    assert a.socket.sent == []


def test_hearing_another_source_leaves_the_first_and_continues_the_stream() -> None:
    bridge, a, b, c = Bridge(), Side(), Side(port=4002), Side(port=4004)
    bridge.connect(a.sender, b.receiver)
    b.speak(VOICE)
    relay_to_listeners(bridge, b, 0.0)
    bridge.connect(a.sender, c.receiver)
    assert bridge.listeners(b.receiver) == [] and bridge.listeners(c.receiver) == [a.sender]
    c.speak(VOICE)
    relay_to_listeners(bridge, c, 0.02)
    (first, _), (second, _) = a.socket.packets()
    assert second.marker and second.sequence == (first.sequence + 1) % 2**16
    assert (second.timestamp - first.timestamp) % 2**32 == 160


def test_removing_a_leg_silences_its_listeners_and_empties_the_list_its_fast_path_holds() -> None:
    bridge, a, b, c = Bridge(), Side(), Side(port=4002), Side(port=4004)
    held = bridge.listeners(b.receiver)
    bridge.connect(a.sender, b.receiver)
    bridge.connect(c.sender, b.receiver)
    bridge.connect(b.sender, a.receiver)
    bridge.remove(b.receiver, b.sender)
    assert held == [] and bridge.source(a.sender) is None and bridge.source(c.sender) is None
    assert not a.sender.listening and not c.sender.listening and not b.sender.listening
    assert bridge.listeners(a.receiver) == []
    bridge.connect(a.sender, c.receiver)  # told otherwise: hears again
    assert bridge.listeners(c.receiver) == [a.sender]
