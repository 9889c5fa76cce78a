"""SRTP and SRTCP (RFC 3711) for one media leg, through libsrtp (the pylibsrtp binding).

A leg has two master keys: ours, for what it sends, and the peer's, for what
it receives (SDES, RFC 4568, carries each in its sender's SDP). Keys live in
this object's memory only: they are not in its repr, and libsrtp's errors,
which are all we ever report, never quote them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pylibsrtp import Error, Policy, Session

# The SDES crypto-suites we do (RFC 4568 section 6.2; the SDP side lists the same names) and their libsrtp profiles.
SUITES = {
    "AES_CM_128_HMAC_SHA1_80": Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    "AES_CM_128_HMAC_SHA1_32": Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
}
KEY_LENGTH = 30  # master key (16) and master salt (14) of both suites


@dataclass(frozen=True)
class SrtpKeys:
    """What one leg needs: the suite, our sending key and the peer's (each key || salt)."""

    suite: str
    send_key: bytes = field(repr=False)
    receive_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError("unsupported SRTP crypto-suite")
        if len(self.send_key) != KEY_LENGTH or len(self.receive_key) != KEY_LENGTH:
            raise ValueError("SRTP master key and salt must be 30 bytes")


class SrtpContext:
    """Protects what a leg sends and unprotects what it receives; refused packets are counted."""

    def __init__(self, keys: SrtpKeys) -> None:
        self.keys = keys
        self.auth_failures = 0  # received packets that failed authentication or replay checks
        self._send = _session(keys.suite, keys.send_key, Policy.SSRC_ANY_OUTBOUND)
        self._receive = _session(keys.suite, keys.receive_key, Policy.SSRC_ANY_INBOUND)

    def __repr__(self) -> str:
        return f"SrtpContext({self.keys.suite})"

    def rekey(self, keys: SrtpKeys) -> None:
        """New keys from a re-offer: a direction whose key and suite stay keeps its state (rollover counter)."""
        if keys.suite != self.keys.suite or keys.send_key != self.keys.send_key:
            self._send = _session(keys.suite, keys.send_key, Policy.SSRC_ANY_OUTBOUND)
        if keys.suite != self.keys.suite or keys.receive_key != self.keys.receive_key:
            self._receive = _session(keys.suite, keys.receive_key, Policy.SSRC_ANY_INBOUND)
        self.keys = keys

    def protect(self, packet: bytes) -> bytes | None:
        try:
            return self._send.protect(packet)
        except (Error, ValueError):  # too long for libsrtp's buffer
            return None

    def unprotect(self, packet: bytes) -> bytes | None:
        """The plain RTP packet; None (counted) when it fails authentication or is a replay."""
        try:
            return self._receive.unprotect(packet)
        except (Error, ValueError):
            self.auth_failures += 1
            return None

    def protect_rtcp(self, packet: bytes) -> bytes | None:
        try:
            return self._send.protect_rtcp(packet)
        except (Error, ValueError):
            return None

    def unprotect_rtcp(self, packet: bytes) -> bytes | None:
        try:
            return self._receive.unprotect_rtcp(packet)
        except (Error, ValueError):
            self.auth_failures += 1
            return None


def _session(suite: str, key: bytes, ssrc_type: int) -> Session:
    policy = Policy(key=key, ssrc_type=ssrc_type, srtp_profile=SUITES[suite])
    # A relayed source may repeat a sequence number (a duplicated packet): send it rather than fail.
    policy.allow_repeat_tx = True
    return Session(policy)
