"""systemd's readiness protocol (sd_notify) over a plain Unix datagram socket.

Under `Type=notify` systemd passes NOTIFY_SOCKET: we send READY=1 once
the service takes calls, STATUS= lines, STOPPING=1 when it stops, and
WATCHDOG=1 every half of WATCHDOG_USEC while the event loop runs (a
stuck loop stops the pings and systemd restarts the service). Without
NOTIFY_SOCKET every call does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import structlog

log = structlog.get_logger("voiceline.sdnotify")


class SystemdNotifier:
    def __init__(self, address: str | None, watchdog_seconds: float | None) -> None:
        self._address = address
        self.watchdog_seconds = watchdog_seconds
        self._watchdog: asyncio.Task[None] | None = None

    @classmethod
    def from_environment(cls) -> SystemdNotifier:
        path = os.environ.get("NOTIFY_SOCKET") or None
        if path is not None and path.startswith("@"):
            path = "\0" + path[1:]  # an abstract socket
        watchdog = None
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec) / 1_000_000
        return cls(path, watchdog)

    def notify(self, *fields: str) -> None:
        if self._address is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # never wait on systemd from the event loop
            try:
                sock.sendto("\n".join(fields).encode(), self._address)
            except OSError as exc:
                log.warning("systemd.notify_failed", error=exc.strerror or type(exc).__name__)

    def ready(self) -> None:
        self.notify("READY=1", "STATUS=taking calls", f"MAINPID={os.getpid()}")
        if self.watchdog_seconds is not None and self._address is not None:
            self._watchdog = asyncio.get_running_loop().create_task(self._ping(self.watchdog_seconds / 2))

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    async def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog

    async def _ping(self, interval: float) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)
