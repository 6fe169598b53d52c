"""What a host does before its ranks run, shared by the leader's engine (`dsnode.central.deepspeed_engine`)
and a follower's (`dsnode.central.follower`): how many ranks on which device, the checks that refuse a
configuration before any rank starts, the ranks' command line, and waiting for rank 0's messages.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from dsnode.config import BatchingSection, ModelSection
from dsnode.hfconfig import ModelFolderError
from dsnode.inference.runner import RunnerDied
from dsnode.probe import GPU
from dsnode.sizing import model_shape

from .checkpoint import Checkpoint
from .preflight import check_fits, declares_fp8, weights_format
from .ranks import RankGroup

LOAD_TIMEOUT_S = 3600.0  # a 671B checkpoint takes long to read; a hung rank still ends here
CALL_TIMEOUT_S = 600.0  # one prefill chunk or decode step; far above any healthy step
POLL_S = 0.2  # how often a waiting call checks the ranks are alive


class PlacementError(ModelFolderError):
    pass


@dataclass(frozen=True)
class Placement:
    ranks: int  # on this host
    device: str  # "cuda" (one GPU per rank) or "cpu"


def plan_placement(model: ModelSection, gpus: int, ranks_per_host: int | None = None) -> Placement:
    """How many ranks on which device: `[distributed] ranks_per_host` or `[model] tensor_parallel`,
    by default every local GPU (one rank on CPU, or with bitsandbytes nf4)."""
    if model.device == "cuda" and gpus == 0:
        raise PlacementError("model.device = 'cuda' but this host has no NVIDIA GPU")
    device = "cuda" if model.device == "cuda" or (model.device == "auto" and gpus > 0) else "cpu"
    bitsandbytes = model.quantization == "nf4"
    ranks = ranks_per_host or model.tensor_parallel or (gpus if device == "cuda" and not bitsandbytes else 1)
    if bitsandbytes and ranks > 1:
        raise PlacementError(
            f"model.quantization = {model.quantization!r} needs tensor_parallel = 1 (got {ranks}): "
            "DeepSpeed cannot shard bitsandbytes layers (\"int8\" can: dsnode's own 8-bit loader)"
        )
    if device == "cuda" and ranks > gpus:
        raise PlacementError(f"model.tensor_parallel = {ranks} but this host has {gpus} GPUs")
    return Placement(ranks, device)


def prepare_load(model: ModelSection, batching: BatchingSection, hf_config: dict[str, Any],
                 placement: Placement, gpus: list[GPU], world: int) -> str:
    """Refuse what cannot work before any rank starts (the plan does not fit: DoesNotFit; an
    architecture the shard loader does not know; more ranks than experts; a broken checkpoint, an
    FP8 weight without fitting scales) and return how the ranks hold their weights (`weights_format`)."""
    weights = weights_format(model, declares_fp8(hf_config), placement.device, gpus[:placement.ranks])
    sharded = model.quantization != "nf4"  # bitsandbytes loads through transformers instead
    plan = check_fits(model, hf_config, batching, world, placement.device, gpus, require_supported=sharded,
                      weights=weights, local_ranks=placement.ranks)
    if plan is None or not sharded:
        return "model"
    shape = model_shape(hf_config)
    if shape.routed_experts and world > shape.routed_experts:
        raise PlacementError(f"model.tensor_parallel = {world} is more than the "
                             f"{shape.routed_experts} routed experts per layer: a rank would hold none")
    # index, headers, dtypes, FP8 scales: a missing shard or a bad tensor is named here
    checkpoint = Checkpoint.open(model.path)
    checkpoint.check_dtypes()
    return weights_format(model, checkpoint.has_fp8, placement.device, gpus[:placement.ranks])


def rank_command(model: ModelSection, placement: Placement, weights: str, batching: BatchingSection) -> list[str]:
    return [sys.executable, "-m", "dsnode.central.tp_worker", "--model", model.model_dump_json(),
            "--device", placement.device, "--parent-pid", str(os.getpid()), "--weights", weights,
            "--group-timeout", str(CALL_TIMEOUT_S), "--prompt-cache-bytes", str(batching.prompt_cache_mb * 2**20)]


def rank_threads(model: ModelSection, placement: Placement) -> dict[str, str]:
    threads = model.threads or max(1, (os.cpu_count() or 1) // placement.ranks)
    return {"OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": placement.device}


def receive(control: Connection, ranks: RankGroup, timeout_s: float, what: str) -> tuple[str, Any]:
    """Rank 0's next message, or RunnerDied if a rank dies or nothing comes within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not control.poll(POLL_S):
        if ranks.dead_reason is not None:
            raise RunnerDied(ranks.dead_reason)
        if time.monotonic() > deadline:
            ranks.kill()
            raise RunnerDied(f"rank 0 did not answer {what} within {timeout_s:.0f}s; the ranks were killed")
    try:
        message: tuple[str, Any] = control.recv()
    except (EOFError, OSError):
        raise RunnerDied(ranks.wait_dead(2.0) or "rank 0 closed its control socket") from None
    return message
