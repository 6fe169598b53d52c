"""Section 6 of scripts/gpu_check.py, `moe_fp8`: DeepSeek's FP8 checkpoint layout kept in FP8 on GPUs
that compute in FP8 (compute capability 8.9+: H100, H200, L40S); skipped with the reason elsewhere.

1. `kernel`: one (4096 × 7168) linear stored as e4m3 with 128 × 128 block scales; `Fp8Linear` (activations
   quantized per 1 × 128 group, `torch.nn.functional.scaled_mm` with both block scales) against the same
   weights dequantized to bf16 (`F.linear`): relative error, and ms per call at 1 and 64 tokens.
2. `model`: the MoE of section 2 written in the FP8 layout (`quantize_fp8_blocks`), read in this process
   with `weights = "fp8"` and, for reference, dequantized to bf16: the logits' relative error.
3. `engine`: the same FP8 folder served by `DeepSpeedEngine` with two ranks (one per GPU; one rank on a
   one-GPU host, said so): it must choose "fp8"; weights per rank before (bf16) and after (FP8), and
   decode tokens/s at batch 1/8/32.

First, `kernel_check`: `fp8_kernel_problem` on this GPU. Where the kernel fails it (an H200 with torch 2.11
refused a one-token product before the rows were padded), 1 and 2 are not run (they would compare the
dequantized reference with itself) and 3 must choose "int8": the fallback, on the real GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable


class FP8Unavailable(Exception):
    """This device cannot compute in FP8: the section is skipped with this reason."""


def fp8_device() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise FP8Unavailable("FP8 compute needs a CUDA GPU of compute capability 8.9+ "
                             "(this run: no CUDA device)")
    capability = torch.cuda.get_device_capability(0)
    if capability < (8, 9):
        name = torch.cuda.get_device_name(0)
        raise FP8Unavailable(f"FP8 compute needs compute capability 8.9+ ({name} is "
                             f"{capability[0]}.{capability[1]}); dsnode loads FP8 checkpoints as int8 there")
    return torch.device("cuda", 0)


def kernel(device: Any) -> dict[str, Any]:
    import torch
    from dsnode.central.eight_bit import Fp8Linear, dequantize_fp8, quantize_fp8_blocks
    from torch.nn import functional as F

    torch.manual_seed(0)
    weight = torch.randn(4096, 7168, device=device) * 0.02
    quantized, scale = quantize_fp8_blocks(weight)
    layer = Fp8Linear(7168, 4096, None)
    layer.weight = torch.nn.Parameter(quantized.view(torch.uint8), requires_grad=False)
    layer.weight_scale_inv = torch.nn.Parameter(scale, requires_grad=False)
    reference = dequantize_fp8(quantized, scale).to(torch.bfloat16)
    out: dict[str, Any] = {}
    for tokens in (1, 64):
        x = torch.randn(tokens, 7168, device=device, dtype=torch.bfloat16)
        want = F.linear(x, reference).float()
        error = ((layer(x).float() - want).norm() / want.norm()).item()
        out[f"tokens_{tokens}"] = {"relative_error": round(error, 5), "fp8_ms": _ms(lambda: layer(x)),
                                   "bf16_ms": _ms(lambda: F.linear(x, reference))}
    return out


def _ms(call: Callable[[], Any], repeats: int = 20) -> float:
    import torch

    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    torch.cuda.synchronize()
    return round((time.perf_counter() - start) / repeats * 1e3, 3)


def write_fp8(source: Path, folder: Path, dequantized: Path) -> None:
    """`source` (a saved MoE) in DeepSeek's FP8 layout: the decoder layers' 2-D weights as e4m3 with
    float32 `weight_scale_inv`, the rest bf16; and the same numbers dequantized to bf16 (the reference)."""
    import shutil

    import torch
    from dsnode.central.eight_bit import dequantize_fp8, quantize_fp8_blocks
    from safetensors.torch import load_file, save_file

    fp8: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    for file in sorted(source.glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            stored_fp8 = ".layers." in name and name.endswith(".weight") and tensor.dim() == 2
            if stored_fp8 and ".mlp.gate." not in name and "norm" not in name:  # as DeepSeek stores it
                fp8[name], fp8[name + "_scale_inv"] = quantize_fp8_blocks(tensor)
                plain[name] = dequantize_fp8(fp8[name], fp8[name + "_scale_inv"]).to(torch.bfloat16)
            else:
                fp8[name] = plain[name] = tensor.to(torch.bfloat16)
    config = json.loads((source / "config.json").read_text())
    quant = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
             "weight_block_size": [128, 128]}
    for target, tensors, extra in ((folder, fp8, {"quantization_config": quant}), (dequantized, plain, {})):
        target.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
        (target / "config.json").write_text(json.dumps({**config, **extra}))
        for item in source.iterdir():
            skip = ("config.json", "model.safetensors.index.json")
            if item.suffix != ".safetensors" and item.name not in skip:
                shutil.copy(item, target / item.name)


def model(folder: Path, dequantized: Path, device: Any) -> dict[str, Any]:
    """The FP8 folder read as FP8 and its dequantized copy read in bf16, in this process: logits."""
    import torch
    from dsnode.central.shard_loader import empty_shard, read_shard

    torch.manual_seed(0)
    ids = torch.randint(4, 512, (1, 64), device=device)
    logits = {}
    for name, source, weights in (("fp8", folder, "fp8"), ("bf16", dequantized, "model")):
        module = read_shard(empty_shard(source, torch.bfloat16, 0, 1, lambda t: None, weights)).to(device)
        with torch.no_grad():
            logits[name] = module(ids).logits.float()
        del module
        torch.cuda.empty_cache()
    error = ((logits["fp8"] - logits["bf16"]).norm() / logits["bf16"].norm()).item()
    return {"relative_logits_error_vs_dequantized_bf16": round(error, 5)}


async def engine(args: argparse.Namespace, folder: Path, figures: Callable[..., Any], batches: tuple[int, ...],
                 expected: str) -> dict[str, Any]:
    """`DeepSpeedEngine` on the FP8 folder: it must hold `expected` ("fp8", or "int8" where the kernel
    failed its check)."""
    import torch
    from dsnode.central.deepspeed_engine import DeepSpeedEngine
    from dsnode.config import BatchingSection, ModelSection

    ranks = min(2, torch.cuda.device_count())
    section = ModelSection(name="gpu-check-fp8", path=folder, backend="deepspeed", device="cuda",
                           dtype="bfloat16", tensor_parallel=ranks)
    served = DeepSpeedEngine(section, BatchingSection(max_running=max(batches)))
    started = time.monotonic()
    await served.load()
    try:
        extra = served.info.extra
        if extra.get("weights") != expected:
            raise RuntimeError(f"the engine chose weights = {extra.get('weights')!r}, not {expected!r}")
        result: dict[str, Any] = {
            "ranks": ranks, "load_s": round(time.monotonic() - started, 1),
            "note": None if ranks == 2 else "one GPU here: one rank (NCCL takes one rank per GPU)",
            "per_rank": [{k: r.get(k) for k in ("rank", "weights_bytes", "weights_bytes_in_model_dtype",
                                                 "load_peak_rss_bytes")} for r in extra["ranks"]],
        }
        result.update(await figures(served, batches, args.repeats, prefill=False))
        return result
    finally:
        await served.close()


def section(args: argparse.Namespace, work: Path, saved_moe: Callable[..., Any], free_gpu: Callable[[], None],
            figures: Callable[..., Any], batches: tuple[int, ...], skip: type[Exception]) -> dict[str, Any]:
    """The section as gpu_check.py runs it (its helpers passed in: this module imports nothing of it)."""
    import asyncio

    try:
        device = fp8_device() if args.device == "cuda" else None
    except FP8Unavailable as exc:
        raise skip(str(exc)) from None
    if device is None:
        raise skip("FP8 compute needs a CUDA GPU of compute capability 8.9+ (this run: --device cpu)")
    source, _ = saved_moe(args, work)
    folder, dequantized = work / "moe-fp8", work / "moe-fp8-dequantized"
    write_fp8(source, folder, dequantized)
    from dsnode.central.eight_bit import fp8_kernel_problem

    # where the kernel fails its check, Fp8Linear computes the dequantized reference and the engine holds
    # int8: the kernel and model figures would compare the reference with itself, so they are not taken
    problem = fp8_kernel_problem(device)
    result: dict[str, Any] = {"kernel_check": problem or "passed"}
    if problem is None:
        result["kernel"] = kernel(device)
        free_gpu()
        result["model"] = model(folder, dequantized, device)
        free_gpu()
    result["engine"] = asyncio.run(engine(args, folder, figures, batches, "fp8" if problem is None else "int8"))
    return result
