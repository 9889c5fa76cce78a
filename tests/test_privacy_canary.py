"""Calls from a canary number leave no trace of it anywhere the service writes.

The server runs at debug log level so every log line it can write is covered.
Afterwards every byte of its log, database (with WAL) and data dir is searched
for the number in several spellings and for their common hashes, and so is
what it told the world: every MQTT message on a real broker (subscribed to
`#`), the metrics endpoint and `voiceline status` (table and JSON).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker import Broker, Recorder, free_port
from test_end_to_end import CONNECTED_AFTER
from test_safety_interop import HelpLine, ShortHelpPrompts, help_line, short_help  # noqa: F401 (fixtures)
from voiceline.keyfile import KEY_FILE_NAME
from voiceline.sim.runner import CallReport, CallSpec
from voiceline.sip.identity import PSEUDONYM_BYTES
from voiceline.sip.auth import digest_response, parse_digest

pytestmark = pytest.mark.interop

CANARY = "+15550001234"
SCENARIOS = Path(__file__).parent / "sipp"


def canary_forms() -> list[bytes]:
    spellings = [CANARY, CANARY[1:], CANARY[2:], "555-000-1234", f"sip:{CANARY}@127.0.0.1", f"tel:{CANARY}"]
    forms = [s.encode() for s in spellings]
    for spelling in spellings:
        for algorithm in ("md5", "sha1", "sha256", "sha512"):
            forms.append(hashlib.new(algorithm, spelling.encode()).hexdigest().encode())
        forms.append(base64.b64encode(spelling.encode()).rstrip(b"="))
    return forms


def written_files(*roots: Path) -> list[Path]:
    return [path for root in roots for path in root.rglob("*") if path.is_file()]


def send_raw(server: object, text: str, source: str = "127.0.0.1") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        port = sock.getsockname()[1]
        sock.sendto(text.replace("PORT", str(port)).encode(), (server.host, server.port))  # type: ignore[attr-defined]


def send_raw_tcp(server: object, text: str, source: str = "127.0.0.1") -> None:
    """One message on its own TCP connection; the server's answer (or close) is read and dropped."""
    address = (server.host, server.ports["tcp"])  # type: ignore[attr-defined]
    with socket.create_connection(address, timeout=2, source_address=(source, 0)) as sock:
        port = sock.getsockname()[1]
        sock.sendall(text.replace("PORT", str(port)).replace("SIP/2.0/UDP", "SIP/2.0/TCP").encode())
        try:
            sock.recv(65535)
        except TimeoutError:
            pass


def bad_requests() -> list[str]:
    """Requests that take error paths (400, 405, 481, 488, 505) while carrying the canary."""
    head = (
        "Via: SIP/2.0/UDP 127.0.0.1:PORT;branch=z9hG4bK{n}\r\n"
        f'From: "{CANARY}" <sip:{CANARY}@127.0.0.1>;tag=c{{n}}\r\n'
        "To: <sip:line@127.0.0.1>{to_tag}\r\n"
        "Call-ID: canary-{n}\r\n"
        f"Contact: <sip:{CANARY}@127.0.0.1:PORT>\r\n"
        f"P-Asserted-Identity: <sip:{CANARY}@127.0.0.1>\r\n"
    )
    sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 18\r\n"
    return [
        f"INVITE sip:line@127.0.0.1 SIP/2.0\r\n{head.format(n=1, to_tag='')}CSeq: {CANARY} INVITE\r\n\r\n",
        f"REGISTER sip:127.0.0.1 SIP/2.0\r\n{head.format(n=2, to_tag='')}CSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n",
        f"BYE sip:{CANARY}@127.0.0.1 SIP/2.0\r\n{head.format(n=3, to_tag=';tag=x')}CSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        f"INVITE sip:{CANARY}@127.0.0.1 SIP/2.0\r\n{head.format(n=4, to_tag='')}CSeq: 1 INVITE\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}",
        f"INVITE sip:line@127.0.0.1 SIP/2.0\r\n{head.format(n=5, to_tag='')}CSeq: 1 INVITE\r\n"
        "Content-Type: application/sdp\r\nContent-Length: 9999\r\n\r\nv=0",
        f"OPTIONS sip:{CANARY}@127.0.0.1 SIP/3.0\r\n{head.format(n=6, to_tag='')}CSeq: 1 OPTIONS\r\n\r\n",
        # A forged in-dialog request (no such dialog: 481) and an INVITE whose Contact is unusable (400).
        f"INFO sip:{CANARY}@127.0.0.1 SIP/2.0\r\n{head.format(n=7, to_tag=';tag=forged')}CSeq: 9 INFO\r\n"
        "Content-Type: application/dtmf-relay\r\nContent-Length: 10\r\n\r\nSignal=#\r\n",
        f"INVITE sip:line@127.0.0.1 SIP/2.0\r\n{head.format(n=8, to_tag='')}".replace(
            f"Contact: <sip:{CANARY}@127.0.0.1:PORT>", f"Contact: <sip:a@{CANARY}@127.0.0.1:PORT>"
        )
        + "CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
    ]


def digest_answers(server: object, source: str) -> None:
    """From a digest trunk's address: a wrong answer signed as the canary, then the same answer again
    (a replay) and an RFC 2069 answer without qop: each refused, each carrying the canary."""
    invite = bad_requests()[0].replace(f"CSeq: {CANARY} INVITE", "CSeq: 1 INVITE").replace("canary-1", "canary-digest")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(3)
        port = sock.getsockname()[1]
        destination = (server.host, server.port)  # type: ignore[attr-defined]
        text = invite.replace("PORT", str(port))
        sock.sendto(text.encode(), destination)
        challenge = next(
            line.split(":", 1)[1].strip()
            for line in sock.recv(65535).decode().split("\r\n")
            if line.lower().startswith("www-authenticate:")
        )
        nonce = parse_digest(challenge)["nonce"]
        uri = "sip:line@127.0.0.1"
        signed = digest_response("MD5", CANARY, "voiceline", "wrong", "INVITE", uri, nonce, "00000001", "c1", "auth")
        answers = [
            f'Digest username="{CANARY}", realm="voiceline", nonce="{nonce}", uri="{uri}", algorithm=MD5, '
            f'response="{signed}", qop=auth, nc=00000001, cnonce="c1"',
        ] * 2
        answers.append(
            f'Digest username="{CANARY}", realm="voiceline", nonce="{nonce}", uri="{uri}", algorithm=MD5, '
            f'response="{digest_response("MD5", CANARY, "voiceline", "pw", "INVITE", uri, nonce)}"'
        )
        for n, answer in enumerate(answers):
            again = text.replace("branch=z9hG4bK1", f"branch=z9hG4bKd{n}").replace("CSeq: 1 ", f"CSeq: {n + 2} ")
            sock.sendto(again.replace("CSeq:", f"Authorization: {answer}\r\nCSeq:", 1).encode(), destination)
            status = int(sock.recv(65535).split(b" ", 2)[1])
            assert status in (401, 403), status  # refused: challenged again or forbidden, never a call


def test_canary_number_is_written_nowhere(
    voiceline_server: Callable[..., object], sim_calls: Callable[..., list[CallReport]], tmp_path: Path,
    broker: Broker,
) -> None:
    recorder = Recorder(broker.port)
    metrics_port = free_port()
    server = voiceline_server(
        {
            "sip": {"answer_delay": 0.1},
            "log": {"level": "debug"},
            "mqtt": {"enabled": True, "port": broker.port, "gauge_interval": 1.0},
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
            # 127.0.0.1 calls freely; 127.0.0.2 must authenticate (401 path); others are unknown (403 path).
            "trunks": [
                {"name": "local", "sources": ["127.0.0.1"], "transports": ["udp", "tcp"], "srtp": "optional"},
                {"name": "sbc", "sources": ["127.0.0.2"], "username": "sbc", "password": "pw"},
            ],
        }
    )
    target = f"sip:{CANARY}@{server.host}:{server.port}"  # type: ignore[attr-defined]

    for text in bad_requests():
        send_raw(server, text)
        send_raw_tcp(server, text)  # stream framing errors, and the same error paths over TCP
    for source in ("127.0.0.2", "127.0.0.9"):  # challenged, refused as unknown
        for text in bad_requests()[:4]:  # new Call-IDs: else they would be merged requests (482)
            send_raw(server, text.replace("Call-ID: canary-", f"Call-ID: canary-{source}-"), source)
    send_raw_tcp(server, bad_requests()[1], source="127.0.0.2")  # the digest trunk is UDP only: 403
    digest_answers(server, "127.0.0.2")

    # A SIPp call with the canary in From, Contact, P-Asserted-Identity, Remote-Party-ID and SDP.
    injection = tmp_path / "canary.csv"
    injection.write_text(f"SEQUENTIAL\n{CANARY};\n")
    sipp = subprocess.run(
        [
            "sipp", f"{server.host}:{server.port}",  # type: ignore[attr-defined]
            *("-i", "127.0.0.1", "-p", "0", "-mi", "127.0.0.1", "-mp", "0", "-s", CANARY),
            *("-sf", str(SCENARIOS / "uac_identity.xml"), "-inf", str(injection), "-m", "1"),
            *("-nostdin", "-timeout", "20s", "-timeout_error"),
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )
    assert sipp.returncode == 0, sipp.stdout[-2000:]

    ended_before = sum(event.get("event") == "call.ended" for event in server.log_events())  # type: ignore[attr-defined]
    talk = CONNECTED_AFTER  # they talk once both heard the connect prompts
    # Two pjsua2 callers from the canary number, paired with each other: one over UDP holds and
    # resumes (re-INVITEs carry the identity again, into the dialog's target refresh), one over TCP
    # with SRTP (keys in its SDP, ours in the answer). The second spells it without the "+": another
    # caller to the safety ledger (one caller is never paired with itself).
    reports = sim_calls(
        [
            CallSpec(target, from_user=CANARY, tone_hz=697.0, seconds=talk + 2.5, hold=(talk + 0.8, talk + 1.6)),
            CallSpec(
                f"{target};transport=tcp",
                from_user=CANARY[1:],
                tone_hz=1209.0,
                seconds=talk + 2.5,
                start_after=0.3,
                transport="tcp",
                srtp=True,
            ),
        ]
    )
    assert all(r.connected for r in reports), reports

    server.wait_for_event("call.ended", count=ended_before + 2)  # type: ignore[attr-defined]
    told: dict[str, bytes] = {}  # what the service said to the world, by channel
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
        told["metrics"] = answer.read()
    for form in ([], ["--json"]):
        status = subprocess.run(
            [sys.executable, "-m", "voiceline", "status", *form, "--data-dir", str(server.data_dir)],  # type: ignore[attr-defined]
            capture_output=True, timeout=30,
        )  # fmt: skip
        assert status.returncode == 0 and b"local" in status.stdout
        told[f"status {form}"] = status.stdout
    recorder.wait_for(lambda ms: sum(m.topic.endswith("/events/call.ended") for m in ms) >= 3)
    assert server.stop() == 0  # type: ignore[attr-defined]
    recorder.wait_for(lambda ms: any(m.json().get("event") == "node.offline" for m in ms if m.topic.endswith("/status")))
    recorder.close()
    told["mqtt"] = b"\n".join(m.topic.encode() + b" " + m.payload for m in recorder.messages)
    assert b"call.answered" in told["mqtt"] and b"line.paired" in told["mqtt"]
    assert b"voiceline_calls_answered_total" in told["metrics"]
    events = [e["event"] for e in server.log_events()]  # type: ignore[attr-defined]
    assert events.count("call.confirmed") == 3 and "pairing.talking" in events and "pairing.held" in events
    assert "sip.request" in events  # debug lines were written, and are searched too
    assert "sip.unknown_source" in events  # the 403 path ran
    assert "trunk.wrong_transport" in events and "trunk.auth_failed" in events  # and the new refusal paths
    stats = [e for e in server.log_events() if e["event"] == "call.media_stats"]  # type: ignore[attr-defined]
    assert any(e["srtp_suite"] for e in stats)  # an SRTP call was among them

    files = written_files(server.data_dir, server.log_path.parent)  # type: ignore[attr-defined]
    assert any(f.name == "voiceline.db" for f in files) and server.log_path in files  # type: ignore[attr-defined]
    forms = canary_forms()
    for path in files:
        if path.suffix == ".toml":
            continue  # the test's own config file
        content = path.read_bytes().lower()
        leaked = [form.decode() for form in forms if form.lower() in content]
        assert not leaked, f"{path.name} holds the canary as {leaked}"
    for channel, content in told.items():
        leaked = [form.decode() for form in forms if form.lower() in content.lower()]
        assert not leaked, f"{channel} holds the canary as {leaked}"


def keyed_forms(keys: list[bytes]) -> list[bytes]:
    """HMAC-SHA256 of every spelling of the canary under every key the test can see, whole and cut to
    a pseudonym's length (sip.identity.PSEUDONYM_BYTES)."""
    spellings = [CANARY, CANARY[1:], f"sip:{CANARY}@127.0.0.1"]
    forms = []
    for key in keys:
        for spelling in spellings:
            digest = hmac.new(key, spelling.encode(), hashlib.sha256).hexdigest()
            forms += [digest.encode(), digest[: 2 * PSEUDONYM_BYTES].encode()]
    return forms


def test_canary_number_is_written_nowhere_by_help_calls_reports_and_cooldowns(
    voiceline_server: Callable[..., Any],
    sim_calls: Callable[..., list[CallReport]],
    help_line: Callable[..., HelpLine],
    short_help: ShortHelpPrompts,
) -> None:
    line = help_line()
    server = voiceline_server(
        {
            "sip": {"answer_delay": 0.1},
            "log": {"level": "debug"},
            "welcome": {"enabled": False, "offer_choice": False},
            "safety": {"report_threshold": 1},
            # The help line may learn the caller's number (P-Asserted-Identity): we still write it nowhere.
            "help": {"destination": line.uri, "pass_identity": True},
            "lines": [{"name": "default", "numbers": ["*"], "prompts": str(short_help.recordings)}],
        }
    )
    target = f"sip:100@{server.host}:{server.port}"
    report = CONNECTED_AFTER + 1.0  # the partner reports the canary: held apart at once (threshold 1) ...
    help_at = report + 3.0  # ... and the canary asks for help from the cooldown
    canary, partner = sim_calls(
        [
            CallSpec(target, from_user=CANARY, tone_hz=697.0, seconds=help_at + short_help.seconds + 3.0, dtmf_at=((help_at, "0"),)),
            CallSpec(target, from_user="+15550009999", tone_hz=1209.0, seconds=report + 2.0, start_after=0.3,
                     dtmf_at=((report, "*"),)),
        ]
    )  # fmt: skip
    assert canary.connected and partner.connected, (canary, partner)
    assert line.finished() == "ended"
    (again,) = sim_calls([CallSpec(target, from_user=CANARY, tone_hz=697.0, seconds=3.0)])  # still held apart
    assert again.connected
    assert server.stop() == 0
    events = server.log_events()
    names = [event["event"] for event in events]
    assert "help.connected" in names and "help.ended" in names, names
    assert not [event for event in events if any("pseudonym" in key for key in event)]
    files = [path for path in written_files(server.data_dir, server.log_path.parent) if path.suffix != ".toml"]
    assert server.log_path in files and any(path.name == "voiceline.db" for path in files)
    keys = [path.read_bytes() for path in files if path.name == KEY_FILE_NAME]
    keys += [base64.b64decode(key, validate=False) for key in keys] + [key.strip() for key in keys]
    forms = canary_forms() + keyed_forms(keys)
    for path in files:
        content = path.read_bytes().lower()
        leaked = [form.decode() for form in forms if form.lower() in content]
        assert not leaked, f"{path.name} holds the canary as {leaked}"
