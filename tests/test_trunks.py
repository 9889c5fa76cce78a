"""Trunk and line model, source matching and the admission policy (sans-I/O, fake clock)."""

from __future__ import annotations

import pytest

from voiceline import config
from voiceline.routing import (
    Line,
    Registration,
    Trunk,
    TrunkDirectory,
    TrunkError,
    TrunkPolicy,
    dialled_number,
)
from voiceline.sip.admission import Admit, Drop, Refuse
from voiceline.sip.auth import DigestClient, digest_ha1, digest_response, parse_digest, pick_challenge
from voiceline.sip.message import Headers, SipRequest


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(method: str = "INVITE", uri: str = "sip:100@127.0.0.1", auth: str = "") -> SipRequest:
    headers = Headers(
        [
            ("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKx"),
            ("From", "<sip:anon@192.0.2.1>;tag=a"),
            ("To", f"<{uri}>"),
            ("Call-ID", "c"),
            ("CSeq", f"1 {method}"),
        ]
    )
    if auth:
        headers.add("Authorization", auth)
    return SipRequest(method, uri, headers)


LINES = [Line("general", ("100", "+4930100")), Line("language", ("200",))]


def directory(*trunks: Trunk, lines: list[Line] = LINES, resolved: dict[str, list[str]] | None = None) -> TrunkDirectory:
    return TrunkDirectory(trunks, lines, resolved)


def test_most_specific_source_wins_and_disabled_trunks_match_nothing() -> None:
    d = directory(
        Trunk("wide", sources=("10.0.0.0/8",)),
        Trunk("narrow", sources=("10.1.2.3",)),
        Trunk("off", enabled=False, sources=("10.9.9.9",)),
        Trunk("v6", sources=("2001:db8::/32",)),
    )
    assert d.identify("10.1.2.3", "udp").name == "narrow"  # type: ignore[union-attr]
    assert d.identify("10.1.2.4", "udp").name == "wide"  # type: ignore[union-attr]
    assert d.identify("10.9.9.9", "udp").name == "wide"  # type: ignore[union-attr]
    assert d.identify("::ffff:10.1.2.3", "udp").name == "narrow"  # type: ignore[union-attr]
    assert d.identify("2001:db8::1", "udp").name == "v6"  # type: ignore[union-attr]
    assert d.identify("192.0.2.1", "udp") is None
    assert d.identify("10.1.2.3", "tcp") is None  # udp only by default


def test_most_specific_trunk_decides_even_when_its_transport_does_not_fit() -> None:
    d = directory(
        Trunk("wide", sources=("10.0.0.0/8",), transports=("udp", "tcp")),
        Trunk("sbc", sources=("10.1.2.0/24",), username="sbc", password="pw"),  # udp only, digest
        Trunk("sbc-tls", sources=("10.1.2.0/24",), transports=("tls",)),  # as specific: a peer, not a fallback
    )
    assert [t.name for t in d.source_trunks("10.1.2.3")] == ["sbc", "sbc-tls"]
    assert d.identify("10.1.2.3", "udp").name == "sbc"  # type: ignore[union-attr]
    assert d.identify("10.1.2.3", "tls").name == "sbc-tls"  # type: ignore[union-attr]
    assert d.identify("10.1.2.3", "tcp") is None  # never handed to the broader "wide"
    assert d.identify("10.9.9.9", "tcp").name == "wide"  # type: ignore[union-attr]


def test_host_names_match_once_resolved_and_registrar_ip_identifies() -> None:
    trunks = (
        Trunk("named", sources=("sbc.example.net",)),
        Trunk("reg", registration=Registration("sip:198.51.100.7:5080", "u", "p")),
    )
    assert directory(*trunks).hostnames == {"sbc.example.net"}
    assert directory(*trunks).identify("203.0.113.5", "udp") is None
    resolved = directory(*trunks, resolved={"sbc.example.net": ["203.0.113.5"]})
    assert resolved.identify("203.0.113.5", "udp").name == "named"  # type: ignore[union-attr]
    assert resolved.identify("198.51.100.7", "udp").name == "reg"  # type: ignore[union-attr]


def test_lines_by_dialled_number_with_wildcard() -> None:
    d = directory(lines=[*LINES, Line("rest", ("*",))])
    assert dialled_number("sip:+4930100;phone-context=x@h") == "+4930100"
    assert d.line_for("200").name == "language"  # type: ignore[union-attr]
    assert d.line_for("999").name == "rest"  # type: ignore[union-attr]
    assert directory().line_for("999") is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad name", "sources": ("1.2.3.4",)}, "name"),
        ({"name": "t", "sources": ("1.2.3.4/40",)}, "1.2.3.4/40"),
        ({"name": "t", "sources": ("300.1.1.1",)}, "300.1.1.1"),
        ({"name": "t"}, "sources"),
        ({"name": "t", "sources": ("1.2.3.4",), "username": "u"}, "password"),
        ({"name": "t", "sources": ("1.2.3.4",), "codecs": ("G729",)}, "codecs"),
        ({"name": "t", "sources": ("1.2.3.4",), "transports": ("sctp",)}, "transports"),
        ({"name": "t", "sources": ("1.2.3.4",), "max_calls": -1}, "max_calls"),
        ({"name": "t", "sources": ("1.2.3.4",), "auth_algorithms": ("SHA-512",)}, "auth_algorithms"),
    ],
)
def test_invalid_trunks_are_refused_by_setting(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(TrunkError, match=message.replace(".", r"\.")):
        Trunk(**kwargs)  # type: ignore[arg-type]


def test_registration_and_line_validation() -> None:
    with pytest.raises(TrunkError, match="registrar"):
        Registration("http://x", "u")
    with pytest.raises(TrunkError, match="expiry"):
        Registration("sip:reg.example.net", "u", expiry=1)
    with pytest.raises(TrunkError, match="number"):
        Line("l", ("1@2",))
    with pytest.raises(TrunkError, match="unknown setting"):
        Trunk.from_settings("t", {"sources": ["1.2.3.4"], "colour": "red"})
    with pytest.raises(TrunkError, match="max_calls: expected an integer"):
        Trunk.from_settings("t", {"sources": ["1.2.3.4"], "max_calls": "3"})


def test_settings_round_trip_and_public_view_hides_passwords() -> None:
    trunk = Trunk(
        "t", sources=("1.2.3.4",), username="in", password="inbound-secret",
        registration=Registration("sip:reg.example.net", "u", "outbound-secret", expiry=600),
    )  # fmt: skip
    assert Trunk.from_settings("t", trunk.settings()) == trunk
    shown = repr(trunk) + str(trunk.public())
    assert "secret" not in shown
    assert trunk.public()["password"] == "set" and trunk.public()["registration"]["password"] == "set"


def policy(d: TrunkDirectory, clock: Clock | None = None, active: int = 0, drop: bool = False) -> TrunkPolicy:
    return TrunkPolicy(d, clock or Clock(), lambda trunk: active, drop_unknown=drop)


def test_unknown_source_is_refused_or_dropped_and_counted() -> None:
    d = directory(Trunk("carrier", sources=("192.0.2.0/24",)))
    reject = policy(d)
    assert reject.check(request(), ("198.51.100.1", 5060), "UDP") == Refuse(403)
    assert reject.check(request("OPTIONS"), ("198.51.100.1", 5060), "UDP") == Refuse(403)
    assert reject.refused["unknown_source"] == 2
    drop = policy(d, drop=True)
    assert drop.check(request(), ("198.51.100.1", 5060), "UDP") == Drop()
    assert drop.refused["unknown_source"] == 1


def test_trunk_admits_to_the_dialled_line_with_its_codecs() -> None:
    p = policy(directory(Trunk("carrier", sources=("192.0.2.0/24",), codecs=("PCMA",))))
    assert p.check(request(uri="sip:200@10.0.0.1"), ("192.0.2.1", 5060), "UDP") == Admit("carrier", "language", ("PCMA",))
    assert p.check(request("OPTIONS"), ("192.0.2.1", 5060), "UDP") == Admit("carrier")
    assert p.check(request(uri="sip:300@10.0.0.1"), ("192.0.2.1", 5060), "UDP") == Refuse(404)
    assert p.check(request(), ("192.0.2.1", 5060), "TCP") == Refuse(403)
    assert p.refused == {"unknown_number": 1, "wrong_transport": 1}


def test_trunk_at_its_call_limit_gets_503() -> None:
    d = directory(Trunk("carrier", sources=("192.0.2.0/24",), max_calls=2))
    assert isinstance(policy(d, active=1).check(request(), ("192.0.2.1", 5060), "UDP"), Admit)
    busy = policy(d, active=2).check(request(), ("192.0.2.1", 5060), "UDP")
    assert isinstance(busy, Refuse) and busy.status == 503 and ("Retry-After", "30") in busy.headers


def test_digest_trunk_is_challenged_then_admitted_and_wrong_password_refused() -> None:
    clock = Clock()
    p = policy(directory(Trunk("sbc", sources=("192.0.2.9",), username="sbc", password="pw", realm="vl")), clock)
    source = ("192.0.2.9", 5060)
    challenge = p.check(request(), source, "UDP")
    assert isinstance(challenge, Refuse) and challenge.status == 401
    values = [value for name, value in challenge.headers if name == "WWW-Authenticate"]
    assert len(values) == 2 and all('realm="vl"' in v and 'qop="auth"' in v for v in values)
    good, bad = DigestClient("sbc", "pw"), DigestClient("sbc", "nope")
    for client in (good, bad):
        client.accept(pick_challenge(values))  # type: ignore[arg-type]
    uri = "sip:100@127.0.0.1"
    assert p.check(request(auth=good.authorization("INVITE", uri) or ""), source, "UDP") == Admit("sbc", "general", ())
    assert p.check(request(auth=bad.authorization("INVITE", uri) or ""), source, "UDP") == Refuse(403)
    assert p.refused["auth_failed"] == 1
    clock.now += 3600  # the nonce grew old: a fresh challenge saying stale=true
    stale = p.check(request(auth=good.authorization("INVITE", uri) or ""), source, "UDP")
    assert isinstance(stale, Refuse) and stale.status == 401 and "stale=true" in stale.headers[0][1]


def test_unknown_sources_are_logged_at_a_limited_rate(capsys: pytest.CaptureFixture[str]) -> None:
    from structlog.testing import capture_logs

    clock = Clock()
    p = policy(directory(Trunk("carrier", sources=("192.0.2.0/24",))), clock)
    with capture_logs() as logs:
        for _ in range(50):
            p.check(request(), ("198.51.100.1", 5060), "UDP")
        clock.now += 11
        p.check(request(), ("198.51.100.1", 5060), "UDP")
    events = [entry for entry in logs if entry["event"] == "sip.unknown_source"]
    assert [e["refused"] for e in events] == [1, 50]
    assert {e["source_network"] for e in events} == {"198.51.100.0/24"}  # not the exact address
    assert all("anon" not in str(e) for e in events)  # no From/To content


def test_default_config_has_a_loopback_trunk_and_a_catch_all_line() -> None:
    cfg = config.Config()
    d = TrunkDirectory(cfg.trunks, cfg.lines)
    assert d.identify("127.0.0.1", "udp") is not None and d.identify("192.0.2.1", "udp") is None
    assert d.line_for("anything").name == "default"  # type: ignore[union-attr]


def test_config_file_trunks_and_lines(tmp_path: object) -> None:
    cfg = config.from_mapping(
        {
            "trunks": [
                {"name": "carrier", "sources": ["192.0.2.0/24"], "max_calls": 10},
                {"name": "reg", "registration": {"registrar": "sip:reg.example.net", "username": "u", "password": "p"}},
            ],
            "lines": [{"name": "general", "numbers": ["100"]}],
        }
    )
    assert [t.name for t in cfg.trunks] == ["carrier", "reg"] and cfg.trunks[1].registration is not None
    for bad, message in (
        ({"trunks": [{"name": "x", "sources": ["1.2.3.4/99"]}]}, "1.2.3.4/99"),
        ({"trunks": [{"sources": ["1.2.3.4"]}]}, "needs a name"),
        ({"lines": [{"name": "a", "numbers": ["1"]}, {"name": "a", "numbers": ["2"]}]}, "unique"),
        ({"trunks": {"name": "x"}}, r"\[\[trunks\]\]"),
        ({"sip": {"unknown_source": "ignore"}}, "unknown_source"),
    ):
        with pytest.raises(config.ConfigError, match=message):
            config.from_mapping(bad)  # type: ignore[arg-type]


def test_fall_through_to_a_broader_trunk_without_credentials_is_refused() -> None:
    """Attack 5: a UDP-only digest trunk inside a broader open trunk; TCP without credentials from its range."""
    p = policy(
        directory(
            Trunk("sbc", sources=("192.0.2.8/29",), username="sbc", password="pw"),
            Trunk("wide", sources=("192.0.2.0/24",), transports=("udp", "tcp")),
        )
    )
    assert p.check(request(), ("192.0.2.9", 5060), "TCP") == Refuse(403)
    assert p.check(request("OPTIONS"), ("192.0.2.9", 5060), "TCP") == Refuse(403)
    assert p.refused == {"wrong_transport": 2}
    challenge = p.check(request(), ("192.0.2.9", 5060), "UDP")
    assert isinstance(challenge, Refuse) and challenge.status == 401
    assert p.check(request(), ("192.0.2.1", 5060), "TCP") == Admit("wide", "general", ())


def challenged(p: TrunkPolicy, source: tuple[str, int], password: str = "pw") -> DigestClient:
    challenge = p.check(request(), source, "UDP")
    assert isinstance(challenge, Refuse) and challenge.status == 401
    client = DigestClient("sbc", password)
    client.accept(pick_challenge([value for name, value in challenge.headers if name == "WWW-Authenticate"]))  # type: ignore[arg-type]
    return client


def test_replayed_or_moved_answers_get_a_fresh_challenge_never_admission() -> None:
    p = policy(directory(Trunk("sbc", sources=("192.0.2.8/29",), username="sbc", password="pw")))
    source = ("192.0.2.9", 5060)
    client = challenged(p, source)
    captured = client.authorization("INVITE", "sip:100@127.0.0.1") or ""
    assert p.check(request(auth=captured), source, "UDP") == Admit("sbc", "general", ())
    for replay in (
        request(auth=captured),  # the same request again
        request(uri="sip:200@127.0.0.1", auth=captured),  # another number
    ):
        refused = p.check(replay, source, "UDP")
        assert isinstance(refused, Refuse) and refused.status == 401
        assert "stale" not in refused.headers[0][1]
    # The nonce was issued to 192.0.2.9: from another address of the same trunk it is worthless.
    fresh = client.authorization("INVITE", "sip:100@127.0.0.1") or ""
    moved = p.check(request(auth=fresh), ("192.0.2.10", 5060), "UDP")
    assert isinstance(moved, Refuse) and moved.status == 401
    assert p.refused == {"auth_replayed": 2}


def test_answer_without_qop_is_admitted_only_where_the_trunk_allows_it() -> None:
    for allow in (False, True):
        trunk = Trunk("sbc", sources=("192.0.2.9",), username="sbc", password="pw", auth_algorithms=("MD5",),
                      auth_allow_rfc2069=allow)  # fmt: skip
        p = policy(directory(trunk))
        source = ("192.0.2.9", 5060)
        challenge = p.check(request(), source, "UDP")
        assert isinstance(challenge, Refuse)
        nonce = parse_digest(challenge.headers[0][1])["nonce"]
        uri = "sip:100@127.0.0.1"
        response = digest_response("MD5", "sbc", "voiceline", "pw", "INVITE", uri, nonce)
        value = f'Digest username="sbc", realm="voiceline", nonce="{nonce}", uri="{uri}", response="{response}"'
        verdict = p.check(request(auth=value), source, "UDP")
        assert verdict == Admit("sbc", "general", ()) if allow else isinstance(verdict, Refuse) and verdict.status == 401
        if allow:  # one request per RFC 2069 nonce
            again = p.check(request(auth=value), source, "UDP")
            assert isinstance(again, Refuse) and again.status == 401


def test_inbound_password_is_kept_only_as_ha1_per_offered_algorithm() -> None:
    trunk = Trunk("sbc", sources=("192.0.2.9",), username="sbc", password="inbound-secret", realm="vl")
    stored = trunk.settings()
    assert "password" not in stored and "inbound-secret" not in str(stored) + repr(trunk)
    assert stored["ha1_sha256"] == digest_ha1("SHA-256", "sbc", "vl", "inbound-secret")
    assert stored["ha1_md5"] == digest_ha1("MD5", "sbc", "vl", "inbound-secret")
    assert Trunk.from_settings("sbc", stored) == trunk
    assert "ha1_md5" not in trunk.public() and trunk.public()["password"] == "set"
    sha_only = Trunk.from_settings("s", {"sources": ["192.0.2.9"], "username": "u", "password": "x", "auth_algorithms": ["SHA-256"]})
    assert sha_only.ha1_md5 == "" and len(sha_only.ha1_sha256) == 64
    # Offering MD5 later needs the password again: its HA1 was never kept.
    with pytest.raises(TrunkError, match="MD5 needs the password again"):
        Trunk.from_settings("s", {**sha_only.settings(), "auth_algorithms": ["SHA-256", "MD5"]})
    with pytest.raises(TrunkError, match="not both"):
        Trunk.from_settings("s", {**stored, "password": "x"})
