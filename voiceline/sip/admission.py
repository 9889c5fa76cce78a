"""What the user agent asks before it acts on a request, and the answers it takes.

The user agent knows no trunk or line: whoever builds it supplies a
`RequestPolicy` (the trunk policy in `voiceline.routing`) and acts on its
`Admit`, `Refuse` or `Drop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from voiceline.sip.message import SipRequest


@dataclass(frozen=True)
class Admit:
    trunk: str
    line: str = ""  # empty for requests that reach no line (OPTIONS)
    codecs: tuple[str, ...] = ()  # the trunk's allowed codecs; empty: all configured
    srtp: str = "off"  # the trunk's SRTP policy, one of sdp.SRTP_POLICIES
    country_code: str = ""  # the line's country calling code (digits): callers' numbers are normalised to E.164


@dataclass(frozen=True)
class Refuse:
    status: int
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Drop:
    pass


Admission = Admit | Refuse | Drop


class RequestPolicy(Protocol):
    """What the user agent asks before it acts on a request: `check_source` for every one, `check` for new ones."""

    def check(self, request: SipRequest, source: tuple[str, int], transport: str) -> Admission:
        """`transport`: the one the request came on ("UDP", "TCP", "TLS")."""
        ...

    def check_source(self, source: tuple[str, int], transport: str, count: bool = True) -> Admission:
        """Source admission alone, for every request (in-dialog ones and CANCEL too): Admit(trunk) or the refusal.

        `count`: whether an unknown source counts as a refusal (not for an ACK, which ends an exchange already counted).
        """
        ...

    def trunk_address(self, trunk: str, host: str) -> str | None:
        """The last resolved address of `host` when it is a name from `trunk`'s own configuration, else None."""
        ...
