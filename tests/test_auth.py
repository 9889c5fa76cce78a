"""Digest authentication (sans-I/O) on a fake clock: both sides, both algorithms."""

from __future__ import annotations

import pytest

from voiceline.sip.auth import (
    DigestClient,
    DigestServer,
    Verdict,
    digest_ha1,
    digest_response,
    parse_digest,
    pick_challenge,
    response_from_ha1,
)


def test_rfc7616_vectors() -> None:
    # RFC 7616 section 3.9.1.
    args = dict(
        username="Mufasa", realm="http-auth@example.org", password="Circle of Life", method="GET",
        uri="/dir/index.html", nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", nc="00000001",
        cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ", qop="auth",
    )  # fmt: skip
    assert digest_response("MD5", **args) == "8ca523f5e9506fed4657c9700eebdbec"
    assert digest_response("SHA-256", **args) == "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
    # The server side checks the same answers against stored HA1 values, not the password.
    server_args = {k: v for k, v in args.items() if k not in ("username", "realm", "password")}
    for algorithm, expected in (("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
                                ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1")):  # fmt: skip
        ha1 = digest_ha1(algorithm, "Mufasa", "http-auth@example.org", "Circle of Life")
        assert response_from_ha1(algorithm, ha1, **server_args) == expected


def test_parse_digest_handles_quotes_commas_and_escapes() -> None:
    params = parse_digest('Digest realm="a, \\"b\\"", nonce="n1", qop="auth,auth-int", algorithm=SHA-256, stale=TRUE')
    assert params == {"realm": 'a, "b"', "nonce": "n1", "qop": "auth,auth-int", "algorithm": "SHA-256", "stale": "TRUE"}
    with pytest.raises(ValueError):
        parse_digest('Basic realm="x"')


SOURCE = "192.0.2.9"  # the requester a nonce is issued to
URI = "sip:100@127.0.0.1"


def ha1(password: str, username: str = "u", realm: str = "r") -> dict[str, str]:
    return {algorithm: digest_ha1(algorithm, username, realm, password) for algorithm in ("SHA-256", "MD5")}


def answer(server: DigestServer, client: DigestClient, now: float, algorithm: str = "SHA-256", source: str = SOURCE) -> None:
    values = [v for v in server.challenges(now, source) if f"algorithm={algorithm}" in v]
    challenge = pick_challenge(values)
    assert challenge is not None and challenge.algorithm == algorithm and challenge.qop == "auth"
    client.accept(challenge)


def header(client: DigestClient, uri: str = URI, method: str = "INVITE") -> str:
    value = client.authorization(method, uri)
    assert value is not None
    return value


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
def test_challenge_answer_accepted_once_per_count(algorithm: str) -> None:
    server = DigestServer("r")
    client = DigestClient("u", "pw")
    answer(server, client, now=100.0, algorithm=algorithm)
    first = header(client)
    assert "nc=00000001" in first
    assert server.check(first, "INVITE", URI, "u", ha1("pw"), now=101.0, bound_to=SOURCE) is Verdict.OK
    # The same nonce count again is a replay: never admitted.
    assert server.check(first, "INVITE", URI, "u", ha1("pw"), now=101.0, bound_to=SOURCE) is Verdict.REPLAYED
    second = header(client)
    assert "nc=00000002" in second
    assert server.check(second, "INVITE", URI, "u", ha1("pw"), now=102.0, bound_to=SOURCE) is Verdict.OK
    # An older count after a newer one is refused too: counts must strictly increase.
    third, fourth = header(client), header(client)
    assert server.check(fourth, "INVITE", URI, "u", ha1("pw"), now=103.0, bound_to=SOURCE) is Verdict.OK
    assert server.check(third, "INVITE", URI, "u", ha1("pw"), now=103.0, bound_to=SOURCE) is Verdict.REPLAYED


def rfc2069(server: DigestServer, nonce: str, uri: str = URI, password: str = "pw") -> str:
    response = digest_response("MD5", "u", "r", password, "INVITE", uri, nonce)
    return f'Digest username="u", realm="r", nonce="{nonce}", uri="{uri}", response="{response}", algorithm=MD5'


def test_answer_without_qop_is_refused_unless_the_trunk_opts_in() -> None:
    strict, lenient = DigestServer("r"), DigestServer("r", allow_rfc2069=True)
    for server in (strict, lenient):
        challenge = pick_challenge(server.challenges(0.0, SOURCE))
        assert challenge is not None
        value = rfc2069(server, challenge.nonce)
        verdict = server.check(value, "INVITE", URI, "u", ha1("pw"), now=1.0, bound_to=SOURCE)
        assert verdict is (Verdict.OK if server is lenient else Verdict.CHALLENGE)
    # Without a nonce count, an RFC 2069 nonce serves one request: the same answer again is a replay.
    assert lenient.check(value, "INVITE", URI, "u", ha1("pw"), now=2.0, bound_to=SOURCE) is Verdict.REPLAYED
    assert lenient.check(rfc2069(lenient, challenge.nonce, password="no"), "INVITE", URI, "u", ha1("pw"), 2.0, SOURCE) is Verdict.FAILED


def test_nonce_from_another_source_is_rechallenged() -> None:
    server = DigestServer("r")
    client = DigestClient("u", "pw")
    answer(server, client, now=0.0, source="192.0.2.9")
    value = header(client)
    # Right password, right count, but the nonce was sent to another address.
    assert server.check(value, "INVITE", URI, "u", ha1("pw"), now=1.0, bound_to="192.0.2.10") is Verdict.CHALLENGE
    assert server.check(value, "INVITE", URI, "u", ha1("pw"), now=1.0, bound_to="192.0.2.9") is Verdict.OK
    # Nor does a nonce move between realms (trunks): the realm is under the HMAC too.
    other_realm = DigestServer("r2")
    other_realm._key = server._key  # even with the same key
    moved = DigestClient("u", "pw")
    moved.accept(pick_challenge(other_realm.challenges(0.0, SOURCE)))  # type: ignore[arg-type]
    forged = header(moved).replace('realm="r2"', 'realm="r"')
    assert server.check(forged, "INVITE", URI, "u", ha1("pw"), now=1.0, bound_to=SOURCE) is Verdict.CHALLENGE


def test_uri_other_than_the_request_uri_is_refused() -> None:
    server = DigestServer("r")
    client = DigestClient("u", "pw")
    answer(server, client, now=0.0)
    captured = header(client, uri="sip:100@127.0.0.1")
    # Replayed as a request for another number: the signed uri is not the Request-URI.
    assert server.check(captured, "INVITE", "sip:200@127.0.0.1", "u", ha1("pw"), 1.0, SOURCE) is Verdict.REPLAYED
    assert server.check(captured, "INVITE", "sip:100@127.0.0.1", "u", ha1("pw"), 1.0, SOURCE) is Verdict.OK


def test_nonce_state_is_bounded_and_forgetting_never_reopens_a_replay() -> None:
    server = DigestServer("r", max_tracked_nonces=3)
    used: list[str] = []
    for t in range(5):
        client = DigestClient("u", "pw")
        answer(server, client, now=float(t))
        used.append(header(client))
        assert server.check(used[-1], "INVITE", URI, "u", ha1("pw"), now=t + 0.5, bound_to=SOURCE) is Verdict.OK
    assert len(server._counts) <= 3
    # The first two answers' nonces were dropped from the table: their replays are stale, never OK.
    for replay in used[:2]:
        assert server.check(replay, "INVITE", URI, "u", ha1("pw"), now=6.0, bound_to=SOURCE) is Verdict.STALE
    for replay in used[2:]:
        assert server.check(replay, "INVITE", URI, "u", ha1("pw"), now=6.0, bound_to=SOURCE) is Verdict.REPLAYED


def test_expired_nonces_leave_the_table() -> None:
    server = DigestServer("r", nonce_lifetime=30.0)
    for t in (0.0, 1.0, 100.0):
        client = DigestClient("u", "pw")
        answer(server, client, now=t)
        assert server.check(header(client), "INVITE", URI, "u", ha1("pw"), now=t, bound_to=SOURCE) is Verdict.OK
    assert len(server._counts) == 1


def test_strongest_challenge_is_picked() -> None:
    challenge = pick_challenge(list(reversed(DigestServer("r").challenges(0.0, SOURCE))))
    assert challenge is not None and challenge.algorithm == "SHA-256"
    assert pick_challenge(['Digest realm="r", nonce="n", algorithm=SHA-512-256']) is None
    assert pick_challenge(['Digest realm="r", nonce="n", qop="auth-int"']) is None


def test_wrong_password_wrong_user_and_wrong_method_fail() -> None:
    server = DigestServer("r")
    client = DigestClient("u", "wrong")
    answer(server, client, now=0.0)
    value = header(client)
    assert server.check(value, "INVITE", URI, "u", ha1("right"), now=1.0, bound_to=SOURCE) is Verdict.FAILED
    assert server.check(value, "INVITE", URI, "other", ha1("wrong"), now=1.0, bound_to=SOURCE) is Verdict.FAILED
    assert server.check(value, "BYE", URI, "u", ha1("wrong"), now=1.0, bound_to=SOURCE) is Verdict.FAILED


def test_old_nonce_is_stale_and_foreign_nonce_is_rechallenged() -> None:
    server = DigestServer("r", nonce_lifetime=30.0)
    client = DigestClient("u", "pw")
    answer(server, client, now=0.0)
    late = header(client, uri="sip:h", method="REGISTER")
    assert server.check(late, "REGISTER", "sip:h", "u", ha1("pw"), now=31.0, bound_to=SOURCE) is Verdict.STALE
    assert any("stale=true" in v for v in server.challenges(31.0, SOURCE, stale=True))
    other = DigestServer("r")  # another key: its nonces are not ours
    forged = DigestClient("u", "pw")
    answer(other, forged, now=0.0)
    value = header(forged, uri="sip:h", method="REGISTER")
    assert server.check(value, "REGISTER", "sip:h", "u", ha1("pw"), now=1.0, bound_to=SOURCE) is Verdict.CHALLENGE
    assert server.check("Digest garbage", "REGISTER", "sip:h", "u", ha1("pw"), now=1.0, bound_to=SOURCE) is Verdict.CHALLENGE


def test_client_never_shows_its_password() -> None:
    client = DigestClient("u", "hunter2-secret")
    assert "hunter2" not in repr(client)


def test_server_limited_to_md5_challenges_and_accepts_only_md5() -> None:
    server = DigestServer("r", algorithms=("MD5",))
    [value] = server.challenges(0.0, SOURCE)
    challenge = pick_challenge([value])
    assert challenge is not None and challenge.algorithm == "MD5"
    client = DigestClient("u", "pw")
    client.accept(challenge)
    md5 = header(client, uri="sip:x@h")
    assert server.check(md5, "INVITE", "sip:x@h", "u", ha1("pw"), now=1.0, bound_to=SOURCE) is Verdict.OK
    # Right password, but hashed with an algorithm this server does not offer.
    response = digest_response("SHA-256", "u", "r", "pw", "INVITE", "sip:x@h", challenge.nonce, "00000002", "c", "auth")
    sha = (
        f'Digest username="u", realm="r", nonce="{challenge.nonce}", uri="sip:x@h", response="{response}", '
        'algorithm=SHA-256, qop=auth, nc=00000002, cnonce="c"'
    )
    assert server.check(sha, "INVITE", "sip:x@h", "u", ha1("pw"), now=1.0, bound_to=SOURCE) is Verdict.CHALLENGE
