"""The service's housekeeping loops start again after an error, logged with its trace."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from voiceline import tasks


async def test_a_failing_loop_is_logged_and_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "TASK_RESTART_SECONDS", 0.0)
    runs: list[int] = []

    async def loop_failing_twice() -> None:
        runs.append(len(runs))
        if len(runs) <= 2:
            raise RuntimeError("broken row")

    with capture_logs() as logs:
        await tasks.supervised("watch_provisioning", loop_failing_twice)
    assert runs == [0, 1, 2]  # ran until it returned on its own
    failures = [entry for entry in logs if entry["event"] == "service.task_failed"]
    assert [(f["task"], f["error"]) for f in failures] == [("watch_provisioning", "RuntimeError")] * 2
    assert all(isinstance(f["exc_info"], RuntimeError) for f in failures)
