"""One call's side of the SDP offer/answer exchanges (RFC 3264), as a plain object.

The first offer may come in the INVITE (we answer in the 200) or not at all
(we offer in the 200 and the answer comes in the ACK); later offers come in
re-INVITEs and UPDATEs. A re-offer keeps the codec the call's media leg was
started with: a leg cannot switch codecs mid-call, so an offer without it is
declined (488) and the session goes on as it was. The same holds for SRTP:
the trunk's policy decides whether the first exchange is SRTP or plain RTP,
and re-offers keep to it. Our master key for SRTP is random, one per call,
kept for its whole length (a peer that re-keys changes only its own key).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from voiceline.codec_table import Codec
from voiceline.sip.sdp import (
    CRYPTO_KEY_LENGTH,
    CRYPTO_SUITES,
    OFFER_PAYLOAD_TYPES,
    Crypto,
    NegotiatedAudio,
    SdpError,
    SessionDescription,
    build_answer,
    codec_attributes,
    negotiate,
    parse_sdp,
)

_TELEPHONE_EVENT_PT = 101  # the telephone-event payload type we offer
ON_HOLD_DIRECTIONS = ("recvonly", "inactive")  # the peer sent sendonly or inactive: it put us on hold


@dataclass(eq=False)
class OfferAnswer:
    host: str  # our media address, for c= and o=
    codecs: tuple[Codec, ...]  # in order of preference
    local_port: int = 0
    audio: NegotiatedAudio | None = None  # None until the first exchange completes
    offer_pending: bool = False  # we sent an offer and wait for its answer
    local_sdp: bytes = field(default=b"", repr=False)  # what we last sent (offer or answer): it holds our key
    session_id: int = field(default_factory=lambda: secrets.randbelow(1 << 31))
    version: int = 0
    srtp: str = "off"  # the trunk's SRTP policy, one of sdp.SRTP_POLICIES
    local_key: bytes = field(default_factory=lambda: secrets.token_bytes(CRYPTO_KEY_LENGTH), repr=False)
    _offered_crypto: Crypto | None = field(default=None, init=False, repr=False)  # the a=crypto of our pending offer

    @property
    def on_hold(self) -> bool:
        """The peer asked us not to send (it sent sendonly or inactive)."""
        return self.audio is not None and self.audio.direction in ON_HOLD_DIRECTIONS

    def negotiate_offer(self, offer: SessionDescription) -> NegotiatedAudio:
        """The audio we would answer `offer` with; raises NoCommonCodec/SdpError. Changes nothing."""
        return negotiate(offer, self._codecs(), self._policy())

    def answer(self, offer: SessionDescription, audio: NegotiatedAudio) -> bytes:
        """Our answer to `offer` (negotiated as `audio`); it becomes the session's state."""
        self.audio = audio
        ours = self.local_crypto
        self._set_local(
            lambda version: build_answer(offer, audio, self.host, self.local_port, self.session_id, version, ours)
        )
        return self.local_sdp

    @property
    def local_crypto(self) -> Crypto | None:
        """Our side of the negotiated SRTP stream: the peer's tag and suite with our key; None for plain RTP."""
        if self.audio is None or self.audio.crypto is None:
            return None
        return Crypto(self.audio.crypto.tag, self.audio.crypto.suite, self.local_key)

    def offer(self) -> bytes:
        """Our offer: the established codec (all of ours on a first offer), sending and receiving."""
        self._set_local(self._build_offer)
        self.offer_pending = True
        return self.local_sdp

    def take_answer(self, body: bytes) -> NegotiatedAudio:
        """The peer's answer to our pending offer; raises SdpError when it is unusable."""
        self.offer_pending = False
        offered = self._offered_crypto
        audio = negotiate(parse_sdp(body), self._codecs(), "off" if offered is None else "required")
        if offered is not None:
            assert audio.crypto is not None  # negotiated as "required"
            if (audio.crypto.tag, audio.crypto.suite) != (offered.tag, offered.suite):
                raise SdpError("answer's a=crypto is not the one offered")
        self.audio = audio
        return audio

    def _codecs(self) -> tuple[Codec, ...]:
        return (self.audio.codec,) if self.audio is not None else self.codecs

    def _policy(self) -> str:
        """The trunk's policy for the first exchange; afterwards the call stays SRTP or plain RTP."""
        if self.audio is None:
            return self.srtp
        return "off" if self.audio.crypto is None else "required"

    def _build_offer(self, version: int) -> bytes:
        codecs = self._codecs()
        family = "IP6" if ":" in self.host else "IP4"
        # Our own offers are SRTP only when the call must be (a first offer on an "optional" trunk is
        # plain: a plain peer cannot answer SRTP), with the call's suite and tag once there is one.
        secure = self._policy() == "required"
        crypto = None
        if secure:
            crypto = self.local_crypto or Crypto(1, CRYPTO_SUITES[0], self.local_key)
        self._offered_crypto = crypto
        lines = [
            "v=0",
            f"o=voiceline {self.session_id} {version} IN {family} {self.host}",
            "s=voiceline",
            f"c=IN {family} {self.host}",
            "t=0 0",
            f"m=audio {self.local_port} {'RTP/SAVP' if crypto else 'RTP/AVP'} "
            f"{' '.join(str(OFFER_PAYLOAD_TYPES[c]) for c in codecs)} {_TELEPHONE_EVENT_PT}",
            *(line for codec in codecs for line in codec_attributes(codec, OFFER_PAYLOAD_TYPES[codec])),
            f"a=rtpmap:{_TELEPHONE_EVENT_PT} telephone-event/8000",
            f"a=fmtp:{_TELEPHONE_EVENT_PT} 0-16",
            "a=ptime:20",
            "a=sendrecv",
            *([crypto.attribute()] if crypto else []),
        ]
        return "".join(line + "\r\n" for line in lines).encode()

    def _set_local(self, build: Callable[[int], bytes]) -> None:
        """Keep the o= version while the description is unchanged (RFC 3264 section 8)."""
        unchanged = build(self.version)
        if self.local_sdp and _without_origin(unchanged) == _without_origin(self.local_sdp):
            self.local_sdp = unchanged
        else:
            self.version += 1
            self.local_sdp = build(self.version)


def _without_origin(sdp: bytes) -> bytes:
    return b"\r\n".join(line for line in sdp.split(b"\r\n") if not line.startswith(b"o="))
