"""One call's side of the SDP offer/answer exchanges (RFC 3264), as a plain object.

The first offer may come in the INVITE (we answer in the 200) or not at all
(we offer in the 200 and the answer comes in the ACK); later offers come in
re-INVITEs and UPDATEs. A re-offer keeps the codec the call's media leg was
started with: a leg cannot switch codecs mid-call, so an offer without it is
declined (488) and the session goes on as it was.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from voiceline.sip.sdp import (
    OFFER_PAYLOAD_TYPES,
    NegotiatedAudio,
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
    codecs: tuple[str, ...]  # in order of preference
    local_port: int = 0
    audio: NegotiatedAudio | None = None  # None until the first exchange completes
    offer_pending: bool = False  # we sent an offer and wait for its answer
    local_sdp: bytes = b""  # what we last sent (offer or answer)
    session_id: int = field(default_factory=lambda: secrets.randbelow(1 << 31))
    version: int = 0

    @property
    def on_hold(self) -> bool:
        """The peer asked us not to send (it sent sendonly or inactive)."""
        return self.audio is not None and self.audio.direction in ON_HOLD_DIRECTIONS

    def negotiate_offer(self, offer: SessionDescription) -> NegotiatedAudio:
        """The audio we would answer `offer` with; raises NoCommonCodec/SdpError. Changes nothing."""
        codecs = (self.audio.codec,) if self.audio is not None else self.codecs
        return negotiate(offer, codecs)

    def answer(self, offer: SessionDescription, audio: NegotiatedAudio) -> bytes:
        """Our answer to `offer` (negotiated as `audio`); it becomes the session's state."""
        self.audio = audio
        self._set_local(lambda version: build_answer(offer, audio, self.host, self.local_port, self.session_id, version))
        return self.local_sdp

    def offer(self) -> bytes:
        """Our offer: the established codec (all of ours on a first offer), sending and receiving."""
        self._set_local(self._build_offer)
        self.offer_pending = True
        return self.local_sdp

    def take_answer(self, body: bytes) -> NegotiatedAudio:
        """The peer's answer to our pending offer; raises SdpError when it is unusable."""
        self.offer_pending = False
        offered = (self.audio.codec,) if self.audio is not None else self.codecs
        self.audio = negotiate(parse_sdp(body), offered)
        return self.audio

    def _build_offer(self, version: int) -> bytes:
        codecs = (self.audio.codec,) if self.audio is not None else self.codecs
        family = "IP6" if ":" in self.host else "IP4"
        lines = [
            "v=0",
            f"o=voiceline {self.session_id} {version} IN {family} {self.host}",
            "s=voiceline",
            f"c=IN {family} {self.host}",
            "t=0 0",
            f"m=audio {self.local_port} RTP/AVP {' '.join(str(OFFER_PAYLOAD_TYPES[c]) for c in codecs)} {_TELEPHONE_EVENT_PT}",
            *(line for codec in codecs for line in codec_attributes(codec, OFFER_PAYLOAD_TYPES[codec])),
            f"a=rtpmap:{_TELEPHONE_EVENT_PT} telephone-event/8000",
            f"a=fmtp:{_TELEPHONE_EVENT_PT} 0-16",
            "a=ptime:20",
            "a=sendrecv",
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
