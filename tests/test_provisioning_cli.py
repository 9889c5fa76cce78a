"""`voiceline trunk ...` and `voiceline line ...` as an admin runs them: real processes, a real database."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from port_table import port_block
from rawsip import RawPeer
from voiceline.sip.message import response_to, serialize

pytestmark = pytest.mark.integration

SECRET = "pa55-word-in"
REG_SECRET = "pa55-word-reg"

SILENT_PORT, _ = port_block("test_provisioning_cli")  # nobody answers there


def run(data_dir: Path, *args: str, stdin: str = "", config: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--config", str(config)] if config else []
    return subprocess.run(
        [sys.executable, "-m", "voiceline", *args, "--data-dir", str(data_dir), *extra],
        capture_output=True, text=True, timeout=30, input=stdin,
    )  # fmt: skip


def ok(data_dir: Path, *args: str, stdin: str = "", config: Path | None = None) -> str:
    result = run(data_dir, *args, stdin=stdin, config=config)
    assert result.returncode == 0, result.stderr
    return result.stdout


def bad(data_dir: Path, *args: str, config: Path | None = None) -> str:
    result = run(data_dir, *args, config=config)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], result.stderr
    return lines[0]


def test_trunk_lifecycle_with_table_and_json(tmp_path: Path) -> None:
    d = tmp_path / "data"
    assert "trunk carrier added" in ok(d, "trunk", "add", "carrier", "--source", "192.0.2.0/24", "--source", "sbc.example.net",
                                      "--codec", "PCMA", "--max-calls", "20")  # fmt: skip
    ok(d, "trunk", "add", "sbc", "--source", "198.51.100.7", "--username", "sbc", "--password", "-", stdin=SECRET + "\n")
    ok(d, "trunk", "add", "reg", "--register", "sip:reg.example.net", "--register-username", "line-a",
       "--register-password", REG_SECRET, "--expiry", "600", "--disabled")  # fmt: skip

    table = ok(d, "trunk", "list")
    header, *rows = table.splitlines()
    assert header.split()[:3] == ["NAME", "ORIGIN", "ENABLED"]
    by_name = {row.split()[0]: row.split() for row in rows}
    assert set(by_name) == {"loopback", "carrier", "sbc", "reg"}
    assert by_name["loopback"][1] == "config" and by_name["carrier"][1] == "database"
    assert by_name["reg"][2] == "no" and by_name["sbc"][4] == "digest"

    listed = {row["name"]: row for row in json.loads(ok(d, "trunk", "list", "--json"))}
    assert listed["carrier"]["sources"] == ["192.0.2.0/24", "sbc.example.net"]
    assert listed["carrier"]["codecs"] == ["PCMA"] and listed["carrier"]["max_calls"] == 20
    assert listed["sbc"]["password"] == "set" and listed["reg"]["registration"]["password"] == "set"
    assert listed["reg"]["registration_status"]["state"] == "unknown"

    shown = ok(d, "trunk", "show", "reg")
    assert "registrar: sip:reg.example.net" in shown and "expiry: 600" in shown
    assert json.loads(ok(d, "trunk", "show", "sbc", "--json"))["username"] == "sbc"

    ok(d, "trunk", "update", "carrier", "--max-calls", "5", "--transport", "udp", "--transport", "tcp")
    ok(d, "trunk", "update", "sbc", "--no-auth")
    ok(d, "trunk", "enable", "reg")
    ok(d, "trunk", "update", "reg", "--expiry", "120", "--contact-user", "inbound")
    listed = {row["name"]: row for row in json.loads(ok(d, "trunk", "list", "--json"))}
    assert listed["carrier"]["max_calls"] == 5 and listed["carrier"]["transports"] == ["udp", "tcp"]
    assert listed["carrier"]["sources"] == ["192.0.2.0/24", "sbc.example.net"]  # untouched
    assert listed["sbc"]["username"] == "" and listed["sbc"]["password"] == ""
    assert listed["reg"]["enabled"] and listed["reg"]["registration"]["expiry"] == 120
    assert listed["reg"]["registration"]["contact_user"] == "inbound"
    assert listed["reg"]["registration"]["password"] == "set"  # kept across the update
    assert "trunk carrier disabled" in ok(d, "trunk", "disable", "carrier")
    assert "trunk sbc removed" in ok(d, "trunk", "remove", "sbc")
    assert {row["name"] for row in json.loads(ok(d, "trunk", "list", "--json"))} == {"loopback", "carrier", "reg"}

    # Passwords never leave the database through these commands.
    for args in (("trunk", "list"), ("trunk", "list", "--json"), ("trunk", "show", "reg"), ("trunk", "show", "reg", "--json")):
        output = run(d, *args)
        assert REG_SECRET not in output.stdout + output.stderr and SECRET not in output.stdout + output.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("trunk", "add", "x", "--source", "10.0.0.0/33"), "10.0.0.0/33"),
        (("trunk", "add", "x", "--source", "999.1.1.1"), "999.1.1.1"),
        (("trunk", "add", "x"), "sources"),
        (("trunk", "add", "bad name", "--source", "10.0.0.1"), "name"),
        (("trunk", "add", "x", "--source", "10.0.0.1", "--username", "u"), "password"),
        (("trunk", "add", "x", "--register", "sip:reg.example.net"), "--register-username"),
        (("trunk", "add", "x", "--register", "mailto:a", "--register-username", "u"), "registrar"),
        (("trunk", "add", "x", "--source", "10.0.0.1", "--max-calls", "-1"), "negative"),
        (("trunk", "add", "x", "--source", "10.0.0.1", "--codec", "G729"), "invalid choice"),
        (("trunk", "add", "loopback", "--source", "10.0.0.1"), "config file"),
        (("trunk", "update", "loopback", "--max-calls", "2"), "config file"),
        (("trunk", "update", "nope", "--max-calls", "2"), "no trunk named 'nope'"),
        (("trunk", "show", "nope"), "no trunk named 'nope'"),
        (("trunk", "remove", "nope"), "no trunk named 'nope'"),
        (("trunk", "enable", "nope"), "no trunk named 'nope'"),
        (("trunk", "disable", "nope"), "no trunk named 'nope'"),
        (("trunk", "test", "nope"), "no trunk named 'nope'"),
        (("trunk", "frobnicate"), "invalid choice"),
        (("line", "add", "x"), "--number"),
        (("line", "add", "x", "--number", "1@2"), "number"),
        (("line", "add", "default", "--number", "5"), "config file"),
        (("line", "show", "nope"), "no line named 'nope'"),
        (("line", "add", "x", "--number", "5", "--set", "waiting.max_wai=300"), "waiting.max_wai: unknown key"),
        (("line", "add", "x", "--number", "5", "--set", "waiting.max_wait=soon"), "waiting.max_wait: expected a number, got 'soon'"),
        (("line", "add", "x", "--number", "5", "--set", "keys.help=#"), "each key may have one meaning only"),
        (("line", "add", "x", "--number", "5", "--set", "max_wait=300"), "expected SECTION.KEY=VALUE"),
        (("line", "add", "x", "--number", "5", "--set", "help.method=fax"), "help.method: must be 'invite' or 'refer'"),
        (("line", "add", "x", "--number", "5", "--language", "xx"), "no built-in prompts for language 'xx'"),
        (("line", "remove", "nope"), "no line named 'nope'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    assert message in bad(tmp_path / "data", *args)


def test_duplicates_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "data"
    ok(d, "trunk", "add", "carrier", "--source", "192.0.2.1")
    assert "trunk 'carrier' already exists" in bad(d, "trunk", "add", "carrier", "--source", "192.0.2.2")
    ok(d, "line", "add", "general", "--number", "100", "--number", "101")
    assert "line 'general' already exists" in bad(d, "line", "add", "general", "--number", "102")
    assert "number '101' already reaches line 'general'" in bad(d, "line", "add", "other", "--number", "101")
    assert "--no-register cannot be combined" in bad(d, "trunk", "update", "carrier", "--no-register", "--expiry", "60")


def test_line_lifecycle(tmp_path: Path) -> None:
    d = tmp_path / "data"
    assert "line general added" in ok(d, "line", "add", "general", "--number", "+4930100", "--number", "100")
    ok(d, "line", "add", "language", "--number", "200", "--max-calls", "8")
    header, *rows = ok(d, "line", "list").splitlines()
    assert header.split() == ["NAME", "ORIGIN", "ENABLED", "NUMBERS", "MAX", "CALLS", "OWN", "HELP"]
    assert [row.split()[:4] for row in rows] == [
        ["default", "config", "yes", "*"], ["general", "database", "yes", "+4930100,100"],
        ["language", "database", "yes", "200"],
    ]  # fmt: skip
    assert json.loads(ok(d, "line", "show", "language", "--json")) == {
        "name": "language", "numbers": ["200"], "max_calls": 8, "enabled": True, "origin": "database"
    }
    assert "numbers: +4930100, 100" in ok(d, "line", "show", "general")
    assert "line general removed" in ok(d, "line", "remove", "general")
    assert [r["name"] for r in json.loads(ok(d, "line", "list", "--json"))] == ["default", "language"]


def test_config_file_trunks_are_listed_and_shadow_database_ones(tmp_path: Path) -> None:
    d = tmp_path / "data"
    ok(d, "trunk", "add", "carrier", "--source", "192.0.2.1")
    config = tmp_path / "voiceline.toml"
    config.write_text('[[trunks]]\nname = "carrier"\nsources = ["198.51.100.0/24"]\n')
    listed = json.loads(ok(d, "trunk", "list", "--json", config=config))
    assert [(r["name"], r["origin"], r["sources"]) for r in listed] == [("carrier", "config", ["198.51.100.0/24"])]
    config.write_text('[[trunks]]\nname = "x"\nsources = ["1.2.3.4/77"]\n')
    assert "1.2.3.4/77" in bad(d, "trunk", "list", config=config)


async def test_trunk_test_pings_with_options(tmp_path: Path) -> None:
    """`trunk test` sends OPTIONS to the trunk's address and reports the answer."""
    peer = await RawPeer.open("127.0.0.5")
    try:
        d = tmp_path / "data"
        await asyncio.to_thread(ok, d, "trunk", "add", "carrier", "--source", "127.0.0.5", "--source", "127.0.0.0/24")
        probe = asyncio.create_task(asyncio.to_thread(run, d, "trunk", "test", "carrier", "--port", str(peer.port), "--json"))
        options = await peer.request("OPTIONS", timeout=15)
        assert options.uri == f"sip:127.0.0.5:{peer.port}"
        via = options.headers.get("Via") or ""
        host_port = via.split()[1].split(";")[0]
        peer.send(serialize(response_to(options, 200)), (host_port.split(":")[0], int(host_port.split(":")[1])))
        result = await probe
        assert result.returncode == 0, result.stderr
        [report] = json.loads(result.stdout)  # the /24 range is not pinged
        assert report["target"] == f"sip:127.0.0.5:{peer.port}" and report["status"] == 200
        # Nobody answers on a closed port: exit 1 and say so.
        silent = await asyncio.to_thread(run, d, "trunk", "test", "carrier", "--port", str(SILENT_PORT), "--timeout", "1")
        assert silent.returncode == 1 and "no answer within 1 s" in silent.stdout
    finally:
        peer.close()




def test_inbound_credentials_are_stored_as_digest_hashes_and_a_new_realm_needs_the_password(tmp_path: Path) -> None:
    d = tmp_path / "data"
    ok(d, "trunk", "add", "sbc", "--source", "198.51.100.7", "--username", "sbc", "--password", "-", "--realm", "carrier",
       "--auth-allow-rfc2069", stdin=SECRET + "\n")  # fmt: skip
    shown = json.loads(ok(d, "trunk", "show", "sbc", "--json"))
    assert shown["password"] == "set" and shown["auth_allow_rfc2069"] is True
    assert not any(key.startswith("ha1") for key in shown)  # the hashes are not shown either
    with sqlite3.connect(d / "voiceline.db") as db:
        [(stored,)] = db.execute("SELECT settings FROM trunks WHERE name = 'sbc'").fetchall()
    settings = json.loads(stored)
    assert SECRET not in stored and "password" not in settings
    assert settings["ha1_sha256"] == hashlib.sha256(f"sbc:carrier:{SECRET}".encode()).hexdigest()
    # HA1 covers user and realm: changing either without the password cannot work, and says so.
    assert "--realm needs --password again" in bad(d, "trunk", "update", "sbc", "--realm", "other")
    assert "--username needs --password again" in bad(d, "trunk", "update", "sbc", "--username", "sbc2")
    ok(d, "trunk", "update", "sbc", "--realm", "other", "--password", "-", "--no-auth-allow-rfc2069", stdin=SECRET + "\n")
    shown = json.loads(ok(d, "trunk", "show", "sbc", "--json"))
    assert (shown["realm"], shown["auth_allow_rfc2069"], shown["password"]) == ("other", False, "set")
    ok(d, "trunk", "update", "sbc", "--max-calls", "3")  # other settings need no password
    ok(d, "trunk", "update", "sbc", "--auth-algorithm", "SHA-256")  # dropping MD5 keeps SHA-256's hash
    assert "MD5 needs the password again" in bad(d, "trunk", "update", "sbc", "--auth-algorithm", "MD5")


def test_line_update_enable_and_disable(tmp_path: Path) -> None:
    d = tmp_path / "data"
    ok(d, "line", "add", "general", "--number", "100")
    ok(d, "line", "add", "night", "--number", "300")
    assert "line general updated" in ok(d, "line", "update", "general", "--add-number", "101", "--add-number", "102",
                                        "--max-calls", "8")  # fmt: skip
    ok(d, "line", "update", "general", "--remove-number", "100")
    shown = json.loads(ok(d, "line", "show", "general", "--json"))
    assert (shown["numbers"], shown["max_calls"], shown["enabled"]) == (["101", "102"], 8, True)
    assert "'100' is not one of the numbers" in bad(d, "line", "update", "general", "--remove-number", "100")
    assert "already reaches line 'night'" in bad(d, "line", "update", "general", "--add-number", "300")
    ok(d, "line", "update", "general", "--number", "200")  # replaces the list
    assert json.loads(ok(d, "line", "show", "general", "--json"))["numbers"] == ["200"]

    assert "line night disabled" in ok(d, "line", "disable", "night")
    listed = {row["name"]: row for row in json.loads(ok(d, "line", "list", "--json"))}
    assert listed["night"]["enabled"] is False and listed["general"]["enabled"] is True
    table = ok(d, "line", "list")
    assert next(row.split() for row in table.splitlines() if row.startswith("night"))[:3] == ["night", "database", "no"]
    ok(d, "line", "enable", "night")
    assert json.loads(ok(d, "line", "show", "night", "--json"))["enabled"] is True
    assert "no line named 'nope'" in bad(d, "line", "disable", "nope")
    assert "defined in the config file" in bad(d, "line", "disable", "default")


def test_a_line_s_journey_settings_and_prompts_are_stored_and_checked_at_once(tmp_path: Path) -> None:
    d = tmp_path / "data"
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    with wave.open(str(recordings / "goodbye.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes((np.sin(np.arange(8000) / 3) * 8000).astype("<i2").tobytes())
    ok(d, "line", "add", "night", "--number", "300", "--set", "waiting.max_wait=300", "--set", "keys.report=",
       "--prompts", str(recordings), "--language", "en")  # fmt: skip
    ok(d, "line", "update", "night", "--set", "talking.max_talk=900", "--set", "waiting.max_wait=240",
       "--set", "help.destination=sip:night@crisis.example")  # fmt: skip
    shown = json.loads(ok(d, "line", "show", "night", "--json"))
    assert shown["waiting"] == {"max_wait": 240.0} and shown["talking"] == {"max_talk": 900.0}
    assert shown["help"] == {"destination": "sip:night@crisis.example"}
    assert "destination=sip:night@crisis.example" in ok(d, "line", "list")
    assert shown["keys"] == {"report": ""} and shown["prompts"] == str(recordings) and shown["language"] == "en"
    (recordings / "welcome.wav").write_bytes(b"not a wav file")
    refused = bad(d, "line", "update", "night", "--max-calls", "3")
    assert f"prompt file {recordings / 'welcome.wav'}" in refused
    assert "warn_before must lie between 0 and max_talk" in bad(d, "line", "update", "night", "--prompts", "", "--set", "talking.warn_before=1000")


def test_trunk_sources_and_transports_change_one_at_a_time(tmp_path: Path) -> None:
    d = tmp_path / "data"
    ok(d, "trunk", "add", "carrier", "--source", "192.0.2.1", "--source", "192.0.2.2", "--transport", "udp")
    ok(d, "trunk", "update", "carrier", "--add-source", "198.51.100.0/28", "--remove-source", "192.0.2.1",
       "--add-transport", "tls")  # fmt: skip
    shown = json.loads(ok(d, "trunk", "show", "carrier", "--json"))
    assert shown["sources"] == ["192.0.2.2", "198.51.100.0/28"] and shown["transports"] == ["udp", "tls"]
    ok(d, "trunk", "update", "carrier", "--remove-transport", "udp", "--add-source", "192.0.2.2")  # already there: once
    shown = json.loads(ok(d, "trunk", "show", "carrier", "--json"))
    assert shown["sources"] == ["192.0.2.2", "198.51.100.0/28"] and shown["transports"] == ["tls"]
    assert "'192.0.2.9' is not one of the sources" in bad(d, "trunk", "update", "carrier", "--remove-source", "192.0.2.9")
    assert "not an IP address" in bad(d, "trunk", "update", "carrier", "--add-source", "1.2.3.4/77")


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`voiceline line list | head -1`: the reader goes away early; no traceback."""
    d = tmp_path / "data"
    ok(d, "line", "add", "first", "--number", "1")
    with sqlite3.connect(d / "voiceline.db") as db:  # enough lines to overflow the pipe's buffer
        db.executemany(
            "INSERT INTO lines (name, settings) VALUES (?, ?)",
            ((f"line-{i}", json.dumps({"numbers": [str(10000 + i)], "max_calls": 0})) for i in range(4000)),
        )
    listing = subprocess.Popen(
        [sys.executable, "-m", "voiceline", "line", "list", "--data-dir", str(d)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert listing.stdout is not None and listing.stderr is not None
    assert listing.stdout.readline().startswith(b"NAME")
    listing.stdout.close()
    assert listing.wait(timeout=30) == 0
    assert listing.stderr.read() == b""


async def test_trunk_test_tries_every_source_with_ipv6_in_brackets(tmp_path: Path) -> None:
    v4 = await RawPeer.open("127.0.0.5")
    v6 = await RawPeer.open("::1")
    try:
        d = tmp_path / "data"
        await asyncio.to_thread(ok, d, "trunk", "add", "dual", "--source", "127.0.0.5", "--source", "::1")
        for peer in (v4, v6):
            probe = asyncio.create_task(
                asyncio.to_thread(run, d, "trunk", "test", "dual", "--port", str(peer.port), "--json", "--timeout", "3")
            )
            options = await peer.request("OPTIONS", timeout=15)
            via_host, _, via_port = (options.headers.get("Via") or "").split()[1].split(";")[0].rpartition(":")
            peer.send(serialize(response_to(options, 200)), (via_host.strip("[]"), int(via_port)))
            reports = {r["target"]: r for r in json.loads((await probe).stdout)}
            answered = f"sip:[::1]:{peer.port}" if peer is v6 else f"sip:127.0.0.5:{peer.port}"
            assert reports[answered]["status"] == 200, reports
            assert set(reports) == {f"sip:127.0.0.5:{peer.port}", f"sip:[::1]:{peer.port}"}
        assert options.uri == f"sip:[::1]:{v6.port}"
    finally:
        v4.close()
        v6.close()
