"""`dsnode serve` with `backend = "deepspeed"`, tensor parallel 2: one service, three processes. A
follower rank killed mid-stream ends the stream with an error event and the daemon exits 1 (systemd's
Restart=on-failure then starts it again), leaving no rank behind. A model that cannot fit the host is
refused before loading, with exit 78, which the unit's RestartPreventExitStatus= keeps from looping."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import urllib.request

import psutil
import pytest
from dsnode.cli import main
from dsnode.sizing import EXIT_DOES_NOT_FIT

from tests.support.nodes import ServeProcess, free_port, node_toml

from .test_bad_checkpoints import DEEPSEEK_V3_CONFIG

pytestmark = pytest.mark.slow

MODEL = "deepseek-r1-tiny"
TWO_CPU_RANKS = 'tensor_parallel = 2\ndevice = "cpu"\n'


def post(url: str, body: dict, timeout: float = 60.0):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout)


def test_killed_rank_ends_the_stream_with_an_error_and_the_daemon_exits_1(tmp_path, moe_dir):
    port = free_port()
    config = tmp_path / "dsnode.toml"
    config.write_text(node_toml("central-ds", "central", port, MODEL, moe_dir, "deepspeed", model_extra=TWO_CPU_RANKS))
    node = ServeProcess("central-ds", config, port, tmp_path / "serve.log").start()
    try:
        node.wait_ready(timeout=180)
        with post(node.url + "/v1/completions", {"model": MODEL, "prompt": "It was the best", "max_tokens": 8,
                                                 "temperature": 0}) as response:
            answer = json.load(response)
            assert response.headers["X-DSNode-Node"] == "central-ds"
        assert answer["choices"][0]["text"].startswith(" of times")
        _weights_per_rank_are_shown(node.url)
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


def _weights_per_rank_are_shown(url: str) -> None:
    """/cluster carries each rank's weights (ModelInfo.extra → details); `dsnode status` shows them."""
    with urllib.request.urlopen(url + "/cluster", timeout=10) as response:
        details = json.load(response)["node"]["models"][0]["details"]
    ranks = details["ranks"]
    assert [r["routed_experts"] for r in ranks] == [[0, 3], [4, 7]]
    assert all(r["weights_bytes"] == sum(r["weights_bytes_by_kind"].values()) > 0 for r in ranks)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["status", "--url", url]) == 0
    header, row = out.getvalue().splitlines()[:2]
    column = header.index("WEIGHTS/RANK")
    assert row[column:].startswith(f"{ranks[0]['weights_bytes'] / 1e6:.1f}M ×2")


def test_a_model_that_cannot_fit_is_refused_at_start_with_exit_78(tmp_path, moe_dir):
    """DeepSeek-V3's config on this host's memory: refused before any rank starts, with the plan's
    numbers in the log, and an exit code systemd does not restart on."""
    folder = tmp_path / "deepseek-v3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(DEEPSEEK_V3_CONFIG))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(moe_dir / name, folder / name)
    port = free_port()
    config = tmp_path / "dsnode.toml"
    config.write_text(node_toml("central-big", "central", port, "deepseek-r1", folder, "deepspeed",
                                model_extra=TWO_CPU_RANKS))
    node = ServeProcess("central-big", config, port, tmp_path / "serve.log").start()
    try:
        assert node.process.wait(timeout=120) == EXIT_DOES_NOT_FIT == 78
    finally:
        node.kill()
        node.stop()
    failed = node.log_events("model_load_failed")[0]
    assert "model deepseek-r1 (fp32) on 2 rank(s)" in failed["error"] and "does not fit" in failed["error"]
    assert "routed experts 1307.8 GB" in failed["error"] and "Traceback" not in node.log_text()
    assert "rank_started" not in node.log_text()


@pytest.mark.parametrize("backend", ["transformers", "deepspeed", "onnx"])
def test_a_prompt_cache_larger_than_the_host_can_hold_is_refused_at_start(tmp_path, moe_dir, backend):
    """`[batching] prompt_cache_mb` is host memory each rank may fill: over 70% of this host's memory
    (two deepspeed ranks: twice that) is refused before loading, with exit 78 and the figures."""
    from dsnode.demo import prepare_models

    from tests.support.models import cache_dir

    total_mb = psutil.virtual_memory().total // 2**20
    ranks = 2 if backend == "deepspeed" else 1
    cache_mb = int(total_mb * 0.72 / ranks) + 1
    folder = prepare_models(cache_dir()).dense_onnx_int8 if backend == "onnx" else moe_dir
    port = free_port()
    config = tmp_path / "dsnode.toml"
    config.write_text(node_toml("big-cache", "central", port, MODEL, folder, backend,
                                model_extra=TWO_CPU_RANKS if backend == "deepspeed" else "",
                                extra=f"[batching]\nprompt_cache_mb = {cache_mb}\n"))
    node = ServeProcess("big-cache", config, port, tmp_path / "serve.log").start()
    try:
        assert node.process.wait(timeout=180) == EXIT_DOES_NOT_FIT
    finally:
        node.kill()
        node.stop()
    failed = node.log_events("model_load_failed")[0]
    assert failed["error"].startswith(f"batching.prompt_cache_mb = {cache_mb}:"), failed
    assert ("2 ranks x" in failed["error"]) == (backend == "deepspeed") and "Traceback" not in node.log_text()
