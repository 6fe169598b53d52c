"""A small per-stage progress display on stderr for `dsnode convert`.

On a terminal each stage is one line redrawn in place (a bar when the stage knows its total); in a log
(not a TTY) each stage prints one line when it starts and one when it ends, so journald stays readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

BAR_WIDTH = 24


class Stage:
    def __init__(self, progress: Progress, index: int, name: str, total: int | None) -> None:
        self._progress, self.index, self.name, self.total = progress, index, name, total
        self.done = 0
        self.note = ""
        self.started = time.monotonic()

    def advance(self, steps: int = 1, note: str = "") -> None:
        self.done += steps
        self.note = note or self.note
        self._progress.draw(self)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Progress:
    def __init__(self, stages: Sequence[str], stream: TextIO | None = None, enabled: bool = True,
                 out: TextIO | None = None) -> None:
        self.stages = list(stages)
        self.stream = stream or sys.stderr  # the progress lines
        self.out = out or sys.stdout  # results (the validation report)
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self._width = max(len(s) for s in self.stages)

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Stage]:
        stage = Stage(self, self.stages.index(name) + 1, name, total)
        if self.enabled and not self.live:
            self._write(f"{self._label(stage)} ...\n")
        self.draw(stage)
        try:
            yield stage
        except BaseException:
            self._end(stage, "failed")
            raise
        self._end(stage, "done")

    def skip(self, name: str, why: str) -> None:
        stage = Stage(self, self.stages.index(name) + 1, name, None)
        self._write(f"{self._label(stage)} skipped ({why})\n")

    def result(self, text: str) -> None:
        if self.enabled:
            self.out.write(text.rstrip("\n") + "\n")
            self.out.flush()

    def draw(self, stage: Stage) -> None:
        if not self.live:
            return
        if stage.total:
            filled = min(BAR_WIDTH, BAR_WIDTH * stage.done // stage.total)
            bar = f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {stage.done}/{stage.total}"
        else:
            bar = "..."
        self._write(f"\r{self._label(stage)} {bar} {stage.elapsed():5.1f}s {stage.note}\x1b[K")

    def _end(self, stage: Stage, outcome: str) -> None:
        note = f" ({stage.note})" if stage.note else ""
        line = f"{self._label(stage)} {outcome} in {stage.elapsed():.1f}s{note}"
        self._write(f"\r{line}\x1b[K\n" if self.live else f"{line}\n")

    def _label(self, stage: Stage) -> str:
        return f"[{stage.index}/{len(self.stages)}] {stage.name:<{self._width}}"

    def _write(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text)
            self.stream.flush()
