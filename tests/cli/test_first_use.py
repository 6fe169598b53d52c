"""What a newcomer meets first: `dsnode --help`, `make demo` stopped with Ctrl-C (or `kill`, a closed
terminal, SIGKILL: its nodes never outlive it), the banner's `dsnode status` command pasted into a shell
without the venv on PATH, `dsnode bench load` at a URL where nothing listens."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.store.conftest import dsnode
from tests.support.models import cache_dir
from tests.support.nodes import free_port_pair


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
    port = free_port_pair()
    demo = subprocess.Popen(
        [sys.executable, "-m", "dsnode.cli", "demo", "--port", str(port), "--cache-dir", str(cache_dir())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    output = Output(demo)
    try:
        banner = output.until("Press Ctrl-C to stop.", timeout=600)  # as the --once test: busy CI
        work = Path(re.search(r"^  configs  (\S+)$", banner, re.M).group(1))
        status = re.search(r"^  (\S+(?: -m dsnode\.cli)?) status --url (\S+)$", banner, re.M)
        assert status and Path(status.group(1).split()[0]).is_absolute(), banner
        # as pasted into a fresh shell: no venv on PATH
        run = subprocess.run(f"{status.group(1)} status --url {status.group(2)}", shell=True, capture_output=True,
                             text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"]})
        assert run.returncode == 0 and "edge-1" in run.stdout, run.stdout + run.stderr
        responses = re.search(r"^  (curl -s \S+/v1/responses .*\\\n    -d '.*')$", banner, re.M)
        assert responses, banner
        run = subprocess.run(responses.group(1), shell=True, capture_output=True, text=True, timeout=120)
        answer = json.loads(run.stdout)
        assert answer["object"] == "response" and [i["type"] for i in answer["output"]][0] == "reasoning", answer
        assert work.is_dir()
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    rest = output.until(f"removed {work}", timeout=10)
    assert demo.returncode == 0, rest
    assert not work.exists()


@pytest.mark.slow
@pytest.mark.parametrize(("stopping", "once"), [(signal.SIGTERM, False), (signal.SIGHUP, False),
                                               (signal.SIGKILL, False), (signal.SIGTERM, True)],
                         ids=["SIGTERM", "SIGHUP", "SIGKILL", "SIGTERM-once"])
def test_a_demo_stopped_while_its_nodes_start_leaves_no_node_running(bundled, tmp_path, stopping, once):
    demo = subprocess.Popen(
        [sys.executable, "-m", "dsnode.cli", "demo", "--port", str(free_port_pair()), "--cache-dir", str(cache_dir()),
         *(["--once"] if once else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)})
    nodes: list[psutil.Process] = []
    try:
        nodes = children_once_started(demo, count=2, timeout=300)
        demo.send_signal(stopping)
        code = demo.wait(timeout=120)
        _, alive = psutil.wait_procs(nodes, timeout=120)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        demo.kill()
        for node in nodes:  # a failed run leaves nothing behind either
            with contextlib.suppress(psutil.NoSuchProcess):
                node.kill()
    if stopping == signal.SIGKILL:
        assert code == -signal.SIGKILL  # nothing of the demo ran: its nodes went by themselves
    else:  # cleaned up as after Ctrl-C; `--once` says its check did not run
        assert code == (130 if once else 0) and not list(tmp_path.glob("dsnode-demo-*"))


def children_once_started(process: subprocess.Popen[bytes], count: int, timeout: float) -> list[psutil.Process]:
    """The `dsnode serve` children of `process`, once it has started `count` of them (not yet ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = [c for c in psutil.Process(process.pid).children() if "serve" in c.cmdline()]
        if len(children) == count:
            return children
        assert process.poll() is None, f"the demo exited with {process.returncode}"
        time.sleep(0.05)
    raise AssertionError(f"no {count} nodes started in {timeout:.0f}s")


class Output:
    """A child's output, read by a thread (select() on a buffered pipe can miss lines already in the
    reader's buffer)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process, self.text, self._lines = process, "", queue.Queue()  # type: queue.Queue[str]
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)

    def until(self, marker: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.text:
            try:
                self.text += self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {marker!r} in {timeout:.0f}s (exit code {self.process.poll()}):\n"
                                     f"{self.text[-3000:]}") from None
        return self.text
