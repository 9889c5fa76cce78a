"""SDP parsing and offer/answer negotiation."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voiceline.codec_table import G722, OPUS, PCMA, PCMU, Codec
from voiceline.sip.sdp import (
    NegotiatedAudio,
    NoCommonCodec,
    SdpError,
    build_answer,
    negotiate,
    parse_sdp,
)

G711 = (PCMU, PCMA)

# What a SIPp uac scenario offers: PCMU only, no rtpmap.
SIPP_OFFER = (
    "v=0\r\n"
    "o=user1 53655765 2353687637 IN IP4 127.0.0.1\r\n"
    "s=-\r\n"
    "c=IN IP4 127.0.0.1\r\n"
    "t=0 0\r\n"
    "m=audio 6000 RTP/AVP 0\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
)

# What pjsua2 offers by default: wideband codecs first, two telephone-event clock rates.
PJSUA2_OFFER = (
    "v=0\r\n"
    "o=- 3906157545 3906157545 IN IP4 127.0.0.1\r\n"
    "s=pjmedia\r\n"
    "b=AS:117\r\n"
    "t=0 0\r\n"
    "a=X-nat:0\r\n"
    "m=audio 4000 RTP/AVP 96 9 8 0 120 121\r\n"
    "c=IN IP4 127.0.0.1\r\n"
    "b=TIAS:96000\r\n"
    "a=rtcp:4001 IN IP4 127.0.0.1\r\n"
    "a=sendrecv\r\n"
    "a=rtpmap:96 opus/48000/2\r\n"
    "a=fmtp:96 useinbandfec=1\r\n"
    "a=rtpmap:9 G722/8000\r\n"
    "a=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:120 telephone-event/48000\r\n"
    "a=fmtp:120 0-16\r\n"
    "a=rtpmap:121 telephone-event/8000\r\n"
    "a=fmtp:121 0-16\r\n"
    "a=ssrc:1405376925 cname:5c5a1c0a3a4d4a9e\r\n"
)


def offer(*media: str, session: str = "c=IN IP4 127.0.0.1\r\n") -> bytes:
    head = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\n" + session + "t=0 0\r\n"
    return (head + "".join(media)).encode()


def audio_section(formats: str, *attributes: str, port: int = 5004, proto: str = "RTP/AVP") -> str:
    return f"m=audio {port} {proto} {formats}\r\n" + "".join(f"a={attribute}\r\n" for attribute in attributes)


def negotiated(body: bytes, supported: tuple[Codec, ...] = G711) -> NegotiatedAudio:
    return negotiate(parse_sdp(body), supported)


def answer_lines(body: bytes, audio: NegotiatedAudio, host: str = "127.0.0.1") -> list[str]:
    answer = build_answer(parse_sdp(body), audio, host, 40000, 7, 8)
    assert answer.endswith(b"\r\n") and b"\n" not in answer.replace(b"\r\n", b"")
    return answer.decode().split("\r\n")[:-1]


# --- parse_sdp ------------------------------------------------------------------------


def test_parse_sdp() -> None:
    parsed = parse_sdp(PJSUA2_OFFER.encode())
    assert parsed.origin == "- 3906157545 3906157545 IN IP4 127.0.0.1"
    assert parsed.session_name == "pjmedia"
    assert parsed.connection is None
    assert parsed.attributes == [("X-nat", "0")]
    (media,) = parsed.media
    assert (media.media, media.port, media.proto) == ("audio", 4000, "RTP/AVP")
    assert media.formats == ["96", "9", "8", "0", "120", "121"]
    assert media.connection == "127.0.0.1"
    assert ("sendrecv", None) in media.attributes
    assert ("rtpmap", "8 PCMA/8000") in media.attributes


def test_parse_sdp_tolerates_bare_lf_and_multicast_ttl() -> None:
    parsed = parse_sdp(b"v=0\no=- 1 1 IN IP4 127.0.0.1\ns=-\nc=IN IP4 224.2.1.1/127\nt=0 0\nm=audio 5004/2 RTP/AVP 0\n")
    assert parsed.connection == "224.2.1.1"
    assert parsed.media[0].port == 5004


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"o=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\n", id="no v= line"),
        pytest.param(b"v=1\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\n", id="version 1"),
        pytest.param(b"v=0\r\ns=-\r\n", id="no origin"),
        pytest.param(b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n", id="no session name"),
        pytest.param(offer("garbage\r\n"), id="line without ="),
        pytest.param(offer("M=audio 5004 RTP/AVP 0\r\n"), id="upper-case type"),
        pytest.param(offer("m=audio 5004 RTP/AVP\r\n"), id="media without formats"),
        pytest.param(offer("m=audio 70000 RTP/AVP 0\r\n"), id="port too large"),
        pytest.param(offer("m=audio five RTP/AVP 0\r\n"), id="port not a number"),
        pytest.param(offer("m=audio \uff15 RTP/AVP 0\r\n"), id="port wide digit"),
        pytest.param(offer(session="c=IN IP4\r\n"), id="connection without address"),
        pytest.param(offer(session="c=ATM NSAP 47\r\n"), id="connection not IN"),
        pytest.param(offer(audio_section("0", ":value")), id="attribute without name"),
    ],
)
def test_parse_sdp_errors(body: bytes) -> None:
    with pytest.raises(SdpError):
        parse_sdp(body)


# --- negotiate ------------------------------------------------------------------------


def test_sipp_style_offer() -> None:
    audio = negotiated(SIPP_OFFER.encode())
    assert audio == NegotiatedAudio(
        codec=PCMU,
        payload_type=0,
        telephone_event_pt=None,
        remote_host="127.0.0.1",
        remote_port=6000,
        direction="sendrecv",
        ptime=20,
        media_index=0,
    )


def test_sipp_style_offer_without_rtpmap_uses_the_static_payload_type() -> None:
    audio = negotiated(offer(audio_section("0", port=6000)))
    assert (audio.codec, audio.payload_type) == (PCMU, 0)


def test_pjsua2_style_offer() -> None:
    audio = negotiated(PJSUA2_OFFER.encode())
    # The offerer's order decides: opus and G.722 are not ours, PCMA comes before PCMU.
    assert (audio.codec, audio.payload_type) == (PCMA, 8)
    assert audio.telephone_event_pt == 121  # the 8 kHz one, not 120 at 48 kHz
    assert (audio.remote_host, audio.remote_port) == ("127.0.0.1", 4000)


def test_offerer_order_wins_over_ours() -> None:
    assert negotiated(offer(audio_section("8 0")), (PCMU, PCMA)).codec == PCMA
    assert negotiated(offer(audio_section("0 8")), (PCMA, PCMU)).codec == PCMU
    assert negotiated(offer(audio_section("0 8")), (PCMA,)).codec == PCMA


def test_dynamic_payload_types_by_rtpmap() -> None:
    audio = negotiated(offer(audio_section("97 98", "rtpmap:97 iLBC/8000", "rtpmap:98 pcmu/8000/1")), (PCMU,))
    assert (audio.codec, audio.payload_type) == (PCMU, 98)


def test_rtpmap_overrides_the_static_meaning() -> None:
    # A payload type's rtpmap wins over the static table; stereo or 16 kHz G.711 is not ours.
    with pytest.raises(NoCommonCodec):
        negotiated(offer(audio_section("0 8", "rtpmap:0 PCMU/16000", "rtpmap:8 PCMA/8000/2")))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(offer(audio_section("9 18", "rtpmap:9 G722/8000", "rtpmap:18 G729/8000")), id="no G.711"),
        pytest.param(offer(audio_section("0", port=0)), id="audio declined"),
        pytest.param(offer(audio_section("0", proto="RTP/SAVP")), id="SRTP only"),
        pytest.param(offer("m=video 5006 RTP/AVP 31\r\n"), id="no audio"),
        pytest.param(offer(), id="no media"),
    ],
)
def test_no_common_codec(body: bytes) -> None:
    with pytest.raises(NoCommonCodec):
        negotiated(body)


def test_unusable_connection_is_an_sdp_error_not_488() -> None:
    for body in (
        offer(audio_section("0"), session=""),
        offer(audio_section("0"), session="c=IN IP4 media.example.com\r\n"),
    ):
        with pytest.raises(SdpError) as error:
            negotiated(body)
        assert not isinstance(error.value, NoCommonCodec)


def test_media_level_connection_wins() -> None:
    audio = negotiated(offer(audio_section("0", "ptime:30") + "c=IN IP4 127.0.0.2\r\n"))
    assert (audio.remote_host, audio.ptime) == ("127.0.0.2", 30)


def test_malformed_ptime_counts_as_absent() -> None:
    assert negotiated(offer(audio_section("0", "ptime:abc"))).ptime == 20
    assert negotiated(offer(audio_section("0", "ptime:0"))).ptime == 20


@pytest.mark.parametrize(
    ("offered", "ours"),
    [("sendrecv", "sendrecv"), ("sendonly", "recvonly"), ("recvonly", "sendonly"), ("inactive", "inactive")],
)
def test_direction_is_mirrored(offered: str, ours: str) -> None:
    assert negotiated(offer(audio_section("0", offered))).direction == ours
    session_level = offer(audio_section("0"), session=f"c=IN IP4 127.0.0.1\r\na={offered}\r\n")
    assert negotiated(session_level).direction == ours


def test_media_level_direction_wins() -> None:
    body = offer(audio_section("0", "sendrecv"), session="c=IN IP4 127.0.0.1\r\na=sendonly\r\n")
    assert negotiated(body).direction == "sendrecv"


def test_ipv6_offer_and_answer() -> None:
    body = offer(audio_section("8"), session="c=IN IP6 ::1\r\n")
    audio = negotiated(body)
    assert audio.remote_host == "::1"
    lines = answer_lines(body, audio, host="::1")
    assert "o=voiceline 7 8 IN IP6 ::1" in lines
    assert "c=IN IP6 ::1" in lines


# --- build_answer ---------------------------------------------------------------------


def test_answer_to_sipp_offer() -> None:
    body = SIPP_OFFER.encode()
    assert answer_lines(body, negotiated(body)) == [
        "v=0",
        "o=voiceline 7 8 IN IP4 127.0.0.1",
        "s=voiceline",
        "c=IN IP4 127.0.0.1",
        "t=0 0",
        "m=audio 40000 RTP/AVP 0",
        "a=rtpmap:0 PCMU/8000",
        "a=ptime:20",
        "a=sendrecv",
    ]


def test_answer_to_pjsua2_offer_with_telephone_event() -> None:
    body = PJSUA2_OFFER.encode()
    assert answer_lines(body, negotiated(body))[5:] == [
        "m=audio 40000 RTP/AVP 8 121",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:121 telephone-event/8000",
        "a=fmtp:121 0-16",
        "a=ptime:20",
        "a=sendrecv",
    ]


def test_answer_declines_other_streams_with_port_zero() -> None:
    body = offer(
        "m=video 5006 RTP/AVP 31 34\r\na=rtpmap:31 H261/90000\r\n",
        audio_section("0", port=0),
        audio_section("8", "recvonly", port=5008),
        "m=application 5010 UDP/BFCP *\r\n",
    )
    audio = negotiated(body)
    assert audio.media_index == 2
    lines = answer_lines(body, audio)
    media_lines = [line for line in lines if line.startswith("m=")]
    assert media_lines == [
        "m=video 0 RTP/AVP 31",
        "m=audio 0 RTP/AVP 0",
        "m=audio 40000 RTP/AVP 8",
        "m=application 0 UDP/BFCP *",
    ]
    assert "a=sendonly" in lines
    assert len(media_lines) == len(parse_sdp(body).media)


def test_answer_parses_and_negotiates_back() -> None:
    body = PJSUA2_OFFER.encode()
    answer = build_answer(parse_sdp(body), negotiated(body), "127.0.0.1", 40000, 1, 1)
    again = negotiate(parse_sdp(answer), G711)
    assert (again.codec, again.payload_type, again.telephone_event_pt, again.remote_port) == (PCMA, 8, 121, 40000)


# --- robustness -----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1024))
def test_random_bytes_only_raise_sdp_error(body: bytes) -> None:
    with contextlib.suppress(SdpError):
        negotiated(body)


SDP_LINES = [*PJSUA2_OFFER.split("\r\n"), "m=audio 0 RTP/AVP 8", "c=IN IP6 ::1", "a=ptime:", "a=sendonly"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(SDP_LINES), max_size=25))
def test_shuffled_lines_only_raise_sdp_error(lines: list[str]) -> None:
    body = "\r\n".join(["v=0", *lines]).encode()
    try:
        audio = negotiated(body)
    except SdpError:
        return
    assert audio.codec in G711
    build_answer(parse_sdp(body), audio, "127.0.0.1", 40000, 1, 1)


def test_answer_keeps_the_offered_rtp_profile() -> None:
    body = offer(audio_section("0", proto="RTP/AVPF"))
    lines = answer_lines(body, negotiated(body))
    assert any(line.startswith("m=audio 40000 RTP/AVPF 0") for line in lines), lines


WIDEBAND = (PCMU, PCMA, G722, OPUS)


def test_g722_by_static_payload_type_and_by_its_8000_clock_rtpmap() -> None:
    assert negotiated(offer(audio_section("9")), WIDEBAND).codec == G722
    audio = negotiated(offer(audio_section("9 0", "rtpmap:9 G722/8000")), WIDEBAND)
    assert (audio.codec, audio.payload_type) == (G722, 9)
    # The rtpmap clock of G.722 is 8000 (RFC 3551) although it samples at 16 kHz.
    assert negotiated(offer(audio_section("9 0", "rtpmap:9 G722/16000")), WIDEBAND).codec == PCMU


def test_opus_is_dynamic_at_48000_with_two_channels() -> None:
    audio = negotiated(offer(audio_section("111 0", "rtpmap:111 opus/48000/2")), WIDEBAND)
    assert (audio.codec, audio.payload_type) == (OPUS, 111)
    assert negotiated(offer(audio_section("111 0", "rtpmap:111 opus/48000")), WIDEBAND).codec == PCMU
    assert negotiated(offer(audio_section("111 0", "rtpmap:111 opus/16000/2")), WIDEBAND).codec == PCMU


def test_pjsua2_offer_with_every_codec_gets_opus_and_an_opus_answer() -> None:
    body = PJSUA2_OFFER.encode()
    audio = negotiated(body, WIDEBAND)
    assert (audio.codec, audio.payload_type, audio.telephone_event_pt) == (OPUS, 96, 121)
    lines = answer_lines(body, audio)
    assert "m=audio 40000 RTP/AVP 96 121" in lines
    assert "a=rtpmap:96 opus/48000/2" in lines
    assert any(line.startswith("a=fmtp:96 maxplaybackrate=16000") for line in lines)
    assert negotiate(parse_sdp(build_answer(parse_sdp(body), audio, "127.0.0.1", 40000, 7, 8)), WIDEBAND).codec == OPUS


def test_answer_for_g722() -> None:
    body = offer(audio_section("9 101", "rtpmap:9 G722/8000", "rtpmap:101 telephone-event/8000"))
    lines = answer_lines(body, negotiated(body, WIDEBAND))
    assert "m=audio 40000 RTP/AVP 9 101" in lines and "a=rtpmap:9 G722/8000" in lines
