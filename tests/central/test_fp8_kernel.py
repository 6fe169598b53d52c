"""The FP8 block kernel's arguments and its check (`dsnode.central.eight_bit`), without a GPU.

On an H200 (scripts/gpu_check.py, 2026-11-30, torch 2.11 + CUDA 13) `torch.nn.functional.scaled_mm`
first refused one token's activation scales laid out by `.t().contiguous().t()` ("scale_a must have
strides (1, 1); got [1, 56]"), then cuBLAS refused that product (CUBLAS_STATUS_NOT_SUPPORTED). Here
`scaled_mm` is replaced by an emulation that checks torch's layout contract for the 1x128 × 128x128
recipe (the strides torch checks literally; the rows padded to whole groups of 16, which dsnode does
so the scales stay 16-byte aligned) and computes what the kernel computes. Whether cuBLAS then accepts
one token is for the next GPU run; if it does not, the check below makes the ranks hold int8."""

from __future__ import annotations

import pytest
import torch
from dsnode.central import eight_bit, rank_load
from dsnode.central.eight_bit import BLOCK, ROW_ALIGN, _check_kernel, _scaled_mm_blocks, padded_fp8
from torch.nn import functional as F


def emulated_scaled_mm(a, b, scale_a, recipe_a, scale_b, recipe_b, output_dtype):
    """torch's BlockWise1x128 × BlockWise128x128 scaled_mm, checked and computed in float32."""
    from torch.nn.functional import ScalingType

    rows, k = a.shape
    assert a.dtype == b.dtype == torch.float8_e4m3fn
    assert (recipe_a, recipe_b) == (ScalingType.BlockWise1x128, ScalingType.BlockWise128x128)
    assert a.stride() == (k, 1) and b.stride() == (1, k), "a row-major, b column-major"
    assert rows % ROW_ALIGN == 0, f"{rows} rows: not padded"
    assert scale_a.shape == (rows, k // BLOCK) and scale_a.stride() == (1, rows), scale_a.stride()
    l4 = scale_b.shape[0]
    assert l4 % 4 == 0 and l4 >= k // BLOCK and scale_b.stride() == (1, l4), scale_b.stride()
    x = a.float() * scale_a.repeat_interleave(BLOCK, 1)
    w = b.float() * scale_b[: k // BLOCK].repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    return (x @ w).to(output_dtype)


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(F, "scaled_mm", emulated_scaled_mm)


@pytest.mark.parametrize("tokens", [1, 5, 16, 37])
def test_the_kernel_gets_torch_s_layout_and_returns_one_row_per_token(emulated, tokens):
    bits, scale_inv, reference = padded_fp8(torch.randn(320, 700, generator=torch.Generator().manual_seed(1)) * 0.02)
    assert bits.shape == (384, 768) and not bits[320:].any() and not bits[:, 700:].any()
    x = torch.randn(tokens, 700, dtype=torch.bfloat16)
    got = _scaled_mm_blocks(x, bits, scale_inv)
    assert got.shape == (tokens, bits.shape[0]) and got.dtype == torch.bfloat16
    want = F.linear(x.float(), reference)
    error = ((got[:, :320].float() - want).norm() / want.norm()).item()
    assert error < 0.06, error  # e4m3 activations: 3 mantissa bits


def test_the_check_passes_a_kernel_that_computes_the_product(emulated, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _check_kernel(torch.device("cpu")) is None


def test_the_check_names_what_the_kernel_raised(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling "
                           "`cublasLtMatmulAlgoGetHeuristic( ltHandle, ...)`\nmore")

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(F, "scaled_mm", refuse)
    problem = _check_kernel(torch.device("cpu"))
    assert problem == ("RuntimeError: CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling "
                       "`cublasLtMatmulAlgoGetHeuristic( ltHandle, ...)`")


def test_the_check_catches_a_kernel_that_computes_wrong_numbers(monkeypatch):
    def scaled_half_again(a, b, scale_a, recipe_a, scale_b, recipe_b, output_dtype):
        return emulated_scaled_mm(a, b, scale_a, recipe_a, scale_b, recipe_b, output_dtype) * 1.5

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(F, "scaled_mm", scaled_half_again)
    problem = _check_kernel(torch.device("cpu"))
    assert problem.startswith("the FP8 block kernel is off by 0.") and problem.endswith("on 1 tokens")


def test_the_check_refuses_gpus_below_compute_capability_8_9(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert "compute capability (8, 6)" in _check_kernel(torch.device("cpu"))
    assert "CUDA GPU" in eight_bit.fp8_kernel_problem(torch.device("cpu"))


def test_a_rank_holds_int8_where_the_fp8_kernel_fails_its_check(monkeypatch):
    problems = {"cuda:0": "RuntimeError: CUBLAS_STATUS_NOT_SUPPORTED", "cuda:1": None}
    monkeypatch.setattr(eight_bit, "fp8_kernel_problem", lambda device: problems[str(device)])
    assert rank_load.held_weights("fp8", torch.device("cuda", 0)) == "int8"
    assert rank_load.held_weights("fp8", torch.device("cuda", 1)) == "fp8"
    for planned in ("model", "int8"):  # never checked: nothing computes in FP8
        assert rank_load.held_weights(planned, torch.device("cuda", 0)) == planned
