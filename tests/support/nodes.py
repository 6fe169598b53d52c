"""Real `dsnode serve` processes on loopback ports, for end-to-end tests."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dsnode.processes import stop_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port P with P + 1 free too (`dsnode demo --port P` listens on both)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


@dataclass
class ServeProcess:
    """One `dsnode serve --config FILE` child process; its output goes to `log_path`."""

    name: str
    config_path: Path
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServeProcess":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **self.env}
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dsnode.cli", "serve", "--config", str(self.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 120.0) -> "ServeProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None:
            return None
        code = stop_process(self.process, grace_s=timeout)
        self._log.close()
        return code

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def complete_log_lines(self) -> list[str]:
        """The log's lines the node has finished writing: a line still being written (no newline yet)
        is left for the next read, so a test polling the log never parses half an event."""
        return self.log_text().split("\n")[:-1]

    def log_events(self, *names: str) -> list[dict]:
        """The node's JSON log lines, parsed: those whose event is one of `names`, or all of them."""
        events = [json.loads(line) for line in self.complete_log_lines() if line.startswith("{")]
        return [e for e in events if not names or e.get("event") in names]

    def request_records(self, *waiting_for: str, timeout: float = 30) -> dict[str, dict]:
        """The node's `request` log events, by request id. A node logs a request once its answer is
        sent, so a client can read its answer before the record is written: the records of the
        request ids in `waiting_for` are waited for (AssertionError naming them after `timeout`)."""
        records: dict[str, dict] = {}

        def complete() -> bool:
            records.clear()
            records.update((record["request_id"], record) for record in self.log_events("request"))
            return all(request_id in records for request_id in waiting_for)

        wait_until(complete, f"{self.name}: request records {list(waiting_for)}", timeout)
        return records

    def get_json(self, path: str) -> dict:
        """GET `path` of this node (plain HTTP, no credentials); its JSON answer."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())

    def wait_peers_healthy(self, timeout: float) -> None:
        """Until this node's /cluster lists its peers and every one is healthy."""
        def healthy() -> bool:
            peers = self.get_json("/cluster")["peers"]
            return bool(peers) and all(p["healthy"] for p in peers)

        wait_until(healthy, f"{self.name} to see its peers healthy", timeout)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


@contextmanager
def running_cluster(centrals: list[ServeProcess], edge: ServeProcess, wait_s: float) -> Iterator[list[int]]:
    """Starts the nodes, waits until each is ready and the edge sees every peer healthy, and yields a
    list that holds, after the block, each node's exit code (centrals first, in order). The edge is
    stopped first, so no central's exit is an upstream failure to it."""
    nodes = [*centrals, edge]
    codes: list[int] = []
    for node in nodes:
        node.start()
    try:
        for node in nodes:
            node.wait_ready(timeout=180)
        edge.wait_peers_healthy(wait_s)
        yield codes
    finally:
        edge_code = edge.stop()
        codes.extend([central.stop() for central in centrals] + [edge_code])


def wait_until(check: Callable[[], object], what: str, timeout: float) -> None:
    """Poll `check` until it is true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def node_toml(
    name: str,
    role: str,
    port: int,
    model_name: str,
    model_path: Path,
    backend: str,
    extra: str = "",
    model_extra: str = "",
) -> str:
    """A node's config: `model_extra` (lines ending in a newline) goes into [model], `extra` after the
    sections."""
    return f"""[node]
name = "{name}"
role = "{role}"
listen = "127.0.0.1:{port}"
drain_timeout = 10

[model]
name = "{model_name}"
path = "{model_path}"
backend = "{backend}"
threads = 1
{model_extra}
[logging]
format = "json"
level = "info"
{extra}
"""
