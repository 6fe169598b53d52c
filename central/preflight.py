"""What a central engine checks before it loads anything: the plan's arithmetic (`dsnode.sizing`) for
the configuration it is about to load. A configuration whose weights and KV cache cannot fit is
refused with the plan's numbers (`DoesNotFit`, exit 78 from `dsnode serve`), instead of an
out-of-memory crash minutes into loading. No torch here: it runs in the daemon.
"""

from __future__ import annotations

from typing import Any, Sequence

import psutil
import structlog
from dsnode.config import BatchingSection, ModelSection
from dsnode.inference.prompt_cache import check_host_memory
from dsnode.probe import GPU
from dsnode.sizing import (
    DoesNotFit,
    Fit,
    ModelShape,
    UnsupportedArchitecture,
    fit,
    fit_summary,
    model_shape,
    serving_format,
)

log = structlog.get_logger("dsnode.central")

BF16_MIN_CC = (8, 0)


def serving_dtype(wanted: str, device: str, gpus: Sequence[GPU]) -> str:
    """The dtype `pick_dtype` will choose, told without torch."""
    if wanted != "auto":
        return wanted
    if device == "cpu":
        return "float32"
    return "bfloat16" if all(_cc(g) >= BF16_MIN_CC for g in gpus) else "float16"


def _cc(gpu: GPU) -> tuple[int, int]:
    try:
        major, minor = (int(x) for x in (gpu.compute_capability or "0.0").split("."))
    except ValueError:
        return (0, 0)
    return (major, minor)


def memory_per_rank(device: str, ranks: int, gpus: Sequence[GPU]) -> int:
    """A GPU each on a GPU host (the smallest of those used); the host's memory shared out on CPU."""
    if device == "cpu":
        return psutil.virtual_memory().total // ranks
    return min(g.memory_total_mib for g in gpus[:ranks]) * 2**20


def check_fits(model: ModelSection, hf_config: dict[str, Any], batching: BatchingSection, ranks: int,
               device: str, gpus: Sequence[GPU], require_supported: bool, weights: str = "model",
               local_ranks: int | None = None) -> Fit | None:
    """The plan for this configuration; DoesNotFit if it cannot fit. An architecture the sizing does
    not know is refused when `require_supported` (the expert-parallel loader needs it), else only
    logged (the transformers backend loads any causal LM). `weights`: the deepspeed backend's
    "int8"/"fp8" loader, or "model"; `local_ranks`: the ranks of this host, when a `[distributed]`
    group spreads `ranks` over several."""
    try:
        shape: ModelShape = model_shape(hf_config)
    except UnsupportedArchitecture as exc:
        if require_supported:
            raise
        log.warning("fit_check_skipped", reason=str(exc))
        return None
    here = local_ranks or ranks
    check_host_memory(batching.prompt_cache_mb, here)  # each rank of this host keeps its own
    if device != "cpu" and len(gpus) < here:  # GPUs NVML does not list: nothing to size against
        log.warning("fit_check_skipped", reason=f"memory of {here} GPU(s) unknown (NVML lists {len(gpus)})")
        return None
    dtype = serving_dtype(model.dtype, device, gpus)
    fmt = serving_format(dtype, model.quantization, weights)
    plan = fit(shape, ranks, memory_per_rank(device, here, gpus), fmt, batching.max_batch_tokens)
    where = "cpu, host memory shared by the ranks" if device == "cpu" else f"{gpus[0].name}"
    summary = fit_summary(model.name, plan, where)
    if not plan.fits:
        raise DoesNotFit(summary)
    log.info("fit_check", model=model.name, weights_bytes_per_rank=plan.weights,
             kv_tokens_fit=plan.kv_tokens_fit, usable_bytes_per_rank=plan.usable_per_rank, format=plan.format)
    return plan


FP8_MIN_CC = (8, 9)


def declares_fp8(hf_config: dict[str, Any]) -> bool:
    """DeepSeek's FP8 checkpoints say so in config.json (`quantization_config.quant_method = "fp8"`)."""
    quant = hf_config.get("quantization_config")
    return isinstance(quant, dict) and quant.get("quant_method") == "fp8"


def weights_format(model: ModelSection, fp8_checkpoint: bool, device: str, gpus: Sequence[GPU]) -> str:
    """How the deepspeed backend's ranks hold the decoder layers' linears and the routed experts:
    "fp8" (an FP8 checkpoint kept as it is, on GPUs that compute in FP8), "int8" (W8A16: asked for,
    or an FP8 checkpoint elsewhere), or "model" (the model dtype; bitsandbytes nf4 loads its own way)."""
    if model.quantization == "int8":
        return "int8"
    if not fp8_checkpoint:
        return "model"
    if model.quantization == "nf4":
        raise UnsupportedArchitecture(
            "model.quantization = 'nf4' cannot read an FP8 checkpoint (its weights need their block "
            "scales); use quantization = \"none\" (FP8 on GPUs of compute capability 8.9+, int8 elsewhere) "
            "or \"int8\"")
    if device == "cuda" and gpus and all(_cc(g) >= FP8_MIN_CC for g in gpus):
        return "fp8"
    return "int8"
