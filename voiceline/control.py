"""The local control socket: `voiceline status`, `drain`, ... talk to the running service.

A Unix stream socket in the data dir (0700), itself 0600: only the service's
user reaches it. The protocol is JSON lines: the client sends
`{"command": NAME, "args": {...}}`, the service answers one line,
`{"ok": true, "result": {...}}` or `{"ok": false, "error": TEXT}`, and the
client may send the next request on the same connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("voiceline.control")

CONTROL_SOCKET = "control.sock"
MAX_REQUEST = 65536
CLIENT_TIMEOUT = 10.0


class CommandError(Exception):
    """A command that cannot be done as asked; its text goes back to the client."""


CommandHandler = Callable[[str, Mapping[str, Any]], Awaitable[dict[str, Any]]]


def reply_for(result: dict[str, Any] | None, error: str | None) -> dict[str, Any]:
    return {"ok": True, "result": result} if error is None else {"ok": False, "error": error}


async def run_command(handle: CommandHandler, request: Any) -> dict[str, Any]:
    """One request object -> its reply; bad requests and CommandError become errors, never exceptions."""
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        return reply_for(None, "expected {\"command\": NAME, \"args\": {...}}")
    args = request.get("args") or {}
    if not isinstance(args, dict):
        return reply_for(None, "args: expected an object")
    try:
        return reply_for(await handle(request["command"], args), None)
    except CommandError as exc:
        return reply_for(None, str(exc))
    except Exception as exc:  # a failing command is an answer, never a dead connection or loop
        log.error("control.command_failed", command=request["command"][:40], error=type(exc).__name__)
        return reply_for(None, f"failed: {type(exc).__name__}")


class ControlServer:
    def __init__(self, path: Path, handle: CommandHandler) -> None:
        self.path = path
        self._handle = handle
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by a service that did not stop cleanly (our data dir lock: none runs)
        self._server = await asyncio.start_unix_server(self._client, str(self.path), limit=MAX_REQUEST)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                except ValueError:
                    reply = reply_for(None, "not JSON")
                else:
                    reply = await run_command(self._handle, request)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass  # a client that went away or sent an oversized line
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def request(path: Path, command: str, args: Mapping[str, Any] | None = None, timeout: float = CLIENT_TIMEOUT) -> Any:
    """Client side (blocking, for the command line): the command's result, or CommandError.

    OSError when no service listens at `path`.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"command": command, "args": dict(args or {})}).encode() + b"\n")
        with sock.makefile("rb") as answer:
            line = answer.readline(MAX_REQUEST * 16)
    if not line:
        raise CommandError("the service closed the connection")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise CommandError(str(reply.get("error")))
    return reply.get("result")


def format_status(status: Mapping[str, Any]) -> str:
    """`voiceline status` as a table for people."""
    minutes, seconds = divmod(int(status["uptime"]), 60)
    state = "draining (new calls get 503)" if status["draining"] else "taking calls"
    rows = [f"voiceline {status['version']} on {status['node']}, up {minutes // 60}:{minutes % 60:02}:{seconds:02}, {state}"]
    rows.append(f"calls: {status['calls']}")
    rows.append("")
    line_rows: list[tuple[str, ...]] = [("LINE", "OPEN", "WAITING", "TALKING", "WELCOME", "CONNECTING", "ENDING", "PAIRS", "LONGEST WAIT")]
    for name, line in status["lines"].items():
        line_rows.append((
            name, "yes" if line["open"] else "closed", str(line["waiting"]), str(line["talking"]),
            str(line["in_welcome"]), str(line["connecting"]), str(line["ending"]), str(line["pairs"]), f"{line['longest_wait']} s",
        ))  # fmt: skip
    rows += _columns(line_rows)
    rows.append("")
    trunk_rows: list[tuple[str, ...]] = [("TRUNK", "ENABLED", "CALLS", "REGISTRATION")]
    for name, trunk in status["trunks"].items():
        trunk_rows.append((name, "yes" if trunk["enabled"] else "no", str(trunk["calls"]), trunk["registration"] or "-"))
    rows += _columns(trunk_rows)
    rows.append("")
    rows.append("overload: " + ", ".join(f"{key} {value}" for key, value in status["overload"].items()))
    rows.append("sip: " + ", ".join(f"{key} {value}" for key, value in status["sip"].items()))
    mqtt = status.get("mqtt")
    if mqtt is not None:
        rows.append(f"mqtt: {'connected' if mqtt['connected'] else 'disconnected'}, events dropped {mqtt['dropped']}")
    return "\n".join(rows) + "\n"


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
