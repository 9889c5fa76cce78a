"""The one codec table: what each codec we speak is, read by SDP (sip) and media (audio) alike.

A leaf module (it imports nothing from voiceline), so `sip` and `audio`, which
must not import each other, both read it. Configuration and trunks name codecs
by `name`; everything past them passes `Codec` objects.

The RTP clock can differ from the PCM rate: G.722 keeps an 8000 Hz clock for
16 kHz audio (RFC 3551) and Opus always counts 48000 Hz with "2" channels in
its rtpmap (RFC 7587), whatever it carries; we decode it mono at 16 kHz.
"""

from __future__ import annotations

from dataclasses import dataclass

FRAME_SECONDS = 0.020  # every frame we send or generate


@dataclass(frozen=True)
class Codec:
    """One codec as SDP writes it and as we decode it."""

    name: str  # how configuration and trunks name it: the SDP encoding name, upper case
    encoding: str  # as our rtpmap spells it (RFC 7587 writes "opus")
    payload_type: int | None  # the static RTP payload type (RFC 3551); None: a dynamic one is negotiated
    clock_rate: int  # the RTP timestamp clock, the rtpmap rate
    channels: int  # as the rtpmap says
    fmtp: str | None  # our a=fmtp parameters, if any
    rate: int  # PCM sample rate of the decoded audio

    @property
    def frame_samples(self) -> int:
        """PCM samples in a 20 ms frame."""
        return round(self.rate * FRAME_SECONDS)

    @property
    def frame_ticks(self) -> int:
        """RTP clock ticks in a 20 ms frame."""
        return round(self.clock_rate * FRAME_SECONDS)

    @property
    def rtpmap(self) -> str:
        """The rtpmap encoding, e.g. "G722/8000" or "opus/48000/2"."""
        return f"{self.encoding}/{self.clock_rate}" + (f"/{self.channels}" if self.channels != 1 else "")


PCMU = Codec("PCMU", "PCMU", 0, 8000, 1, None, 8000)
PCMA = Codec("PCMA", "PCMA", 8, 8000, 1, None, 8000)
G722 = Codec("G722", "G722", 9, 8000, 1, None, 16000)
OPUS = Codec("OPUS", "opus", None, 48000, 2, "maxplaybackrate=16000;sprop-maxcapturerate=16000;stereo=0;sprop-stereo=0", 16000)

CODECS = {codec.name: codec for codec in (PCMU, PCMA, G722, OPUS)}
CODEC_NAMES = tuple(CODECS)


def lookup(name: str) -> Codec:
    """The codec a configuration or trunk names (any case); ValueError when there is none."""
    try:
        return CODECS[name.upper()]
    except KeyError:
        raise ValueError("unsupported codec") from None
