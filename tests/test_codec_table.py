"""The codec table: SDP and media read the same facts of each codec."""

from __future__ import annotations

import numpy as np
import pytest

from voiceline.audio.codecs import new_coder
from voiceline.codec_table import CODEC_NAMES, CODECS, G722, OPUS, PCMA, PCMU, lookup
from voiceline.sip.sdp import OFFER_PAYLOAD_TYPES, codec_attributes, negotiate, parse_sdp


def offer_of(codec_lines: list[str], formats: str) -> bytes:
    lines = ["v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-", "c=IN IP4 127.0.0.1", "t=0 0", f"m=audio 4000 RTP/AVP {formats}"]
    return "".join(line + "\r\n" for line in lines + codec_lines).encode()


def test_names_are_what_configuration_uses_and_lookup_takes_any_case() -> None:
    assert CODEC_NAMES == ("PCMU", "PCMA", "G722", "OPUS")
    assert lookup("opus") is OPUS and lookup("pcmu") is PCMU
    with pytest.raises(ValueError, match="unsupported codec"):
        lookup("G729")


def test_rtp_clock_and_pcm_rate_differ_where_the_rfcs_say() -> None:
    assert (G722.clock_rate, G722.rate, G722.frame_ticks, G722.frame_samples) == (8000, 16000, 160, 320)
    assert (OPUS.clock_rate, OPUS.channels, OPUS.rate, OPUS.frame_ticks, OPUS.frame_samples) == (48000, 2, 16000, 960, 320)
    assert (PCMA.payload_type, PCMA.frame_samples, PCMA.rtpmap) == (8, 160, "PCMA/8000")
    assert OPUS.rtpmap == "opus/48000/2" and OPUS.payload_type is None


@pytest.mark.parametrize("codec", list(CODECS.values()), ids=CODEC_NAMES)
def test_what_our_sdp_writes_of_a_codec_negotiates_back_to_it(codec) -> None:
    payload_type = OFFER_PAYLOAD_TYPES[codec]
    attributes = codec_attributes(codec, payload_type)
    assert attributes[0] == f"a=rtpmap:{payload_type} {codec.rtpmap}"
    assert (attributes[1:] == [f"a=fmtp:{payload_type} {codec.fmtp}"]) == (codec.fmtp is not None)
    audio = negotiate(parse_sdp(offer_of(attributes, str(payload_type))), list(CODECS.values()))
    assert (audio.codec, audio.payload_type) == (codec, payload_type)


def test_static_payload_types_need_no_rtpmap_and_opus_gets_a_dynamic_one() -> None:
    for codec in (PCMU, PCMA, G722):
        assert OFFER_PAYLOAD_TYPES[codec] == codec.payload_type
        assert negotiate(parse_sdp(offer_of([], str(codec.payload_type))), [codec]).codec is codec
    assert OFFER_PAYLOAD_TYPES[OPUS] >= 96


@pytest.mark.parametrize("codec", [PCMU, PCMA, G722], ids=["PCMU", "PCMA", "G722"])
def test_a_coder_takes_and_gives_frames_of_the_tables_size(codec) -> None:
    coder = new_coder(codec)
    assert coder.accepts(codec.frame_samples)
    assert len(coder.decode(coder.encode(np.zeros(codec.frame_samples, dtype=np.int16)))) == codec.frame_samples
