"""One call's offer/answer state and the dialog's request building, without I/O."""

from __future__ import annotations

import pytest

from voiceline.codec_table import PCMA, PCMU
from voiceline.sip.dialog import Dialog
from voiceline.sip.message import Headers, SipRequest, parse_message
from voiceline.sip.offer_answer import OfferAnswer
from voiceline.sip.sdp import NoCommonCodec, parse_sdp


def offer(direction: str = "sendrecv", port: int = 4000, formats: str = "0 8") -> bytes:
    return (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP {formats}\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na={direction}\r\n"
    ).encode()


def version(sdp: bytes) -> int:
    return int(parse_sdp(sdp).origin.split()[2])


def established(first: bytes = offer()) -> OfferAnswer:
    session = OfferAnswer("127.0.0.1", (PCMU, PCMA), local_port=20000)
    remote = parse_sdp(first)
    session.answer(remote, session.negotiate_offer(remote))
    return session


def test_answer_version_rises_only_when_the_answer_changes() -> None:
    session = established()
    first = session.local_sdp
    same = parse_sdp(offer())
    assert session.answer(same, session.negotiate_offer(same)) == first  # a refresh: same bytes, same version
    held = parse_sdp(offer("sendonly"))
    answer = session.answer(held, session.negotiate_offer(held))
    assert b"a=recvonly" in answer and version(answer) == version(first) + 1 and session.on_hold
    inactive = parse_sdp(offer("inactive"))
    assert b"a=inactive" in session.answer(inactive, session.negotiate_offer(inactive)) and session.on_hold


def test_reoffer_keeps_the_codec_or_is_refused() -> None:
    session = established(offer(formats="8 0"))  # PCMA chosen, the offerer's preference
    assert session.audio is not None and session.audio.codec == PCMA
    again = parse_sdp(offer(formats="0 8"))
    assert session.negotiate_offer(again).codec == PCMA  # still offered: kept
    with pytest.raises(NoCommonCodec):
        session.negotiate_offer(parse_sdp(offer(formats="0")))


def test_our_offer_and_the_answer_to_it() -> None:
    session = OfferAnswer("127.0.0.1", (PCMU, PCMA), local_port=20000)
    ours = parse_sdp(session.offer())
    assert session.offer_pending and ours.media[0].formats == ["0", "8", "101"] and ours.media[0].port == 20000
    audio = session.take_answer(offer("sendonly", port=4010, formats="8"))
    assert not session.offer_pending and audio.codec == PCMA and audio.remote_port == 4010 and session.on_hold
    assert parse_sdp(session.offer()).media[0].formats == ["8", "101"]  # later offers: the call's codec


def invite(*extra: str) -> SipRequest:
    text = (
        "INVITE sip:line@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bKx\r\n"
        "From: <sip:anon@127.0.0.1>;tag=f\r\nTo: <sip:line@127.0.0.1>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n"
        "Contact: <sip:anon@127.0.0.1:5080>\r\n" + "".join(line + "\r\n" for line in extra) + "Content-Length: 0\r\n\r\n"
    )
    message = parse_message(text.encode())
    assert isinstance(message, SipRequest)
    return message


def test_loose_and_strict_route_sets() -> None:
    loose = Dialog.from_invite(invite("Record-Route: <sip:10.0.0.1;lr>, <sip:10.0.0.2;lr>"), "t")
    bye = loose.new_request("BYE", "127.0.0.1", 5060)
    assert bye.uri == "sip:anon@127.0.0.1:5080" and bye.headers.get_all("Route") == ["<sip:10.0.0.1;lr>", "<sip:10.0.0.2;lr>"]
    assert loose.next_hop() == ("10.0.0.1", 5060)
    strict = Dialog.from_invite(invite("Record-Route: <sip:10.0.0.3>"), "t")
    bye = strict.new_request("BYE", "127.0.0.1", 5060)  # RFC 2543 router: it takes the request URI
    assert bye.uri == "sip:10.0.0.3" and bye.headers.get_all("Route") == ["<sip:anon@127.0.0.1:5080>"]


def test_target_refresh_and_ack_cseq() -> None:
    dialog = Dialog.from_invite(invite(), "t")
    dialog.refresh_target(Headers([("Contact", "<sip:anon@127.0.0.9:6000>")]))
    invite_seq = dialog.local_seq + 1
    reinvite = dialog.new_request("INVITE", "127.0.0.1", 5060)
    ack = dialog.new_request("ACK", "127.0.0.1", 5060, cseq=invite_seq)
    assert reinvite.uri == ack.uri == "sip:anon@127.0.0.9:6000"
    assert ack.headers.get("CSeq") == f"{invite_seq} ACK" and dialog.local_seq == invite_seq
