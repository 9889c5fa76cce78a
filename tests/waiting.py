"""Waiting for the service instead of sleeping: the one bounded wait the integration tests share."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable

POLL_SECONDS = 0.005  # short against the service's own timers (20 ms frames, T1 >= 20 ms in tests)


# A pair is bridged once both heard the connect cue and "you're connected" (about 3 s): wait this long.
CONNECTING_SECONDS = 10.0


async def until(condition: Callable[[], object], timeout: float = 3.0) -> None:
    """Let the event loop run until `condition()` is true (awaited first when it returns an
    awaitable, e.g. a storage query); fail the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        outcome = condition()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if loop.time() >= end:
            raise AssertionError(f"the condition did not hold within {timeout:g} s")
        await asyncio.sleep(POLL_SECONDS)
