"""Every RFC 4475 torture message replayed over UDP and TCP against the running server.

Valid requests are answered, invalid ones get 400 (505 for a bad version) or
are dropped, the server keeps running, and a normal call works afterwards.
The messages name hosts that are not ours (example.com, 192.0.2.x): every
INVITE that becomes a call is CANCELled at once, so no BYE ever leaves
loopback; the test checks that no torture call was answered.
"""

from __future__ import annotations

import socket
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from test_sipp import run_sipp, stat
from voiceline.sip.message import Headers, SipParseError, SipRequest, parse_message, serialize
from voiceline.sip.transport import StreamFramer

pytestmark = pytest.mark.interop

TORTURE = Path(__file__).parent / "data" / "torture"
MANIFEST = tomllib.loads((TORTURE / "manifest.toml").read_text())
NAMES = sorted(MANIFEST)
# How long a connection is read for the answers to one message; once a final response to it came,
# how much longer (anything more, such as a second final response, would come at once).
ANSWER_WAIT_SECONDS, AFTER_FINAL_SECONDS = 0.6, 0.2


def cancel_for(data: bytes) -> bytes | None:
    """A CANCEL for a torture INVITE that parses, so the call it may start ends unanswered."""
    try:
        request = parse_message(data)
    except SipParseError:
        return None
    if not isinstance(request, SipRequest) or request.method != "INVITE":
        return None
    headers = Headers([("Via", request.headers.get("Via") or "")])
    for name in ("From", "To", "Call-ID"):
        headers.add(name, request.headers.get(name) or "")
    headers.add("CSeq", (request.headers.get("CSeq") or "").split()[0] + " CANCEL")
    headers.add("Max-Forwards", "70")
    return serialize(SipRequest("CANCEL", request.uri, headers))


def replay_udp(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        for name in NAMES:
            data = (TORTURE / f"{name}.sip").read_bytes()
            sock.sendto(data, ("127.0.0.1", port))
            cancel = cancel_for(data)
            if cancel is not None:
                sock.sendto(cancel, ("127.0.0.1", port))


def replay_tcp_one(port: int, data: bytes) -> tuple[list[int], bool]:
    """Send one message on a fresh connection: the statuses answered, and whether the server closed it."""
    statuses: list[int] = []
    framer = StreamFramer(1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        cancel = cancel_for(data)
        if cancel is not None:
            sock.sendall(cancel)
        sock.settimeout(ANSWER_WAIT_SECONDS)
        closed = False
        try:
            while chunk := sock.recv(65536):
                for message in framer.feed(chunk):
                    status = answer_status(message)
                    if status is not None:
                        statuses.append(status)
                        if status >= 200:
                            sock.settimeout(AFTER_FINAL_SECONDS)
            closed = True
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
    return statuses, closed


def answer_status(message: bytes) -> int | None:
    """The status of a response to the torture message itself (not to our CANCEL).

    A 400 echoes the malformed headers it answers, so it is read leniently."""
    start, _, rest = message.partition(b"\r\n")
    if not start.startswith(b"SIP/2.0 ") or b" CANCEL\r\n" in rest.split(b"\r\n\r\n")[0]:
        return None
    return int(start.split()[1])


def normal_call_works(server: object, tmp_path: Path, *transport: str) -> None:
    tmp_path.mkdir()
    result = run_sipp(server, tmp_path, *transport, "-sn", "uac", "-m", "1", "-d", "200", timeout=20)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert stat(tmp_path, "SuccessfulCall(C)") == 1


def test_torture_messages_over_udp_and_tcp(voiceline_server: Callable[..., object], tmp_path: Path) -> None:
    server = voiceline_server({"sip": {"answer_delay": 1.5}})
    ports = server.ports  # type: ignore[attr-defined]
    # TCP first: the UDP copies carry the same branches, so they would match the TCP transactions
    # as retransmissions (RFC 3261 17.2.3 matches by branch and sent-by, whatever the transport).
    outcomes = {name: replay_tcp_one(ports["tcp"], (TORTURE / f"{name}.sip").read_bytes()) for name in NAMES}
    replay_udp(ports["udp"])
    problems = []
    for name, (statuses, closed) in outcomes.items():
        expected = MANIFEST[name]["parse"]
        first_line = (TORTURE / f"{name}.sip").read_bytes().split(b"\r\n", 1)[0]
        is_response = first_line.startswith(b"SIP/")
        if expected == "error" and set(statuses) - {400}:
            problems.append(f"{name}: invalid but answered {statuses}")
        elif expected == "version" and set(statuses) - {505}:
            problems.append(f"{name}: bad version but answered {statuses}")
        elif expected == "ok" and not is_response and not statuses:
            problems.append(f"{name}: valid request not answered (closed={closed})")
        elif expected == "ok" and is_response and statuses:
            problems.append(f"{name}: a stray response was answered {statuses}")
        elif any(status >= 500 for status in statuses if expected == "ok"):
            problems.append(f"{name}: server error {statuses}")
    assert not problems, "\n".join(problems) + f"\nall outcomes: {outcomes}"
    assert server.process.poll() is None  # type: ignore[attr-defined]
    normal_call_works(server, tmp_path / "udp")
    normal_call_works(server, tmp_path / "tcp", "-t", "t1")
    events = server.log_events()  # type: ignore[attr-defined]
    assert not [e for e in events if e["event"] in ("sip.internal_error", "sip.task_failed")]
    # Exactly the two normal calls were answered: every torture call was cancelled while ringing.
    assert [e["event"] for e in events].count("call.answered") == 2
