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
        ({"quantization": "int8"}, 4, Placement(1, "cuda")),  # bitsandbytes: one rank by default
    ],
)
def test_placement(kwargs, gpus, expected):
    assert plan_placement(section(**kwargs), gpus) == expected


def test_more_ranks_than_gpus_is_refused_with_the_numbers():
    with pytest.raises(PlacementError, match="tensor_parallel = 4 but this host has 2 GPUs"):
        plan_placement(section(tensor_parallel=4), 2)


def test_quantization_with_tensor_parallel_is_refused():
    with pytest.raises(PlacementError, match="'nf4' needs tensor_parallel = 1 \\(got 2\\)"):
        plan_placement(section(quantization="nf4", tensor_parallel=2), 2)


def test_cuda_without_gpu_is_refused():
    with pytest.raises(PlacementError, match="no NVIDIA GPU"):
        plan_placement(section(device="cuda"), 0)
