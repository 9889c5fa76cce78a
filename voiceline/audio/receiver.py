"""The receiving side of a media leg, sans-I/O: what arrived on its RTP and RTCP ports.

`Receiver.receive` is fed each datagram with its source address and the time
and answers what it was, as a small int (no object per packet): audio whose
payload is `packet[offset:end]` (decoded into `pcm` when someone needs PCM or
in-band DTMF is watched for), a digit, a telephone-event that starts none,
or a dropped packet (counted). A receiver told to `batch_tones` leaves in-band
DTMF detection of G.711 audio to its leg (TONES), which checks many legs'
frames in one vectorised pass and hands each back (`tones_checked`). The LATCHED flag marks the packet that latched
(or moved) the peer: from then on the leg sends to `peer`.

Per packet, in order: SRTP unprotect (a packet failing authentication or
replayed is dropped before it can latch), one plain-header check, the payload
type, the latched address (any other source asks the latch rules, latch.py),
then reception statistics. Everything else is off the fast path.
"""

from __future__ import annotations

import struct

import numpy as np

from voiceline.audio.codecs import NARROWBAND, Coder, new_coder
from voiceline.audio.dtmf import TelephoneEventReceiver, ToneDetector
from voiceline.audio.latch import Address, Heard, Learning, SourceFilter
from voiceline.audio.rtcp import ReceptionStats, parse
from voiceline.audio.rtp import HEADER_SIZE, MAX_PAYLOAD, payload_end, payload_offset
from voiceline.audio.srtp import SrtpContext
from voiceline.codec_table import PCMU, Codec

# What `receive` says arrived.
DROPPED = 0  # malformed, another payload type, an unproven source, or failed SRTP: counted in packets_dropped
AUDIO = 1  # audio to pass on as it is: `packet[offset:end]`
PCM = 2  # audio decoded into `pcm` (muted where it held DTMF); `digit` when a key press began in it
DIGIT = 3  # a telephone-event starting a key press: `digit`; events are for us, never the partner
EVENT = 4  # a telephone-event that starts no key press (an update, an end or a repeat)
TONES = 5  # G.711 audio `packet[offset:end]` to check for in-band DTMF before it is relayed (see `tones_checked`)
LATCHED = 8  # added to the above: this packet latched or moved the peer, now `peer`
COMFORT_NOISE_PT = 13  # RFC 3389: sent by a quiet caller's phone instead of audio

_NO_PAYLOAD_TYPE = -1
_PLAIN_FIRST_BYTE = 0x80  # version 2, no padding, no extension, no CSRC
_MAX_PLAIN_PACKET = HEADER_SIZE + MAX_PAYLOAD
_FIXED_HEADER = struct.Struct("!BBHII")  # first byte, marker|payload type, sequence, timestamp, SSRC


class Receiver:
    """What one leg receives from its peer: filtered, latched, counted, and digits found in it.

    `start` sets the negotiated stream; until then no payload type matches and
    every packet is dropped.
    """

    def __init__(self, *, inband_dtmf: bool = True, learning: Learning = Learning(), batch_tones: bool = False) -> None:
        """`inband_dtmf`: look for DTMF tones in the audio of a stream without telephone-event.
        `learning`: how a source other than the SDP's or the signalling's host proves itself.
        `batch_tones`: G.711 audio to look for tones in comes back as TONES, not decoded here."""
        self.codec = PCMU  # replaced by start
        self.packets_in = 0
        self.packets_in_kernel = 0  # of packets_in: relayed by the kernel path
        self.packets_dropped = 0
        self.last_received = 0.0  # when the last valid packet arrived (the `now` it was fed with)
        self.peer: Address | None = None  # the latched source; packets from it pass with one comparison
        self.reception = ReceptionStats(PCMU.clock_rate)
        # The last packet that arrived as AUDIO or PCM, and its payload span.
        self.packet = b""
        self.offset = self.end = 0
        self.pcm = np.zeros(0, dtype=np.int16)  # its audio as PCM, with PCM
        self.muted = False  # the PCM held DTMF and was silenced
        self.digit: str | None = None  # with DIGIT, or a key press found in PCM
        self.peer_report: tuple[int, float] | None = None  # the peer's RTCP on our stream: (lost, jitter seconds)
        self.rtcp_source: Address | None = None  # where the peer's RTCP comes from (its host only)
        self._inband_dtmf = inband_dtmf
        self._learning = learning
        self._sources: SourceFilter | None = None
        self._srtp: SrtpContext | None = None
        self._audio_pt = self._event_pt = _NO_PAYLOAD_TYPE
        self._events = TelephoneEventReceiver()
        self._tones: ToneDetector | None = None
        self._decoder: Coder | None = None
        self._pcm_wanted = False
        self._decoding = False  # decode audio: in-band DTMF is watched for, or PCM is wanted
        self._batch_tones = batch_tones
        self._deferring = False  # answer TONES: the leg's batch decodes and looks for tones
        # Whether a TONES frame holding no digit may be relayed as it is: no key press is under way
        # and nobody hearing this stream has come to want PCM since it arrived.
        self.tones_pass = False

    def start(
        self,
        announced: Address,
        codec: Codec,
        payload_type: int,
        telephone_event_pt: int | None,
        now: float,
        *,
        signalling_host: str | None = None,
        srtp: SrtpContext | None = None,
    ) -> None:
        """Take the negotiated stream. A source on the SDP's host (`announced`) or on `signalling_host`
        (where the call's SIP came from) latches at once, any other only after proving itself.
        With `srtp` every packet is unprotected first."""
        self.codec = codec
        self.reception = ReceptionStats(codec.clock_rate)
        self._sources = SourceFilter(announced, signalling_host, now, self._learning)
        self._srtp = srtp
        self._audio_pt = payload_type
        if telephone_event_pt is not None:
            self._event_pt = telephone_event_pt
        elif self._inband_dtmf:
            self._tones = ToneDetector(codec.rate)
        self._update_decoding()

    def announce(self, announced: Address, now: float) -> bool:
        """The SDP address of a new offer or answer: a new one is learnt afresh (True); the same one
        (hold, resume, a refresh) keeps the latched peer (False)."""
        assert self._sources is not None, "not started"
        if announced == self._sources.announced:
            return False
        self._sources.restart(announced, now)
        self.peer = self.rtcp_source = None
        return True

    @property
    def audio_payload_type(self) -> int:
        return self._audio_pt

    @property
    def decoding(self) -> bool:
        """Whether audio is decoded (in-band DTMF is watched for, or a listener needs PCM)."""
        return self._decoding

    def forwarded(self, packets: int, last_received: float, highest: int, wraps: int, jitter_ticks: float) -> None:
        """Audio from the peer was relayed and counted elsewhere (the kernel path): `packets`, the
        last arriving at `last_received`, the highest sequence number now `highest` (see
        ReceptionStats.forwarded)."""
        if packets:
            self.packets_in += packets
            self.packets_in_kernel += packets
            self.last_received = max(self.last_received, last_received)
            self.reception.forwarded(packets, highest, wraps, jitter_ticks)

    def want_pcm(self, wanted: bool) -> None:
        """Whether someone hearing this stream needs it as PCM (transcoding, or under a prompt)."""
        self._pcm_wanted = wanted
        self._update_decoding()

    def _update_decoding(self) -> None:
        self._decoding = self._tones is not None or self._pcm_wanted
        self._deferring = (
            self._batch_tones and self._tones is not None and not self._pcm_wanted and self.codec in NARROWBAND
        )
        self._update_tones_pass()

    def _update_tones_pass(self) -> None:
        self.tones_pass = self._deferring and self._tones is not None and self._tones.idle

    def receive(self, data: bytes, source: Address, now: float) -> int:
        """What the datagram `data` from `source`, arriving at `now`, was (see the module's kinds)."""
        if self._srtp is not None:
            plain = self._srtp.unprotect(data)
            if plain is None:  # forged, corrupted or replayed: never reaches the latch or a listener
                self.packets_dropped += 1
                return DROPPED
            data = plain
        size = len(data)
        if size < HEADER_SIZE:
            self.packets_dropped += 1
            return DROPPED
        first, second, sequence, timestamp, ssrc = _FIXED_HEADER.unpack_from(data)  # the one parse per packet
        if first == _PLAIN_FIRST_BYTE and size <= _MAX_PLAIN_PACKET:
            offset, end = HEADER_SIZE, size  # nearly every packet: a plain header, nothing more to parse
        else:
            offset = payload_offset(data)
            if offset < 0 or size - offset > MAX_PAYLOAD:
                self.packets_dropped += 1
                return DROPPED
            end = payload_end(data)
        payload_type = second & 0x7F
        if payload_type != self._audio_pt and payload_type != self._event_pt:
            if payload_type == COMFORT_NOISE_PT and source == self.peer:
                self.last_received = now  # the caller is there, only quiet: not relayed, not an error
                return DROPPED
            self.packets_dropped += 1
            return DROPPED
        latched = 0
        if source != self.peer:
            if not self._admit(source, ssrc, sequence, now):
                self.packets_dropped += 1
                return DROPPED
            latched = LATCHED
        self.packets_in += 1
        self.last_received = now
        self.reception.arrived(sequence, timestamp, ssrc, now)
        if payload_type == self._audio_pt:
            self.packet, self.offset, self.end = data, offset, end
            if self._decoding:
                return (TONES if self._deferring else self._decode()) + latched
            return AUDIO + latched
        self.digit = self._events.feed(data[offset : offset + 4], timestamp)
        return (EVENT if self.digit is None else DIGIT) + latched

    def _admit(self, source: Address, ssrc: int, sequence: int, now: float) -> bool:
        """A packet from anywhere but the latched peer: the latch rules decide whether it latches
        (or moves) the peer, else it is dropped as injection."""
        assert self._sources is not None  # before start no payload type matches
        heard = Heard(self.reception.ssrc, self.reception.highest_sequence, self.last_received)
        if not self._sources.admit(source, ssrc, sequence, now, heard):
            return False
        self.peer = source  # symmetric RTP: the leg answers where the peer really sends from
        self.rtcp_source = None
        return True

    def _decode(self) -> int:
        """The slow path: decode, and look for in-band DTMF (muting the frames that hold it)."""
        if self._decoder is None:
            self._decoder = new_coder(self.codec)
        pcm = self._decoder.decode(self.packet[self.offset : self.end])
        self._checked(pcm, None if self._tones is None else self._tones.frame_digit(pcm))
        return PCM

    def tones_checked(self, packet: bytes, offset: int, end: int, pcm: np.ndarray, frame_digit: str | None) -> None:
        """A frame that came as TONES, decoded into `pcm` and found to hold `frame_digit` (see
        dtmf.frame_digits): from now on it is the last packet, as PCM would have left it."""
        self.packet, self.offset, self.end = packet, offset, end
        self._checked(pcm, frame_digit)

    def _checked(self, pcm: np.ndarray, frame_digit: str | None) -> None:
        self.digit, self.muted = None, False
        if self._tones is not None:
            self.digit, self.muted = self._tones.track(frame_digit)
            self._update_tones_pass()
            if self.muted:
                pcm = np.zeros_like(pcm)
        self.pcm = pcm

    def receive_rtcp(self, data: bytes, source: Address, our_ssrc: int, now: float) -> bool:
        """An RTCP datagram; only the latched peer's host may report. True when it was taken."""
        if self.peer is None or source[0] != self.peer[0]:
            return False
        if self._srtp is not None:
            plain = self._srtp.unprotect_rtcp(data)
            if plain is None:
                return False
            data = plain
        parsed = parse(data, our_ssrc)
        if parsed is None:
            return False
        self.rtcp_source = source
        if parsed.about_us is not None:
            self.peer_report = (parsed.about_us.cumulative_lost, parsed.about_us.jitter_ticks / self.codec.clock_rate)
        if parsed.sr_ntp_middle is not None:
            self.reception.last_sr = parsed.sr_ntp_middle
            self.reception.last_sr_at = now
        return True
