"""rtpengine's ng control protocol, as the bench drives its peer relay: bencoded dictionaries over
UDP, each datagram prefixed by a cookie that the reply repeats.

`bencode`/`bdecode` are sans-I/O; `NgClient` is a blocking request/reply client for setting up
calls (set-up is not what the bench measures).
"""

from __future__ import annotations

import secrets
import socket
from typing import Union

BValue = Union[int, bytes, str, list["BValue"], dict[str, "BValue"]]

REPLY_TIMEOUT_SECONDS = 1.0
ATTEMPTS = 3


class NgError(Exception):
    """rtpengine refused a command, or its reply was not understood."""


def bencode(value: BValue) -> bytes:
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list):
        return b"l" + b"".join(bencode(item) for item in value) + b"e"
    return b"d" + b"".join(bencode(key) + bencode(value[key]) for key in sorted(value)) + b"e"


def bdecode(data: bytes) -> BValue:
    """A bencoded value; strings come back as str (ng's are text). Raises NgError when malformed."""
    try:
        value, end = _decode(data, 0)
    except (ValueError, IndexError) as error:
        raise NgError("malformed bencode") from error
    if end != len(data):
        raise NgError("trailing bytes after bencode")
    return value


def _decode(data: bytes, at: int) -> tuple[BValue, int]:
    kind = data[at : at + 1]
    if kind == b"i":
        end = data.index(b"e", at)
        return int(data[at + 1 : end]), end + 1
    if kind == b"l":
        items: list[BValue] = []
        at += 1
        while data[at : at + 1] != b"e":
            item, at = _decode(data, at)
            items.append(item)
        return items, at + 1
    if kind == b"d":
        entries: dict[str, BValue] = {}
        at += 1
        while data[at : at + 1] != b"e":
            key, at = _decode(data, at)
            entries[str(key)], at = _decode(data, at)
        return entries, at + 1
    colon = data.index(b":", at)
    start = colon + 1
    end = start + int(data[at:colon])
    if end > len(data):
        raise ValueError("string runs past the end")
    return data[start:end].decode(errors="replace"), end


class NgClient:
    """Commands to one rtpengine's ng port; each waits for its reply (retried on loss)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self._address = address
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.settimeout(REPLY_TIMEOUT_SECONDS)

    def close(self) -> None:
        self._socket.close()

    def command(self, name: str, **arguments: BValue) -> dict[str, BValue]:
        """Send `name` with `arguments` (underscores in names become dashes); the reply, whose result is ok."""
        cookie = secrets.token_hex(6).encode()
        request = {key.replace("_", "-"): value for key, value in arguments.items()}
        request["command"] = name
        datagram = cookie + b" " + bencode(request)
        for _ in range(ATTEMPTS):
            self._socket.sendto(datagram, self._address)
            try:
                while True:
                    reply = self._socket.recv(65535)
                    if reply.startswith(cookie + b" "):
                        break
            except TimeoutError:
                continue
            decoded = bdecode(reply[len(cookie) + 1 :])
            if not isinstance(decoded, dict) or decoded.get("result") not in ("ok", "pong"):
                reason = decoded.get("error-reason") if isinstance(decoded, dict) else None
                raise NgError(f"rtpengine refused {name}: {reason!r}")
            return decoded
        raise NgError(f"rtpengine did not answer {name}")
