"""What a newcomer meets first: `dsnode --help`, `make demo` stopped with Ctrl-C, the banner's
`dsnode status` command pasted into a shell without the venv on PATH, `dsnode bench load` at a URL
where nothing listens."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.store.conftest import dsnode
from tests.support.models import cache_dir
from tests.support.nodes import free_port


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_describes_the_product_not_the_code():
    from dsnode.cli import build_parser

    text = build_parser().format_help()
    assert "dsnode serves DeepSeek-R1-class models on your LAN" in text
    assert "this file only dispatches" not in text and "environment is read here" not in text


def test_bench_load_says_plainly_that_nothing_answers():
    port = closed_port()
    for extra in ((), ("--model", "m")):
        run = dsnode("bench", "load", "--url", f"http://127.0.0.1:{port}", "--requests", "1", "--quiet", *extra)
        assert run.code == 1
        assert run.stderr.strip() == (f"dsnode bench load: cannot reach http://127.0.0.1:{port} (Connection refused). "
                                      "Is the server running there? (a dsnode node: systemctl status dsnode)")


@pytest.mark.slow
def test_demo_banner_command_works_and_ctrl_c_removes_the_temp_folder(bundled):
    port = free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "dsnode.cli", "demo", "--port", str(port), "--cache-dir", str(cache_dir())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        banner = _read_until(demo, "Press Ctrl-C to stop.", timeout=600)  # as the --once test: busy CI
        work = Path(re.search(r"^  configs  (\S+)$", banner, re.M).group(1))
        status = re.search(r"^  (\S+(?: -m dsnode\.cli)?) status --url (\S+)$", banner, re.M)
        assert status and Path(status.group(1).split()[0]).is_absolute(), banner
        # as pasted into a fresh shell: no venv on PATH
        run = subprocess.run(f"{status.group(1)} status --url {status.group(2)}", shell=True, capture_output=True,
                             text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"]})
        assert run.returncode == 0 and "edge-1" in run.stdout, run.stdout + run.stderr
        assert work.is_dir()
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0, rest
    assert f"removed {work}" in rest
    assert not work.exists()


def _read_until(process: subprocess.Popen[str], marker: str, timeout: float) -> str:
    assert process.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = process.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"no {marker!r} from the demo:\n{seen[-3000:]}")
        seen += line
    return seen
