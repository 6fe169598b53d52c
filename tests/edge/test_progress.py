"""The convert progress display: a redrawn bar on a terminal, start/end lines in a log."""

from __future__ import annotations

import io

import pytest
from dsnode.edge.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_at_each_start_and_end():
    log, out = io.StringIO(), io.StringIO()
    progress = Progress(["load", "validate"], stream=log, out=out)
    with progress.stage("load") as stage:
        stage.note = "2 files"
    progress.skip("validate", "not today")
    progress.result("the report")
    lines = log.getvalue().splitlines()
    assert lines[0] == "[1/2] load     ..."
    assert lines[1].startswith("[1/2] load     done in ") and lines[1].endswith("s (2 files)")
    assert lines[2] == "[2/2] validate skipped (not today)"
    assert "\r" not in log.getvalue() and out.getvalue() == "the report\n"


def test_a_terminal_gets_a_bar_redrawn_in_place_and_failures_are_marked():
    screen = Terminal()
    progress = Progress(["validate"], stream=screen, out=io.StringIO())
    with pytest.raises(RuntimeError):
        with progress.stage("validate", total=4) as stage:
            stage.advance()
            stage.advance()
            raise RuntimeError("boom")
    text = screen.getvalue()
    assert "\r[1/1] validate [############------------] 2/4" in text
    assert text.rstrip("\n").split("\r")[-1].startswith("[1/1] validate failed in ")


def test_quiet_prints_nothing():
    log, out = io.StringIO(), io.StringIO()
    progress = Progress(["load"], stream=log, out=out, enabled=False)
    with progress.stage("load"):
        pass
    progress.result("report")
    assert log.getvalue() == out.getvalue() == ""
