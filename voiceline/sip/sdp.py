"""SDP (RFC 4566) parsing and the offer/answer exchange (RFC 3264).

We accept one audio stream in a codec of the codec table (PCMU, PCMA, G.722, Opus), with RFC 4733
telephone-event when offered, and decline every other stream with port 0.
The stream is plain RTP (RTP/AVP) or SRTP keyed by SDES (RTP/SAVP with
a=crypto, RFC 4568), as the trunk's SRTP policy allows. Errors carry fixed
texts only: an SDP names the caller's addresses, and its a=crypto lines keys.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from voiceline.codec_table import CODECS, Codec


class SdpError(ValueError):
    """A malformed or unusable session description. The text never quotes the input."""


class NoCommonCodec(SdpError):
    """No audio stream we can use, or no codec in common (answered 488)."""


@dataclass
class MediaDescription:
    media: str
    port: int
    proto: str
    formats: list[str]
    connection: str | None = None
    attributes: list[tuple[str, str | None]] = field(default_factory=list, repr=False)  # a=crypto holds keys


@dataclass
class SessionDescription:
    origin: str
    session_name: str
    connection: str | None = None
    attributes: list[tuple[str, str | None]] = field(default_factory=list)
    media: list[MediaDescription] = field(default_factory=list)


@dataclass(frozen=True)
class Crypto:
    """One SDES a=crypto line (RFC 4568): its tag, crypto-suite and the sender's master key || salt."""

    tag: int
    suite: str
    key: bytes = field(repr=False)

    def attribute(self) -> str:
        return f"a=crypto:{self.tag} {self.suite} inline:{base64.b64encode(self.key).decode()}"


@dataclass(frozen=True)
class NegotiatedAudio:
    codec: Codec
    payload_type: int
    telephone_event_pt: int | None
    remote_host: str
    remote_port: int
    direction: str
    ptime: int
    media_index: int
    crypto: Crypto | None = None  # the peer's a=crypto line of an SRTP stream; None for plain RTP


_RTP_PROFILES = ("RTP/AVP", "RTP/AVPF")
_SRTP_PROFILES = ("RTP/SAVP", "RTP/SAVPF")
# A trunk's SRTP policy: "off" takes and offers plain RTP only, "optional" answers each in kind
# (and offers plain), "required" takes and offers SRTP only.
SRTP_POLICIES = ("off", "optional", "required")
# SDES crypto-suites we do, preferred first (the media side maps the same names to libsrtp).
CRYPTO_SUITES = ("AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32")
CRYPTO_KEY_LENGTH = 30  # both suites: a 16-byte master key and a 14-byte master salt
# "inline:" key-info of RFC 4568 9.1: key||salt in base64, an optional lifetime, an optional MKI.
_INLINE_KEY = re.compile(r"inline:([A-Za-z0-9+/]+={0,2})(?:\|(?:2\^)?[0-9]{1,20})?(\|[0-9]+:[0-9]+)?")
# A payload type without an rtpmap means its static codec (RFC 3551).
_STATIC_PAYLOADS = {str(codec.payload_type): codec for codec in CODECS.values() if codec.payload_type is not None}
# An rtpmap names a codec of ours when its "NAME/RATE/CHANNELS" (upper case, channels 1 when left out) matches.
_RTPMAPS = {(codec.encoding.upper(), codec.clock_rate, codec.channels): codec for codec in CODECS.values()}
_FIRST_DYNAMIC_PAYLOAD_TYPE = 111  # what we offer a codec without a static payload type as (Opus), counting up


def _offer_payload_types() -> dict[Codec, int]:
    dynamic = itertools.count(_FIRST_DYNAMIC_PAYLOAD_TYPE)
    return {codec: next(dynamic) if codec.payload_type is None else codec.payload_type for codec in CODECS.values()}


# The payload types we offer our codecs as: the static one (RFC 3551), else a dynamic one.
OFFER_PAYLOAD_TYPES = _offer_payload_types()
_TELEPHONE_EVENT = "TELEPHONE-EVENT/8000"
# Our direction in the answer, by the offer's direction.
_MIRRORED = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}
_DEFAULT_PTIME = 20


def parse_sdp(body: bytes) -> SessionDescription:
    lines = [line.rstrip("\r") for line in body.decode("utf-8", "surrogateescape").split("\n")]
    lines = [line for line in lines if line]
    if not lines or lines[0] != "v=0":
        raise SdpError("not an SDP version 0 description")
    session = SessionDescription(origin="", session_name="")
    origin = name = None
    for line in lines[1:]:
        kind, equals, value = line[:1], line[1:2], line[2:]
        if equals != "=" or not ("a" <= kind <= "z"):
            raise SdpError("malformed SDP line")
        section = session.media[-1] if session.media else session
        if kind == "m":
            session.media.append(_parse_media(value))
        elif kind == "c":
            section.connection = _parse_connection(value)
        elif kind == "a":
            section.attributes.append(_parse_attribute(value))
        elif kind == "o" and not session.media:
            origin = value
        elif kind == "s" and not session.media:
            name = value
    if origin is None or name is None:
        raise SdpError("missing SDP origin or session name")
    session.origin, session.session_name = origin, name
    return session


def _parse_media(value: str) -> MediaDescription:
    parts = value.split()
    if len(parts) < 4:
        raise SdpError("malformed SDP media line")
    media, port_text, proto, *formats = parts
    port = _number(port_text.split("/", 1)[0], 5)  # "port/count" for layered encodings
    if port is None or port > 65535:
        raise SdpError("malformed SDP media line")
    return MediaDescription(media, port, proto, formats)


def _parse_connection(value: str) -> str:
    parts = value.split()
    if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        raise SdpError("malformed SDP connection line")
    address = parts[2].split("/", 1)[0]  # multicast "address/ttl"
    if not address:
        raise SdpError("malformed SDP connection line")
    return address


def _parse_attribute(value: str) -> tuple[str, str | None]:
    name, colon, attribute_value = value.partition(":")
    if not name:
        raise SdpError("malformed SDP attribute line")
    return name, attribute_value if colon else None


def parse_crypto(value: str) -> Crypto | None:
    """An a=crypto value we can use, else None: an unknown suite, an MKI or several keys (we key by
    SDP alone), session parameters (none of them is ours to honour), or a malformed line."""
    parts = value.split()
    if len(parts) != 3 or _number(parts[0], 9) is None or parts[1] not in CRYPTO_SUITES:
        return None
    match = _INLINE_KEY.fullmatch(parts[2])
    if match is None or match.group(2) is not None:
        return None
    try:
        key = base64.b64decode(match.group(1), validate=True)
    except binascii.Error:
        return None
    if len(key) != CRYPTO_KEY_LENGTH:
        return None
    return Crypto(int(parts[0]), parts[1], key)


def negotiate(offer: SessionDescription, supported: Sequence[Codec], srtp: str = "off") -> NegotiatedAudio:
    """Accept the offer's first audio stream that `srtp` (a policy of SRTP_POLICIES) allows, with its
    first codec we support and, for SRTP, its first a=crypto line we can use."""
    index, media, crypto = _audio_stream(offer, srtp)
    encodings = _rtpmaps(media)
    wanted = set(supported)
    chosen = next(((fmt, codec) for fmt in media.formats if (codec := _codec(fmt, encodings)) in wanted), None)
    if chosen is None:
        raise NoCommonCodec("no codec in common")
    payload_type, codec = chosen
    telephone_event = next((fmt for fmt in media.formats if encodings.get(fmt) == _TELEPHONE_EVENT), None)
    direction = _direction(media.attributes) or _direction(offer.attributes) or "sendrecv"
    return NegotiatedAudio(
        codec=codec,
        payload_type=int(payload_type),
        telephone_event_pt=int(telephone_event) if telephone_event is not None else None,
        remote_host=_remote_host(media.connection or offer.connection),
        remote_port=media.port,
        direction=_MIRRORED[direction],
        ptime=_ptime(media.attributes) or _ptime(offer.attributes) or _DEFAULT_PTIME,
        media_index=index,
        crypto=crypto,
    )


def _audio_stream(offer: SessionDescription, srtp: str) -> tuple[int, MediaDescription, Crypto | None]:
    """The first audio stream the policy takes. A plain stream's a=crypto lines are ignored (RFC 4568
    defines them for SAVP only); an SRTP stream without a usable one is declined (section 7.1.2)."""
    for index, media in enumerate(offer.media):
        if media.media != "audio" or media.port == 0:
            continue
        proto = media.proto.upper()
        if proto in _RTP_PROFILES and srtp != "required":
            return index, media, None
        if proto in _SRTP_PROFILES and srtp != "off":
            usable = (parse_crypto(value) for name, value in media.attributes if name == "crypto" and value)
            crypto = next((crypto for crypto in usable if crypto is not None), None)
            if crypto is not None:
                return index, media, crypto
    raise NoCommonCodec("no usable audio stream")


def _rtpmaps(media: MediaDescription) -> dict[str, str]:
    """Payload type -> upper-cased "NAME/RATE[/CHANNELS]" from a=rtpmap lines."""
    encodings: dict[str, str] = {}
    for name, value in media.attributes:
        if name == "rtpmap" and value:
            payload_type, _, encoding = value.partition(" ")
            encodings.setdefault(payload_type, encoding.strip().upper())
    return encodings


def _codec(fmt: str, encodings: dict[str, str]) -> Codec | None:
    """The codec of a payload type whose rtpmap (or static meaning) is one we know, else None."""
    payload_type = _number(fmt, 3)
    if payload_type is None or payload_type > 127:
        return None
    encoding = encodings.get(fmt)
    if encoding is None:
        return _STATIC_PAYLOADS.get(fmt)
    name, _, rest = encoding.partition("/")
    rate, _, channels = rest.partition("/")
    clock_rate, channel_count = _number(rate, 6), _number(channels or "1", 1)
    return _RTPMAPS.get((name, clock_rate, channel_count)) if clock_rate and channel_count else None


def _direction(attributes: list[tuple[str, str | None]]) -> str | None:
    return next((name for name, _ in attributes if name in _MIRRORED), None)


def _ptime(attributes: list[tuple[str, str | None]]) -> int | None:
    """The a=ptime value; a malformed one counts as absent."""
    value = next((value for name, value in attributes if name == "ptime"), None)
    return _number((value or "").strip(), 3) or None


def _number(text: str, max_digits: int) -> int | None:
    """A short decimal of ASCII digits (str.isdigit also takes other scripts), or None."""
    return int(text) if 0 < len(text) <= max_digits and text.isascii() and text.isdigit() else None


def _remote_host(address: str | None) -> str:
    if address is None:
        raise SdpError("missing SDP connection address")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise SdpError("SDP connection address is not an IP address") from None
    return address


def build_answer(
    offer: SessionDescription,
    audio: NegotiatedAudio,
    local_host: str,
    local_port: int,
    session_id: int,
    session_version: int,
    local_crypto: Crypto | None = None,
) -> bytes:
    """The RFC 3264 answer: one m= line per offered stream, all but the audio one declined.
    An SRTP stream carries `local_crypto`: the offer's tag and suite with our own key (RFC 4568 7.1.2)."""
    family = "IP6" if ":" in local_host else "IP4"
    lines = [
        "v=0",
        f"o=voiceline {session_id} {session_version} IN {family} {local_host}",
        "s=voiceline",
        f"c=IN {family} {local_host}",
        "t=0 0",
    ]
    for index, media in enumerate(offer.media):
        if index == audio.media_index:
            lines.extend(_answer_audio(audio, local_port, media.proto))
            if local_crypto is not None:
                lines.append(local_crypto.attribute())
        else:
            lines.append(f"m={media.media} 0 {media.proto} {media.formats[0]}")
    return "".join(line + "\r\n" for line in lines).encode("utf-8", "surrogateescape")


def codec_attributes(codec: Codec, payload_type: int) -> list[str]:
    """The a=rtpmap line (and a=fmtp, if any) that describe `codec` as `payload_type`."""
    attributes = [f"a=rtpmap:{payload_type} {codec.rtpmap}"]
    if codec.fmtp is not None:
        attributes.append(f"a=fmtp:{payload_type} {codec.fmtp}")
    return attributes


def _answer_audio(audio: NegotiatedAudio, local_port: int, proto: str) -> list[str]:
    """The accepted stream, in the offer's RTP profile (RFC 3264 6.1 keeps the transport)."""
    payload_types = [str(audio.payload_type)]
    attributes = codec_attributes(audio.codec, audio.payload_type)
    if audio.telephone_event_pt is not None:
        payload_types.append(str(audio.telephone_event_pt))
        attributes.append(f"a=rtpmap:{audio.telephone_event_pt} telephone-event/8000")
        attributes.append(f"a=fmtp:{audio.telephone_event_pt} 0-16")
    return [
        f"m=audio {local_port} {proto} {' '.join(payload_types)}",
        *attributes,
        f"a=ptime:{_DEFAULT_PTIME}",
        f"a={audio.direction}",
    ]
