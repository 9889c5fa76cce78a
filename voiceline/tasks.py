"""The service's housekeeping loops: each runs for the service's lifetime and starts again after an error."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger("voiceline.tasks")

# A housekeeping loop that failed starts again after this many seconds.
TASK_RESTART_SECONDS = 1.0


async def supervised(name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a housekeeping loop for the service's lifetime: an error is logged (redacted trace) and it starts again."""
    while True:
        try:
            await run()
            return
        except Exception as exc:
            log.error("service.task_failed", task=name, error=type(exc).__name__, exc_info=exc)
            await asyncio.sleep(TASK_RESTART_SECONDS)
