"""stop_process: SIGTERM first, SIGKILL only after the grace period."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from dsnode.processes import stop_process

IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
EXITS_3_ON_SIGTERM = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(3)); "
                      "print('ready', flush=True); time.sleep(60)")


def started(code: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"  # its handler is installed
    return process


def test_a_process_that_handles_sigterm_exits_with_its_own_code():
    assert stop_process(started(EXITS_3_ON_SIGTERM), grace_s=30) == 3


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period():
    process = started(IGNORES_SIGTERM)
    start = time.monotonic()
    assert stop_process(process, grace_s=0.5) == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - start < 10


def test_a_process_already_gone_keeps_its_exit_code():
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    process.wait()
    assert stop_process(process, grace_s=1) == 7
