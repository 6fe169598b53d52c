"""Child processes a command starts and owns (the demo's nodes): stopped as systemd stops a unit
(SIGTERM, a grace period, then SIGKILL), and never left running when their parent dies."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def stop_process(process: subprocess.Popen[bytes], grace_s: float) -> int:
    """SIGTERM (if still running), wait up to `grace_s`, SIGKILL if it did not exit; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def sigterm_when_parent_dies() -> Callable[[], None] | None:
    """A `preexec_fn` for Popen: on Linux the child gets SIGTERM when this process dies, however it dies
    (SIGKILL, a closed terminal's SIGHUP), so its children never outlive it; None elsewhere. Call it in
    the thread that starts the child and that lives as long as the child should (the kernel watches the
    thread)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child
