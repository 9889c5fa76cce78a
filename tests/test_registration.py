"""The registration client as a state machine: responses in, REGISTERs and timings out (fake clock)."""

from __future__ import annotations

from voiceline.routing import Registration
from voiceline.sip.auth import DigestServer, Verdict, digest_ha1
from voiceline.sip.message import SipRequest, SipResponse, parse_message, response_to, serialize
from voiceline.sip.registration import RegistrationClient, RegState

REG = Registration("sip:127.0.0.3:5080", "line-a", "s3cret", expiry=600, contact_user="inbound")


def client(**kwargs: float) -> RegistrationClient:
    return RegistrationClient(REG, ("127.0.0.1", 5070), retry_min=kwargs.get("retry_min", 5.0), retry_max=kwargs.get("retry_max", 40.0))


def reply(request: SipRequest, status: int, *headers: tuple[str, str]) -> SipResponse:
    response = response_to(request, status, to_tag="t", headers=headers)
    parsed = parse_message(serialize(response))  # through the wire form, as the UA would see it
    assert isinstance(parsed, SipResponse)
    return parsed


def test_register_is_well_formed_and_refreshes_before_expiry() -> None:
    c = client()
    first = c.build()
    assert first.method == "REGISTER" and first.uri == "sip:127.0.0.3:5080"
    assert first.headers.get("To") == "<sip:line-a@127.0.0.3>"
    assert first.headers.get("Contact") == "<sip:inbound@127.0.0.1:5070>"
    assert first.headers.get("Expires") == "600" and "Authorization" not in first.headers
    status = c.on_response(reply(first, 200, ("Contact", "<sip:inbound@127.0.0.1:5070>;expires=300")), now=100.0)
    assert status.state is RegState.REGISTERED and status.expires_at == 400.0
    assert status.next_attempt is not None and 100.0 < status.next_attempt < 400.0
    second = c.build()
    assert second.headers.get("Call-ID") == first.headers.get("Call-ID")
    assert second.headers.get("CSeq") == "2 REGISTER" and second.headers.get("Via") != first.headers.get("Via")


def test_challenge_is_answered_and_verifies_on_a_digest_server() -> None:
    server = DigestServer("carrier")
    c = client()
    first = c.build()
    challenge = reply(first, 401, *(("WWW-Authenticate", v) for v in server.challenges(0.0, "127.0.0.1")))
    status = c.on_response(challenge, now=1.0)
    assert status.state is RegState.REGISTERING and status.next_attempt == 1.0  # at once
    second = c.build()
    authorization = second.headers.get("Authorization")
    assert authorization is not None and "algorithm=SHA-256" in authorization and "s3cret" not in authorization
    ha1 = {"SHA-256": digest_ha1("SHA-256", "line-a", "carrier", "s3cret")}
    assert server.check(authorization, "REGISTER", second.uri, "line-a", ha1, now=1.0, bound_to="127.0.0.1") is Verdict.OK
    assert c.on_response(reply(second, 200), now=1.1).state is RegState.REGISTERED


def test_wrong_password_fails_with_doubling_backoff() -> None:
    server = DigestServer("carrier")
    c = client(retry_min=5.0, retry_max=40.0)
    waits = []
    now = 0.0
    for _ in range(5):
        c.on_response(reply(c.build(), 401, *(("WWW-Authenticate", v) for v in server.challenges(now, "127.0.0.1"))), now)
        status = c.on_response(reply(c.build(), 401, *(("WWW-Authenticate", v) for v in server.challenges(now, "127.0.0.1"))), now)
        assert status.state is RegState.FAILED and "credentials rejected" in status.detail
        assert status.next_attempt is not None
        waits.append(status.next_attempt - now)
        now = status.next_attempt
    assert waits == [5.0, 10.0, 20.0, 40.0, 40.0]
    # Success resets the backoff.
    c.on_response(reply(c.build(), 200), now)
    status = c.on_response(None, now + 1)
    assert status.state is RegState.BACKOFF and status.next_attempt == now + 1 + 5.0


def test_stale_nonce_is_retried_without_failing() -> None:
    server = DigestServer("carrier")
    c = client()
    c.on_response(reply(c.build(), 401, ("WWW-Authenticate", server.challenges(0.0, "127.0.0.1")[0])), 0.0)
    c.on_response(reply(c.build(), 200), 0.0)
    stale = reply(c.build(), 401, ("WWW-Authenticate", server.challenges(500.0, "127.0.0.1", stale=True)[0]))
    status = c.on_response(stale, 500.0)
    assert status.state is RegState.REGISTERED and status.next_attempt == 500.0
    assert c.build().headers.get("Authorization") is not None


def test_proxy_challenge_uses_proxy_authorization_and_423_raises_expiry() -> None:
    server = DigestServer("carrier")
    c = client()
    c.on_response(reply(c.build(), 407, ("Proxy-Authenticate", server.challenges(0.0, "127.0.0.1")[1])), 0.0)
    request = c.build()
    assert request.headers.get("Proxy-Authorization") is not None and "Authorization" not in request.headers
    status = c.on_response(reply(request, 423, ("Min-Expires", "1800")), 1.0)
    assert status.next_attempt == 1.0 and c.build().headers.get("Expires") == "1800"


def test_errors_classify_as_failed_or_backoff() -> None:
    c = client()
    assert c.on_response(reply(c.build(), 403), 0.0).state is RegState.FAILED
    assert c.on_response(reply(c.build(), 503), 0.0).state is RegState.BACKOFF
    assert c.on_response(None, 0.0).detail == "no response from the registrar"
    assert c.on_response(reply(c.build(), 401), 0.0).detail == "401: no usable digest challenge"
    assert c.stopped().state is RegState.UNREGISTERED


def test_configured_realm_must_match_the_challenge() -> None:
    pinned = RegistrationClient(
        Registration("sip:127.0.0.3", "line-a", "s3cret", realm="carrier"), ("127.0.0.1", 5070)
    )
    foreign = DigestServer("elsewhere").challenges(0.0, "127.0.0.1")
    status = pinned.on_response(reply(pinned.build(), 401, *(("WWW-Authenticate", v) for v in foreign)), 0.0)
    assert status.state is RegState.FAILED and status.detail == "401: no usable digest challenge for realm carrier"
    right = DigestServer("carrier").challenges(1.0, "127.0.0.1")
    status = pinned.on_response(reply(pinned.build(), 401, *(("WWW-Authenticate", v) for v in foreign + right)), 1.0)
    assert status.next_attempt == 1.0 and 'realm="carrier"' in (pinned.build().headers.get("Authorization") or "")


def test_unregister_asks_for_expiry_zero() -> None:
    assert client().build(expires=0).headers.get("Expires") == "0"


