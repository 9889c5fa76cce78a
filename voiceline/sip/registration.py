"""Outbound registration of a trunk (RFC 3261 section 10): a sans-I/O client and a thin asyncio driver.

`RegistrationClient` builds REGISTER requests and reads their responses on a
clock it is given: digest answers (MD5/SHA-256, qop=auth, stale nonces),
refresh before the granted expiry, exponential backoff after failures.
`RegistrationDriver` sends its requests through the user agent's client
transactions and reports each status change.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from voiceline import __version__
from voiceline.sip.auth import DigestClient, pick_challenge
from voiceline.sip.message import Headers, SipParseError, SipRequest, SipResponse, parse_name_addr, parse_uri
from voiceline.sip.transaction import new_branch
from voiceline.sip.transport import Address
from voiceline.sip.trunks import Registration

log = structlog.get_logger("voiceline.sip.registration")

# Refresh this long before a granted expiry; half the expiry when that is shorter.
REFRESH_MARGIN_SECONDS = 60.0


class RegState(enum.Enum):
    REGISTERING = "registering"  # first attempt under way
    REGISTERED = "registered"
    FAILED = "failed"  # the registrar refused (wrong credentials, 403, 404 ...): retried with backoff
    BACKOFF = "backoff"  # no answer or a temporary error: retried with backoff
    UNREGISTERED = "unregistered"  # stopped


@dataclass(frozen=True)
class RegistrationStatus:
    state: RegState
    detail: str = ""
    expires_at: float | None = None  # clock time the binding runs out (registered only)
    next_attempt: float | None = None  # clock time of the next REGISTER


class RegistrationClient:
    """One trunk's registration binding. Times are on the caller's clock (the loop's)."""

    def __init__(
        self,
        registration: Registration,
        local: Address,
        transport: str = "UDP",
        retry_min: float = 5.0,
        retry_max: float = 300.0,
    ) -> None:
        self.registration = registration
        self.local = local
        self.transport = transport
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.status = RegistrationStatus(RegState.REGISTERING)  # no next_attempt: register at once
        self._digest = DigestClient(registration.username, registration.password)
        self._call_id = secrets.token_hex(12)
        self._from_tag = secrets.token_hex(6)
        self._cseq = 0
        self._expiry = registration.expiry
        self._failures = 0
        # Credentials answering a challenge of the last response: a new challenge to those means
        # they are wrong. Credentials reusing an older nonce may just have outlived it.
        self._fresh_challenge = False
        self._answered_fresh = False
        self._proxy_challenge = False  # the last challenge was a 407: answer with Proxy-Authorization

    @property
    def next_attempt(self) -> float | None:
        return self.status.next_attempt

    @property
    def contact(self) -> str:
        host, port = self.local
        suffix = "" if self.transport == "UDP" else f";transport={self.transport.lower()}"
        return f"<sip:{self.registration.contact}@{_bracketed(host)}:{port}{suffix}>"

    def build(self, expires: int | None = None) -> SipRequest:
        """The next REGISTER (with Authorization once challenged); `expires=0` removes the binding."""
        registrar = parse_uri(self.registration.registrar)
        domain = _bracketed(registrar.host)
        request_uri = f"sip:{domain}" + (f":{registrar.port}" if registrar.port is not None else "")
        aor = f"<sip:{self.registration.username}@{domain}>"
        self._cseq += 1
        host, port = self.local
        headers = Headers(
            [
                ("Via", f"SIP/2.0/{self.transport} {_bracketed(host)}:{port};branch={new_branch()};rport"),
                ("Max-Forwards", "70"),
                ("From", f"{aor};tag={self._from_tag}"),
                ("To", aor),
                ("Call-ID", self._call_id),
                ("CSeq", f"{self._cseq} REGISTER"),
                ("Contact", self.contact),
                ("Expires", str(self._expiry if expires is None else expires)),
                ("User-Agent", f"voiceline/{__version__}"),
            ]
        )
        authorization = self._digest.authorization("REGISTER", request_uri)
        self._answered_fresh = authorization is not None and self._fresh_challenge
        self._fresh_challenge = False
        if authorization is not None:
            headers.add("Proxy-Authorization" if self._proxy_challenge else "Authorization", authorization)
        return SipRequest("REGISTER", request_uri, headers)

    def on_response(self, response: SipResponse | None, now: float) -> RegistrationStatus:
        """Feed the final response of the last REGISTER (None: it timed out); returns the new status."""
        if response is None:
            return self.on_error("no response from the registrar", now)
        status = response.status
        if 200 <= status < 300:
            granted = self._granted_expiry(response)
            self._failures = 0
            refresh = granted / 2 if granted <= 2 * REFRESH_MARGIN_SECONDS else granted - REFRESH_MARGIN_SECONDS
            self.status = RegistrationStatus(RegState.REGISTERED, f"{status} {response.reason}".strip(), now + granted, now + refresh)
            return self.status
        if status in (401, 407):
            header = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
            challenge = pick_challenge(response.headers.get_all(header), self.registration.realm or None)
            if challenge is None:
                realm = f" for realm {self.registration.realm}" if self.registration.realm else ""
                return self._retry_later(RegState.FAILED, f"{status}: no usable digest challenge{realm}", now)
            self._digest.accept(challenge)
            if self._answered_fresh and not challenge.stale:
                return self._retry_later(RegState.FAILED, f"{status}: credentials rejected", now)
            self._fresh_challenge = True
            self._proxy_challenge = status == 407
            self.status = RegistrationStatus(self._pending_state(), "challenged", next_attempt=now)
            return self.status
        if status == 423:
            min_expires = response.headers.get("Min-Expires") or ""
            if min_expires.isdigit() and self._expiry < int(min_expires) <= 86400:
                self._expiry = int(min_expires)
                self.status = RegistrationStatus(self._pending_state(), f"423: expiry raised to {min_expires}", next_attempt=now)
                return self.status
        state = RegState.BACKOFF if status >= 500 or status in (408, 480) else RegState.FAILED
        return self._retry_later(state, f"{status} {response.reason}".strip(), now)

    def stopped(self) -> RegistrationStatus:
        self.status = RegistrationStatus(RegState.UNREGISTERED)
        return self.status

    def _pending_state(self) -> RegState:
        return RegState.REGISTERED if self.status.state is RegState.REGISTERED else self.status.state

    def on_error(self, detail: str, now: float) -> RegistrationStatus:
        """The request could not be sent or got no answer: a temporary failure."""
        return self._retry_later(RegState.BACKOFF, detail, now)

    def _retry_later(self, state: RegState, detail: str, now: float) -> RegistrationStatus:
        delay = min(self.retry_max, self.retry_min * 2**self._failures)
        self._failures += 1
        self.status = RegistrationStatus(state, detail, next_attempt=now + delay)
        return self.status

    def _granted_expiry(self, response: SipResponse) -> float:
        """Our Contact's expires parameter, else the Expires header, else what we asked for."""
        ours = parse_uri(self.contact.strip("<>"))
        for value in response.headers.get_all("Contact"):
            try:
                contact = parse_name_addr(value)
                uri = parse_uri(contact.uri)
            except SipParseError:
                continue
            if (uri.user, uri.host, uri.port or 5060) == (ours.user, ours.host, ours.port or 5060):
                expires = contact.params.get("expires") or ""
                if expires.isdigit():
                    return float(expires)
        header = response.headers.get("Expires") or ""
        return float(header) if header.isdigit() else float(self._expiry)


Sender = Callable[[SipRequest, Address], Awaitable[SipResponse | None]]
Resolver = Callable[[str, int], Awaitable[Address]]
StatusSink = Callable[[str, RegistrationStatus], None]


class RegistrationDriver:
    """Runs one RegistrationClient on the event loop until stopped."""

    # Requests per wake-up at most: a challenge answered, then a 423 raised expiry.
    MAX_REQUESTS_PER_ROUND = 4

    def __init__(self, trunk: str, client: RegistrationClient, send: Sender, resolve: Resolver, report: StatusSink) -> None:
        self.trunk = trunk
        self.client = client
        self._send = send
        self._resolve = resolve
        self._report = report
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = self._loop.create_task(self._run())

    async def stop(self, unregister_timeout: float = 2.0) -> None:
        """Stop refreshing; a registered binding is removed (Expires: 0), waiting at most `unregister_timeout`."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.client.status.state is RegState.REGISTERED:
            try:
                dest = await self._resolve(self.client.registration.host, self.client.registration.port)
                await asyncio.wait_for(self._send(self.client.build(expires=0), dest), unregister_timeout)
            except (OSError, asyncio.TimeoutError):
                pass
        self._report(self.trunk, self.client.stopped())

    async def _run(self) -> None:
        self._report(self.trunk, self.client.status)
        while True:
            next_attempt = self.client.next_attempt
            if next_attempt is not None:
                await asyncio.sleep(max(0.0, next_attempt - self._loop.time()))
            for _ in range(self.MAX_REQUESTS_PER_ROUND):
                try:
                    status = await self._attempt()
                except Exception as exc:  # retried after the backoff like any failure: registering never stops
                    log.error("trunk.registration_error", trunk=self.trunk, error=type(exc).__name__, exc_info=exc)
                    status = self.client.on_error("internal error", self._loop.time())
                if status.next_attempt is None or status.next_attempt > self._loop.time():
                    break
            self._report(self.trunk, self.client.status)

    async def _attempt(self) -> RegistrationStatus:
        registration = self.client.registration
        try:
            dest = await self._resolve(registration.host, registration.port)
        except OSError:
            return self.client.on_error("cannot resolve the registrar", self._loop.time())
        response = await self._send(self.client.build(), dest)
        return self.client.on_response(response, self._loop.time())


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
