"""Background tasks that must keep running, supervised: an exception is logged with the task's name
and the task is started again after a backoff (doubling from `BACKOFF_FIRST_S` up to
`BACKOFF_MAX_S`, back to the first once a run has lasted `HEALTHY_RUN_S`).

Each `Supervised` is owned by whoever starts it (`start`) and stops it (`stop`: cancel, await); its
`restarts` and `failing` are read by `/metrics` (`dsnode_background_task_restarts_total`,
`dsnode_background_task_failing`), so a task that keeps failing shows, rather than dying in silence.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress
from typing import Awaitable, Callable

import structlog

log = structlog.get_logger("dsnode.tasks")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_RUN_S = 60.0  # a run that lasted this long resets the backoff


class Supervised:
    """`run` (a coroutine function meant to run until cancelled), restarted whenever it raises or
    returns."""

    def __init__(self, name: str, run: Callable[[], Awaitable[None]], first_backoff_s: float = BACKOFF_FIRST_S,
                 max_backoff_s: float = BACKOFF_MAX_S) -> None:
        self.name = name
        self._run = run
        self._first = first_backoff_s
        self._max = max_backoff_s
        self.restarts = 0  # runs that ended in an exception (or returned) and were started again
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._failed_at: float | None = None  # monotonic times: the last failure,
        self._healthy_at: float | None = None  # the last healthy_run(),
        self._run_started: float | None = None  # the start of the current run

    @property
    def failing(self) -> bool:
        """The last run failed, and since then the task has neither said it did a round of its work
        (`healthy_run`) nor run for `HEALTHY_RUN_S`."""
        failed = self._failed_at
        if failed is None or (self._healthy_at is not None and self._healthy_at > failed):
            return False
        started = self._run_started
        lasted = self.running and started is not None and started > failed and \
            time.monotonic() - started >= HEALTHY_RUN_S
        return not lasted

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    async def _supervise(self) -> None:
        delay = self._first
        while True:
            started = self._run_started = time.monotonic()
            try:
                await self._run()
                log.error("task_ended", task=self.name, detail="it should run until stopped; started again",
                          retry_in_s=delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed_at = time.monotonic()
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.error("task_failed", task=self.name, error=self.last_error, restarts=self.restarts,
                          retry_in_s=delay, exc_info=True)
            if time.monotonic() - started >= HEALTHY_RUN_S:
                delay = self._first
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max)
            self.restarts += 1

    def healthy_run(self) -> None:
        """The task says it did a round of its work: it is not failing (whatever happened before)."""
        self._healthy_at = time.monotonic()


def log_failure(task: "asyncio.Task[object]") -> None:
    """A done-callback for a one-shot background task: its exception, logged with its name."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("task_failed", task=task.get_name(), error=f"{type(exc).__name__}: {exc}"[:500],
                  exc_info=exc)
