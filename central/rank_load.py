"""How one rank of the `deepspeed` backend gets its shard of the model, and what it reports.

1. Read: the model on the meta device, then only this rank's tensors from the checkpoint
   (`dsnode.central.shard_loader`: its routed experts, everything else whole). No collective runs
   here, so a rank that fails here cannot leave the others waiting.
2. Agree: the ranks exchange their outcome (one all-gather on gloo). If any rank failed, every rank
   raises `LoadRefused` with the first failure's one-line message, which rank 0 tells the daemon.
3. Shard: `deepspeed.init_inference` (AutoTP) splits attention, the dense MLPs and the head. Tensors
   transformers keeps in float32 (the router, rotary tables) get their float32 values back, since
   `init_inference` casts the whole module to the model dtype.
4. Report: weights by kind, routed experts held and peak resident memory while loading, per rank,
   gathered to rank 0 (the engine's `ModelInfo.extra`, shown by /cluster and `dsnode status`).
"""

from __future__ import annotations

import importlib
import os
import re
import resource
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
from dsnode.config import ModelSection
from dsnode.sizing import describe_spread

log = structlog.get_logger("dsnode.central.rank")

_TP_LAYERS = {"LinearLayer", "LinearAllreduce", "LmHeadLinearAllreduce"}
WEIGHTS = ("model", "int8", "fp8")  # what the linear weights are held as (dsnode.central.weights_format)


class LoadRefused(Exception):
    """Some rank could not read its shard; the same one-line message on every rank."""


@dataclass(frozen=True)
class RankPlace:
    """Where a rank stands: its global rank (which experts it holds), its local rank (which GPU), the
    world, the format of its linear weights, and how long torch.distributed waits for a peer."""

    rank: int
    local_rank: int
    world: int
    weights: str = "model"
    group_timeout_s: float = 600.0


def load_rank(model: ModelSection, device_kind: str, place: RankPlace,
              prompt_cache_bytes: int = 0) -> tuple[Any, dict[str, Any], Any]:
    """This rank's shard behind a `TorchRunner` (with a prompt cache of its own shard's cache), facts for
    the daemon, and the control group."""
    import torch

    from .torch_runner import TorchRunner
    from .transformers_engine import pick_dtype

    if device_kind == "cuda":
        device = torch.device("cuda", place.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(model.threads or max(1, (os.cpu_count() or 1) // place.world))
    place = replace(place, weights=held_weights(place.weights, device))
    group = _init_distributed(device_kind, place.group_timeout_s)
    dtype = pick_dtype(model.dtype, device)
    if model.quantization == "nf4":
        module, facts = _load_quantized(model, device, dtype)
    else:
        module, facts = _load_expert_parallel(model, dtype, place, group, device)
    facts["dtype"] = str(dtype).removeprefix("torch.")
    facts["weights"] = place.weights
    facts["weights_bytes_per_rank"] = module.get_memory_footprint()
    facts["sharded_linears"] = sum(type(m).__name__ in _TP_LAYERS for m in module.modules())
    return TorchRunner(module, device, prompt_cache_bytes), facts, group


def held_weights(planned: str, device: Any) -> str:
    """The format this rank holds its linears in: the plan's, except "fp8" where the FP8 block kernel
    fails its check on this GPU (`fp8_kernel_problem`): int8 then, as on GPUs without FP8 compute."""
    if planned != "fp8":
        return planned
    from .eight_bit import fp8_kernel_problem

    problem = fp8_kernel_problem(device)
    if problem is None:
        return planned
    log.warning("fp8_kernel_unavailable", device=str(device), reason=problem, weights="int8")
    return "int8"


def _load_quantized(model: ModelSection, device: Any, dtype: Any) -> tuple[Any, dict[str, Any]]:
    # bitsandbytes layers can neither be sharded by AutoTP nor cast by init_inference; the engine
    # only allows quantization with tensor_parallel = 1, where DeepSpeed would add nothing
    from .transformers_engine import load_hf_model

    return load_hf_model(model, device, dtype), {"deepspeed_init_inference": False}


def _load_expert_parallel(model: ModelSection, dtype: Any, place: RankPlace, group: Any, device: Any
                          ) -> tuple[Any, dict[str, Any]]:
    from .eight_bit import model_dtype_bytes
    from .expert_parallel import bytes_by_kind, deepspeed_all_reduce
    from .shard_loader import empty_shard, read_shard

    rank, world = place.rank, place.world
    peak: PeakMemory | None = None
    try:
        empty = empty_shard(Path(model.path), dtype, rank, world, deepspeed_all_reduce, place.weights)
        shard = empty.shard
        peak = PeakMemory()  # from here on: the weights (the model code is imported by now)
        module, failure = read_shard(empty), None
    except Exception as exc:  # reported by every rank below, in one line
        if not _expected(exc):
            log.exception("rank_shard_read_failed")
        module, failure = None, _one_line(exc)
    _agree(failure, world, group)
    assert peak is not None
    module = _place(module, world, dtype, device, place.weights)
    mine = {
        "rank": rank,
        "routed_experts": [shard.experts.start, shard.experts.stop - 1] if len(shard.experts) else None,
        "routed_experts_held": len(shard.experts),
        "weights_bytes": sum(bytes_by_kind(module).values()),
        "weights_bytes_by_kind": bytes_by_kind(module),
        **peak.report(),
    }
    if place.weights != "model":
        mine["weights_bytes_in_model_dtype"] = model_dtype_bytes(module, dtype)  # what 8 bits saved
    facts: dict[str, Any] = {"deepspeed_init_inference": place.weights == "model",
                             "ranks": _gather(mine, world, group)}
    if shard.routed_experts:
        facts["expert_parallel"] = {"ranks": world, "routed_experts": shard.routed_experts,
                                    "spread": describe_spread(shard.routed_experts, world)}
    return module, facts


def _place(module: Any, world: int, dtype: Any, device: Any, weights: str) -> Any:
    """16/32-bit weights: AutoTP splits attention, the dense MLPs and the head. 8-bit weights: AutoTP
    finds no `nn.Linear` in the decoder layers ("Not able to determine model policy") and could not
    split the 8-bit ones anyway, so the module only moves to its device (a move, never a cast)."""
    if weights != "model":
        return module.to(device)
    # detached: init_inference's cast swaps each parameter's .data, these keep the float32 storage
    fp32 = {name: t.detach() for name, t in _tensors(module) if t.dtype != dtype and t.is_floating_point()}
    module = _deepspeed_shard(module, world, dtype)
    _restore(module, fp32)
    return module


def _expected(exc: Exception) -> bool:
    """Errors of the input (a checkpoint, a config), told in one line without a traceback."""
    from dsnode.hfconfig import ModelFolderError

    from .expert_parallel import ShardingError

    return isinstance(exc, (ModelFolderError, ShardingError, OSError))


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]


def _agree(failure: str | None, world: int, group: Any) -> None:
    failures = [failure]
    if world > 1:
        import torch.distributed as dist

        failures = [None] * world
        dist.all_gather_object(failures, failure, group=group)
    first = next(((rank, f) for rank, f in enumerate(failures) if f), None)
    if first is not None:
        raise LoadRefused(first[1] if world == 1 else f"{first[1]} (rank {first[0]})")


def _gather(mine: dict[str, Any], world: int, group: Any) -> list[dict[str, Any]]:
    if world == 1:
        return [mine]
    import torch.distributed as dist

    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine, group=group)
    return every


def _tensors(module: Any) -> list[tuple[str, Any]]:
    return [*module.named_parameters(), *module.named_buffers()]


def _restore(module: Any, fp32: dict[str, Any]) -> None:
    """Put back the float32 values `init_inference`'s cast rounded (modules AutoTP left in place)."""
    for name, tensor in _tensors(module):
        kept = fp32.get(name)
        if kept is not None and kept.shape == tensor.shape:
            tensor.data = kept.to(tensor.device)


def _init_distributed(device_kind: str, timeout_s: float) -> Any:
    """torch.distributed through DeepSpeed: nccl between GPUs, gloo on CPU; returns the gloo group
    the calls are broadcast on (CPU objects, whatever the model's backend). `timeout_s` bounds the
    meeting at the store and every collective (the idle ticks of tp_worker stay far inside it)."""
    import deepspeed
    import torch.distributed as dist

    if device_kind == "cpu":
        # DeepSpeed's shared-memory all-reduce op segfaults on CPU (0.19.8); without it, gloo
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    timeout = timedelta(seconds=timeout_s)
    deepspeed.init_distributed(dist_backend="nccl" if device_kind == "cuda" else "gloo",
                               auto_mpi_discovery=False, verbose=False, timeout=timeout)
    return dist.new_group(backend="gloo", timeout=timeout) if device_kind == "cuda" else None


def _deepspeed_shard(hf: Any, world: int, dtype: Any) -> Any:
    import deepspeed

    engine = deepspeed.init_inference(
        hf, tensor_parallel={"tp_size": world}, dtype=dtype, replace_with_kernel_inject=False
    )
    return engine.module


class PeakMemory:
    """Peak resident memory of this process from now on. Linux resets the high-water mark when
    "5" is written to /proc/self/clear_refs; elsewhere the peak counts from the process start."""

    def __init__(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.exact = True
        except OSError:
            self.exact = False
        self.before = _status_bytes("VmRSS")

    def report(self) -> dict[str, Any]:
        if self.exact:
            peak = _status_bytes("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
        return {"load_rss_before_bytes": self.before, "load_peak_rss_bytes": peak,
                "load_peak_rss_exact": self.exact}


def _status_bytes(field: str) -> int:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        match = None
    return int(match.group(1)) * 1024 if match else 0
