"""`dsnode bench nccl`: sizes, formulas, the no-GPU answer, a real 2-rank gloo run published to /metrics.
The answers that need PyTorch itself are `model` tests, skipped where torch is not installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from dsnode.cli import main
from dsnode.metrics import NodeMetrics
from dsnode.nccl_result import result_path
from dsnode.ops import nccl


def test_sizes_and_bus_bandwidth():
    assert [nccl.parse_size(s) for s in ("8", "64K", "128M", "1G", "4MiB")] == [8, 2**16, 2**27, 2**30, 2**22]
    with pytest.raises(ValueError):
        nccl.parse_size("12 parsecs")
    assert nccl.size_range(8, 128, 2) == (8, 16, 32, 64, 128)
    assert nccl.size_range(8, 100, 4) == (8, 32)
    assert nccl.bus_bandwidth(10.0, 8) == 17.5  # 2(n-1)/n, as nccl-tests
    assert nccl.bus_bandwidth(10.0, 2) == 10.0 and nccl.bus_bandwidth(10.0, 1) == 0.0


def test_result_path_follows_systemd_state_directory():
    assert result_path("/var/lib/dsnode:/var/lib/other") == Path("/var/lib/dsnode/nccl-allreduce.json")
    assert result_path(None) == Path("/var/lib/dsnode/nccl-allreduce.json")
    assert result_path("/srv/state") == Path("/srv/state/nccl-allreduce.json")


@pytest.mark.model
def test_without_gpus_it_says_so_and_exits_3(capsys):
    torch = pytest.importorskip("torch")

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA GPUs")
    assert main(["bench", "nccl"]) == nccl.EXIT_NOTHING_TO_MEASURE == 3
    err = capsys.readouterr().err
    assert "no CUDA GPUs" in err and "--backend gloo --world-size 2" in err


@pytest.mark.model
def test_one_rank_is_refused_as_nothing_to_measure(monkeypatch, capsys):
    """A one-rank all-reduce returns at once: the H200 host "measured" 4.7 TB/s at world size 1."""
    torch = pytest.importorskip("torch")

    assert main(["bench", "nccl", "--backend", "gloo", "--world-size", "1"]) == 3
    assert "over one rank moves no data" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a host with one GPU, NCCL or not
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H200")
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    assert main(["bench", "nccl"]) == 3
    err = capsys.readouterr().err
    assert "one CUDA GPU here (NVIDIA H200)" in err and "--backend gloo" in err


def test_without_torch_it_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # as on an edge host: import torch fails
    monkeypatch.setitem(sys.modules, "torch.distributed", None)
    assert main(["bench", "nccl", "--backend", "gloo"]) == 3
    assert "needs PyTorch" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.model
def test_gloo_two_ranks_measure_and_publish(tmp_path, node, monkeypatch, capsys):
    pytest.importorskip("torch.distributed")
    state = tmp_path / "state"
    monkeypatch.setenv("STATE_DIRECTORY", str(state))  # as systemd's StateDirectory= sets it
    code = main(
        [
            "bench",
            "nccl",
            "--backend",
            "gloo",
            "--world-size",
            "2",
            "-b",
            "8",
            "-e",
            "64K",
            "-f",
            "8",
            "--iters",
            "3",
            "--warmup",
            "1",
            "--json",
            "--publish",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"published to {state / 'nccl-allreduce.json'}" in captured.err
    result = json.loads(captured.out)
    assert result["backend"] == "gloo" and result["world_size"] == 2 and result["devices"] == ["cpu", "cpu"]
    rows = result["results"]
    assert [r["bytes"] for r in rows] == [8, 64, 512, 4096, 32768]
    for row in rows:
        assert row["correct"] and 0 < row["time_s"] <= row["time_max_s"]
        assert row["algbw_bytes_per_s"] == pytest.approx(row["bytes"] / row["time_s"])
        assert row["busbw_bytes_per_s"] == pytest.approx(row["algbw_bytes_per_s"] * 2 * (2 - 1) / 2)
    published = state / "nccl-allreduce.json"
    assert json.loads(published.read_text()) == result
    # the node on this host reads it at scrape time (its default path under the same STATE_DIRECTORY)
    metrics = NodeMetrics(node, nccl_result=result_path(str(state)))
    labels = {"backend": "gloo", "world_size": "2", "size_bytes": "8"}
    assert (
        metrics.registry.get_sample_value("dsnode_nccl_allreduce_latency_seconds", labels)
        == rows[0]["time_s"]
    )
