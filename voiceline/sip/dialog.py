"""Sans-I/O dialog state (RFC 3261 section 12) for dialogs we join as the UAS.

The dialog is the only place a caller's URI lives, and only while the call
lasts: its repr hides the URIs so a stray log line or traceback cannot show them.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass, field

from voiceline.sip.message import (
    Headers,
    NameAddr,
    SipParseError,
    SipRequest,
    parse_cseq,
    parse_name_addr,
    parse_uri,
)
from voiceline.sip.transaction import new_branch

DEFAULT_SIP_PORT = 5060


def new_tag() -> str:
    return secrets.token_hex(6)


@dataclass(eq=False, repr=False)
class Dialog:
    call_id: str
    local_tag: str
    remote_tag: str | None
    local_party: NameAddr  # the To of the INVITE, without parameters
    remote_party: NameAddr  # the From of the INVITE, without parameters
    remote_target: str  # the Contact URI
    route_set: list[str]
    remote_seq: int
    local_seq: int = field(default_factory=lambda: secrets.randbelow(1 << 16) + 1)

    def __repr__(self) -> str:
        return "<Dialog>"

    @classmethod
    def from_invite(cls, invite: SipRequest, local_tag: str) -> Dialog:
        """SipParseError unless every value our later requests need is usable (From, To, Contact, Record-Route).

        Checked now, while a 400 can still refuse the call, so that a BYE built
        hours later cannot fail on a header nobody looked at.
        """
        headers = invite.headers
        remote = parse_name_addr(headers.get("From") or "")
        local = parse_name_addr(headers.get("To") or "")
        target = contact_target(headers)
        if target is None:
            raise SipParseError("INVITE without Contact")
        route_set = headers.get_all("Record-Route")
        for route in route_set:
            parse_uri(parse_name_addr(route).uri)
        return cls(
            call_id=headers.get("Call-ID") or "",
            local_tag=local_tag,
            remote_tag=remote.tag,
            local_party=NameAddr(local.display, local.uri, {}),
            remote_party=NameAddr(remote.display, remote.uri, {}),
            remote_target=target,
            route_set=route_set,
            remote_seq=parse_cseq(headers.get("CSeq") or "")[0],
        )

    def matches(self, request: SipRequest) -> bool:
        """The request belongs to this dialog (12.2.2): Call-ID, our tag in To and the peer's tag in From."""
        headers = request.headers
        return (
            headers.get("Call-ID") == self.call_id
            and parse_name_addr(headers.get("To") or "").tag == self.local_tag
            and parse_name_addr(headers.get("From") or "").tag == self.remote_tag
        )

    def accepts_remote_seq(self, request: SipRequest) -> bool:
        """Requests from the peer must carry increasing CSeq numbers (12.2.2)."""
        seq = parse_cseq(request.headers.get("CSeq") or "")[0]
        if seq <= self.remote_seq and request.method not in ("ACK", "CANCEL"):
            return False
        self.remote_seq = max(seq, self.remote_seq)
        return True

    def refresh_target(self, headers: Headers) -> None:
        """A re-INVITE or UPDATE (or the 2xx to ours) may move the peer (12.2.2, RFC 3311).

        SipParseError, the target unchanged, when the Contact is not a usable sip/sips URI.
        """
        target = contact_target(headers)
        if target is not None:
            self.remote_target = target

    def new_request(
        self, method: str, via_host: str, via_port: int, transport: str = "UDP", cseq: int | None = None
    ) -> SipRequest:
        """A request inside this dialog (12.2.1.1), e.g. our BYE; an ACK passes its INVITE's `cseq`."""
        if cseq is None:
            self.local_seq += 1
        local = NameAddr(self.local_party.display, self.local_party.uri, {"tag": self.local_tag})
        remote_params: dict[str, str | None] = {"tag": self.remote_tag} if self.remote_tag else {}
        remote = NameAddr(self.remote_party.display, self.remote_party.uri, remote_params)
        headers = Headers(
            [
                ("Via", f"SIP/2.0/{transport} {via_host}:{via_port};branch={new_branch()};rport"),
                ("Max-Forwards", "70"),
                ("From", str(local)),
                ("To", str(remote)),
                ("Call-ID", self.call_id),
                ("CSeq", f"{self.local_seq if cseq is None else cseq} {method}"),
            ]
        )
        if self.route_set and not self._loose_routing:
            # A strict router (RFC 2543) takes the request URI from the first route (12.2.1.1).
            for route in self.route_set[1:]:
                headers.add("Route", route)
            headers.add("Route", f"<{self.remote_target}>")
            return SipRequest(method, parse_name_addr(self.route_set[0]).uri, headers)
        for route in self.route_set:
            headers.add("Route", route)
        return SipRequest(method, self.remote_target, headers)

    @property
    def _loose_routing(self) -> bool:
        return "lr" in parse_uri(parse_name_addr(self.route_set[0]).uri).params

    def next_hop(self) -> tuple[str, int]:
        """Host and port our in-dialog requests go to: the first route, else the remote target."""
        uri_text = parse_name_addr(self.route_set[0]).uri if self.route_set else self.remote_target
        uri = parse_uri(uri_text)
        default = 5061 if uri.scheme == "sips" else DEFAULT_SIP_PORT
        return uri.host, uri.port or default


def contact_target(headers: Headers) -> str | None:
    """The first Contact's URI, checked to be a sip/sips URI we can send to; None without a Contact."""
    contacts = headers.get_all("Contact")
    if not contacts:
        return None
    target = parse_name_addr(contacts[0]).uri
    parse_uri(target)
    return target


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
