"""Digest authentication (sans-I/O) on a fake clock: both sides, both algorithms."""

from __future__ import annotations

import pytest

from voiceline.sip.auth import (
    DigestClient,
    DigestServer,
    Verdict,
    digest_response,
    parse_digest,
    pick_challenge,
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


def test_parse_digest_handles_quotes_commas_and_escapes() -> None:
    params = parse_digest('Digest realm="a, \\"b\\"", nonce="n1", qop="auth,auth-int", algorithm=SHA-256, stale=TRUE')
    assert params == {"realm": 'a, "b"', "nonce": "n1", "qop": "auth,auth-int", "algorithm": "SHA-256", "stale": "TRUE"}
    with pytest.raises(ValueError):
        parse_digest('Basic realm="x"')


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
def test_challenge_answer_accepted_once_per_count(algorithm: str) -> None:
    server = DigestServer("carrier")
    values = [v for v in server.challenges(now=100.0) if f"algorithm={algorithm}" in v]
    challenge = pick_challenge(values)
    assert challenge is not None and challenge.algorithm == algorithm and challenge.qop == "auth"
    client = DigestClient("trunk-a", "pw")
    client.accept(challenge)
    first = client.authorization("INVITE", "sip:100@127.0.0.1")
    assert first is not None and "nc=00000001" in first
    assert server.check(first, "INVITE", "trunk-a", "pw", now=101.0) is Verdict.OK
    # The same nonce count again is a replay.
    assert server.check(first, "INVITE", "trunk-a", "pw", now=101.0) is Verdict.FAILED
    second = client.authorization("INVITE", "sip:100@127.0.0.1")
    assert second is not None and "nc=00000002" in second
    assert server.check(second, "INVITE", "trunk-a", "pw", now=102.0) is Verdict.OK


def test_strongest_challenge_is_picked() -> None:
    challenge = pick_challenge(list(reversed(DigestServer("r").challenges(now=0.0))))
    assert challenge is not None and challenge.algorithm == "SHA-256"
    assert pick_challenge(['Digest realm="r", nonce="n", algorithm=SHA-512-256']) is None
    assert pick_challenge(['Digest realm="r", nonce="n", qop="auth-int"']) is None


def test_wrong_password_wrong_user_and_wrong_method_fail() -> None:
    server = DigestServer("r")
    client = DigestClient("u", "wrong")
    client.accept(pick_challenge(server.challenges(now=0.0)))  # type: ignore[arg-type]
    header = client.authorization("INVITE", "sip:x@h")
    assert header is not None
    assert server.check(header, "INVITE", "u", "right", now=1.0) is Verdict.FAILED
    assert server.check(header, "INVITE", "other", "wrong", now=1.0) is Verdict.FAILED
    assert server.check(header, "BYE", "u", "wrong", now=1.0) is Verdict.FAILED


def test_old_nonce_is_stale_and_foreign_nonce_is_rechallenged() -> None:
    server = DigestServer("r", nonce_lifetime=30.0)
    client = DigestClient("u", "pw")
    client.accept(pick_challenge(server.challenges(now=0.0)))  # type: ignore[arg-type]
    late = client.authorization("REGISTER", "sip:h")
    assert late is not None and server.check(late, "REGISTER", "u", "pw", now=31.0) is Verdict.STALE
    assert any("stale=true" in v for v in server.challenges(now=31.0, stale=True))
    other = DigestServer("r")  # another key: its nonces are not ours
    forged = DigestClient("u", "pw")
    forged.accept(pick_challenge(other.challenges(now=0.0)))  # type: ignore[arg-type]
    header = forged.authorization("REGISTER", "sip:h")
    assert header is not None and server.check(header, "REGISTER", "u", "pw", now=1.0) is Verdict.CHALLENGE
    assert server.check("Digest garbage", "REGISTER", "u", "pw", now=1.0) is Verdict.CHALLENGE


def test_client_never_shows_its_password() -> None:
    client = DigestClient("u", "hunter2-secret")
    assert "hunter2" not in repr(client)


def test_server_limited_to_md5_challenges_and_accepts_only_md5() -> None:
    server = DigestServer("r", algorithms=("MD5",))
    [value] = server.challenges(now=0.0)
    challenge = pick_challenge([value])
    assert challenge is not None and challenge.algorithm == "MD5"
    client = DigestClient("u", "pw")
    client.accept(challenge)
    md5 = client.authorization("INVITE", "sip:x@h")
    assert md5 is not None and server.check(md5, "INVITE", "u", "pw", now=1.0) is Verdict.OK
    # Right password, but hashed with an algorithm this server does not offer.
    response = digest_response("SHA-256", "u", "r", "pw", "INVITE", "sip:x@h", challenge.nonce, "00000002", "c", "auth")
    sha = (
        f'Digest username="u", realm="r", nonce="{challenge.nonce}", uri="sip:x@h", response="{response}", '
        'algorithm=SHA-256, qop=auth, nc=00000002, cnonce="c"'
    )
    assert server.check(sha, "INVITE", "u", "pw", now=1.0) is Verdict.CHALLENGE
