"""The sending side of a media leg: one outbound RTP stream, and what the leg hears on it.

A leg hears hold audio, another leg's stream (relayed: the header rewritten
into a reused buffer; or transcoded through PCM), nothing, and optionally a
prompt mixed over what it hears. Whatever it hears leaves as one stream
(`OutboundStream`: one SSRC, continuous sequence and timestamp, the marker
bit after each change), SRTP-protected last on an SRTP leg, through the
datagram socket it is given. Sans-I/O apart from that socket: time comes in
as arguments (`now`, a pacer tick's `due`).
"""

from __future__ import annotations

import struct
from typing import Protocol

import numpy as np

from voiceline.audio.codecs import Coder, Resampler, new_coder, translation
from voiceline.audio.latch import Address
from voiceline.audio.mixing import JitterBuffer, Prompt
from voiceline.audio.rtp import HEADER_SIZE, MARKER, MAX_PAYLOAD, OutboundStream, build_packet
from voiceline.audio.srtp import SrtpContext
from voiceline.codec_table import PCMU, Codec

_NO_PAYLOAD_TYPE = -1
_TS_MASK = 0xFFFFFFFF
_SECOND_SEQ_TS = struct.Struct("!xBHI")



class Frames(Protocol):
    """Payloads played in a loop, one per tick (a list, or hold audio encoded as it is first played)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> bytes: ...

class DatagramSocket(Protocol):
    """What a sender needs of its socket (a non-blocking UDP socket): done with `data` when it
    returns; OSError when the datagram was not sent."""

    def sendto(self, data: bytes | memoryview, addr: Address | None, /) -> object: ...


class Sender:
    """What one leg sends to its peer. `start` before anything is sent."""

    def __init__(self, socket: DatagramSocket) -> None:
        self.remote: Address | None = None  # where we send: the latched peer, else the SDP address
        self.codec = PCMU  # replaced by start
        self.stream = OutboundStream()  # replaced by start; counts what was sent
        self.sending = True  # False while the peer holds us: a prompt then runs on unheard
        self.holding = False
        self.listening = False  # hears a source (the bridge connects it)
        self.needs_pcm = False  # its source's audio must come as PCM: transcoding, or under a prompt
        self._socket = socket
        self._audio_pt = _NO_PAYLOAD_TYPE
        self._encoder: Coder | None = None
        self._translate: bytes | None = None  # a G.711 law table for the relayed payload
        self._transcodes = False  # from the source's codec to ours only through PCM
        self._source_clock = PCMU.clock_rate
        self._resampler: Resampler | None = None
        self._reframed: np.ndarray | None = None  # samples waiting for a whole frame (see _send_reframed)
        self._hold_frames: Frames = ()
        self._hold_position = 0
        self._prompt: Prompt | None = None
        self.prompts_started = 0  # tells a prompt's end from the end of one it replaced
        self._jitter: JitterBuffer | None = None
        self._concealed_before = 0
        self._buf = bytearray(HEADER_SIZE + MAX_PAYLOAD)  # each packet sent is written here
        self._view = memoryview(self._buf)  # never resized from here on: slices of it are sent

    def start(self, remote: Address, codec: Codec, payload_type: int, srtp: SrtpContext | None = None) -> None:
        """Send `codec` as `payload_type` to `remote`; with `srtp`, SRTP-protected."""
        self.remote = remote
        self.codec = codec
        self.stream = OutboundStream(codec.clock_rate)
        self._audio_pt = payload_type
        if srtp is not None:
            self._socket = _ProtectingSocket(self._socket, srtp)

    @property
    def packets_out(self) -> int:
        return self.stream.packets

    @property
    def audio_payload_type(self) -> int:
        return self._audio_pt

    @property
    def relays_as_is(self) -> bool:
        """Whether what it sends now is its source's packets with only the header rewritten: a source
        in its own codec, no prompt, no hold audio, sending allowed (what the kernel path can do)."""
        return self.listening and self.sending and not self.paced and not self.needs_pcm and self._translate is None

    @property
    def paced(self) -> bool:
        """Whether its frames come from our 20 ms clock (hold audio or a prompt), not from a source."""
        return self.holding or self._prompt is not None

    @property
    def concealed_frames(self) -> int:
        """Frames made up under prompts (the jitter buffer's loss concealment)."""
        return self._concealed_before + (self._jitter.concealed_frames if self._jitter is not None else 0)

    # -- what it hears ------------------------------------------------------------

    def hold(self, frames: Frames) -> None:
        """Hear `frames` (hold audio in our codec) in a loop from the first, one per tick."""
        self.holding = True
        self._hold_frames = frames
        self._hold_position = 0
        self.stream.source_changed()

    def stop_holding(self) -> None:
        self.holding = False

    def hear_source(self, codec: Codec) -> None:
        """Hear a source in `codec` (the bridge's call): relayed for the same codec or the other
        G.711 law, else transcoded through PCM."""
        try:
            self._translate, self._transcodes = translation(codec, self.codec), False
        except ValueError:
            self._translate, self._transcodes = None, True
        self._source_clock = codec.clock_rate
        self._resampler = Resampler(codec.rate, self.codec.rate)
        self._reframed = None
        self.listening = True
        self.needs_pcm = self._transcodes or self._prompt is not None
        self.stream.source_changed()

    def hear_nothing(self) -> None:
        """No source any more (the bridge's call)."""
        self.listening = False

    def play_over(self, pcm: np.ndarray, rate: int) -> None:
        """Mix a prompt (int16 at `rate`) into what it hears from the next tick until it ends."""
        samples = Resampler(rate, self.codec.rate).process(np.asarray(pcm, dtype=np.int16))
        self._prompt = Prompt(samples, self.codec.frame_samples)
        self.prompts_started += 1
        if self._jitter is None:  # a prompt replacing another keeps the partner's buffered audio
            self._jitter = JitterBuffer(self.codec.frame_samples)
        self.needs_pcm = True
        self.stream.source_changed()

    def stop_prompt(self) -> None:
        """End any prompt playing now, unfinished (an empty one replaces it)."""
        self.prompts_started += 1
        if self._prompt is not None:
            self._end_prompt()

    def _end_prompt(self) -> None:
        assert self._jitter is not None  # set with the prompt
        self._concealed_before += self._jitter.concealed_frames
        self._prompt = self._jitter = None
        self.needs_pcm = self._transcodes
        self.stream.source_changed()

    # -- sending ------------------------------------------------------------------

    def tick(self, due: float) -> bool:
        """The pacer's 20 ms tick at `due`: the next mixed frame under a prompt, else the next hold
        frame. True when the prompt ended with this frame."""
        if self._prompt is None:
            payload = self._hold_frames[self._hold_position]
            self._hold_position = (self._hold_position + 1) % len(self._hold_frames)
            self._send(self.stream.next_generated(self._buf, payload, self._audio_pt, due))
            return False
        assert self._jitter is not None
        under = self._jitter.pop() if self.listening else np.zeros(self.codec.frame_samples, np.int16)
        mixed = self._prompt.mix(under)
        if self.sending:
            payload = self._own_encoder().encode(mixed)
            self._send(self.stream.next_generated(self._buf, payload, self._audio_pt, due))
        if not self._prompt.done:
            return False
        self._end_prompt()  # after sending: the next packet, from the partner or hold, is marked
        return True

    def relay(self, packet: bytes, offset: int, end: int, now: float) -> None:
        """The fast path: the source's packet (payload `packet[offset:end]`) sent on as ours."""
        size = self.stream.relay_into(self._buf, packet, offset, end, self._audio_pt, now, self._translate)
        # `_send`, inlined: this runs for every relayed packet.
        try:
            self._socket.sendto(self._view[:size], self.remote)
        except OSError:  # the kernel's buffer is full or it refused: late audio is dropped, never queued
            pass

    def hear_pcm(self, packet: bytes, pcm: np.ndarray, now: float) -> None:
        """The source's audio as PCM: into the jitter buffer under a prompt, else encoded in our
        codec and sent with the packet's own sequence and timestamp (in our clock), or re-framed
        into 20 ms frames when our codec cannot take the packet's duration (Opus and 30 ms)."""
        assert self._resampler is not None  # set with the source
        pcm = self._resampler.process(pcm)
        if self._jitter is not None:
            self._jitter.push(pcm)
            return
        encoder = self._own_encoder()
        if not encoder.accepts(len(pcm)) or self._reframed is not None:
            self._send_reframed(pcm, encoder, now)
            return
        second, sequence, timestamp = _SECOND_SEQ_TS.unpack_from(packet)
        timestamp = timestamp * self.codec.clock_rate // self._source_clock & _TS_MASK
        ours = build_packet(0, sequence, timestamp, 0, encoder.encode(pcm), bool(second & MARKER))
        self._send(self.stream.relay_into(self._buf, ours, HEADER_SIZE, len(ours), self._audio_pt, now))

    def _send_reframed(self, pcm: np.ndarray, encoder: Coder, now: float) -> None:
        """Whole 20 ms frames out of whatever durations arrive, paced by arrival (the rare path:
        a source whose packet duration our codec cannot encode). Leaves it when durations fit."""
        if self._reframed is None:
            self._reframed = np.zeros(0, dtype=np.int16)
            self.stream.source_changed()
        pending = np.concatenate((self._reframed, pcm))
        size = self.codec.frame_samples
        for first in range(0, len(pending) - size + 1, size):
            payload = encoder.encode(pending[first : first + size])
            self._send(self.stream.next_generated(self._buf, payload, self._audio_pt, now))
        pending = pending[len(pending) - len(pending) % size :]
        if len(pending) == 0 and encoder.accepts(len(pcm)):
            self._reframed = None  # back to one packet per packet, with the source's numbering
            self.stream.source_changed()
        else:
            self._reframed = pending

    def _own_encoder(self) -> Coder:
        if self._encoder is None:
            self._encoder = new_coder(self.codec)
        return self._encoder

    def _send(self, size: int) -> None:
        """Send the packet written into our buffer."""
        try:
            self._socket.sendto(self._view[:size], self.remote)
        except OSError:  # as in `relay`
            pass


class _ProtectingSocket:
    """An SRTP leg's socket: what is sent is protected last (into a new object, so the sender's
    buffer stays its own); a packet libsrtp refuses (too long) is not sent."""

    def __init__(self, socket: DatagramSocket, srtp: SrtpContext) -> None:
        self._socket = socket
        self._srtp = srtp

    def sendto(self, data: bytes | memoryview, addr: Address | None, /) -> None:
        packet = self._srtp.protect(bytes(data))
        if packet is not None:
            self._socket.sendto(packet, addr)
