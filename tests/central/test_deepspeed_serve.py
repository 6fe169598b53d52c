"""`dsnode serve` with `backend = "deepspeed"`, tensor parallel 2: one service, three processes. A
follower rank killed mid-stream ends the stream with an error event and the daemon exits 1 (systemd's
Restart=on-failure then starts it again), leaving no rank behind."""

from __future__ import annotations

import json
import urllib.request

import psutil
import pytest

from tests.support.nodes import ServeProcess, free_port, node_toml

pytestmark = pytest.mark.slow

MODEL = "deepseek-r1-tiny"


def post(url: str, body: dict, timeout: float = 60.0):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout)


def test_killed_rank_ends_the_stream_with_an_error_and_the_daemon_exits_1(tmp_path, moe_dir):
    port = free_port()
    config = tmp_path / "dsnode.toml"
    extra = "tensor_parallel = 2\ndevice = \"cpu\"\n"
    text = node_toml("central-ds", "central", port, MODEL, moe_dir, "deepspeed").replace("threads = 1\n", "threads = 1\n" + extra)
    config.write_text(text)
    node = ServeProcess("central-ds", config, port, tmp_path / "serve.log").start()
    try:
        node.wait_ready(timeout=180)
        with post(node.url + "/v1/completions", {"model": MODEL, "prompt": "It was the best", "max_tokens": 8,
                                                 "temperature": 0}) as response:
            answer = json.load(response)
            assert response.headers["X-DSNode-Node"] == "central-ds"
        assert answer["choices"][0]["text"].startswith(" of times")
        ranks = [p for p in psutil.Process(node.process.pid).children() if "dsnode.central.tp_worker" in p.cmdline()]
        assert len(ranks) == 2
        follower = next(p for p in ranks if p.environ().get("RANK") == "1")

        with post(node.url + "/v1/completions", {"model": MODEL, "prompt": "It was the best", "max_tokens": 1500,
                                                 "temperature": 0, "ignore_eos": True, "stream": True}) as stream:
            assert stream.readline().startswith(b"data: ")  # tokens are flowing
            follower.kill()
            rest = stream.read().decode()
        assert '"error"' in rest and "rank 1" in rest and rest.rstrip().endswith("data: [DONE]")

        assert node.process.wait(timeout=60) == 1
        log = node.log_text()
        assert "engine_died" in log and "was killed by SIGKILL" in log and "engine_failed" in log
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    finally:
        node.kill()
        node.stop()
