"""Supervised background tasks: an exception is logged with the task's name, the task starts again
after a backoff, and `failing` says so until it does a round of its work."""

from __future__ import annotations

import asyncio

import pytest
from dsnode.tasks import Supervised, log_failure
from structlog.testing import capture_logs

WAIT_S = 10.0  # a hang guard, never a measurement


async def until(predicate) -> None:
    async with asyncio.timeout(WAIT_S):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_a_task_that_raises_is_logged_by_name_and_started_again():
    runs: list[int] = []
    round_done = asyncio.Event()
    task: Supervised

    async def work() -> None:
        runs.append(len(runs))
        if len(runs) <= 2:
            raise RecursionError("maximum recursion depth exceeded")
        task.healthy_run()
        round_done.set()
        await asyncio.Event().wait()  # then runs until stopped

    task = Supervised("test-poller", work, first_backoff_s=0.01, max_backoff_s=0.02)
    with capture_logs() as logs:
        task.start()
        await until(lambda: len(runs) == 2)
        assert task.failing and task.last_error == "RecursionError: maximum recursion depth exceeded"
        await asyncio.wait_for(round_done.wait(), WAIT_S)
        assert not task.failing and task.restarts == 2 and task.running
        await task.stop()
    assert not task.running
    failures = [e for e in logs if e["event"] == "task_failed"]
    assert [(e["task"], e["log_level"], e["restarts"]) for e in failures] == [("test-poller", "error", 0),
                                                                             ("test-poller", "error", 1)]
    assert all(e["exc_info"] for e in failures)


async def test_the_backoff_doubles_up_to_its_cap():
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(delay: float) -> None:
        task = asyncio.current_task()
        if task is not None and task.get_name() == "flaky":  # the supervisor's waits, not this test's
            sleeps.append(delay)
            delay = 0
        await real_sleep(delay)

    async def fail() -> None:
        raise ValueError("bad advert")

    task = Supervised("flaky", fail, first_backoff_s=1.0, max_backoff_s=4.0)
    with capture_logs(), pytest.MonkeyPatch.context() as patch:
        patch.setattr("dsnode.tasks.asyncio.sleep", recorded_sleep)
        task.start()
        await until(lambda: len(sleeps) >= 5)
        await task.stop()
    assert sleeps[:5] == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert task.failing


async def test_a_task_that_returns_is_started_again_too():
    runs: list[int] = []

    async def quits() -> None:
        runs.append(1)

    task = Supervised("quitter", quits, first_backoff_s=0.01, max_backoff_s=0.01)
    with capture_logs() as logs:
        task.start()
        await until(lambda: len(runs) >= 3)
        await task.stop()
    assert any(e["event"] == "task_ended" and e["task"] == "quitter" for e in logs)


async def test_a_one_shot_task_that_fails_is_logged_with_its_name():
    async def reload() -> None:
        raise KeyError("routing")

    with capture_logs() as logs:
        task = asyncio.get_running_loop().create_task(reload(), name="reload")
        task.add_done_callback(log_failure)
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)
    assert [(e["event"], e["task"], e["error"]) for e in logs] == [("task_failed", "reload", "KeyError: 'routing'")]
