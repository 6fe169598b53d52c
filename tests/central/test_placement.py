"""How many DeepSpeed ranks on which device, from `[model]` and the host's GPUs (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
from dsnode.central.deepspeed_engine import Placement, PlacementError, plan_placement
from dsnode.config import ModelSection


def section(**kwargs: object) -> ModelSection:
    return ModelSection(name="m", path=Path("/m"), backend="deepspeed", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "gpus", "expected"),
    [
        ({}, 0, Placement(1, "cpu")),  # no GPU: one CPU rank
        ({}, 8, Placement(8, "cuda")),  # default: every local GPU
        ({"tensor_parallel": 2}, 8, Placement(2, "cuda")),
        ({"tensor_parallel": 2}, 0, Placement(2, "cpu")),  # CPU ranks over gloo (tests, development)
        ({"device": "cpu"}, 4, Placement(1, "cpu")),
        ({"quantization": "int8"}, 4, Placement(4, "cuda")),  # dsnode's 8-bit loader: every GPU, like none
        ({"quantization": "nf4"}, 4, Placement(1, "cuda")),  # bitsandbytes: one rank by default
    ],
)
def test_placement(kwargs, gpus, expected):
    assert plan_placement(section(**kwargs), gpus) == expected


def test_distributed_ranks_per_host_wins():
    assert plan_placement(section(), 8, ranks_per_host=4) == Placement(4, "cuda")
    assert plan_placement(section(device="cpu"), 0, ranks_per_host=2) == Placement(2, "cpu")


@pytest.mark.parametrize(
    ("quantization", "fp8_checkpoint", "device", "capabilities", "expected"),
    [
        ("none", False, "cuda", ["9.0"], "model"),
        ("none", True, "cuda", ["9.0", "9.0"], "fp8"),  # H100: FP8 compute, the checkpoint kept as it is
        ("none", True, "cuda", ["8.9"], "fp8"),  # L40S
        ("none", True, "cuda", ["9.0", "8.0"], "int8"),  # one A100 among them: int8 everywhere
        ("none", True, "cuda", ["8.0"], "int8"),  # A100: W8A16
        ("none", True, "cpu", [], "int8"),
        ("int8", False, "cuda", ["9.0"], "int8"),  # asked for: from a bf16 checkpoint
        ("int8", True, "cuda", ["9.0"], "int8"),  # asked for, even where FP8 would run
    ],
)
def test_weights_format(quantization, fp8_checkpoint, device, capabilities, expected):
    from dsnode.central.preflight import weights_format
    from dsnode.probe import GPU

    gpus = [GPU(i, "GPU", 81920, cc) for i, cc in enumerate(capabilities)]
    assert weights_format(section(quantization=quantization), fp8_checkpoint, device, gpus) == expected


def test_nf4_cannot_read_an_fp8_checkpoint():
    from dsnode.central.preflight import weights_format
    from dsnode.sizing import UnsupportedArchitecture

    with pytest.raises(UnsupportedArchitecture, match="'nf4' cannot read an FP8 checkpoint"):
        weights_format(section(quantization="nf4"), True, "cpu", [])


def test_more_ranks_than_gpus_is_refused_with_the_numbers():
    with pytest.raises(PlacementError, match="tensor_parallel = 4 but this host has 2 GPUs"):
        plan_placement(section(tensor_parallel=4), 2)


def test_quantization_with_tensor_parallel_is_refused():
    with pytest.raises(PlacementError, match="'nf4' needs tensor_parallel = 1 \\(got 2\\)"):
        plan_placement(section(quantization="nf4", tensor_parallel=2), 2)


def test_cuda_without_gpu_is_refused():
    with pytest.raises(PlacementError, match="no NVIDIA GPU"):
        plan_placement(section(device="cuda"), 0)
