"""One tensor-parallel rank of the DeepSpeed engine: `python -m dsnode.central.tp_worker`.

The daemon starts `tensor_parallel` of these (`dsnode.central.ranks`). Every rank loads the checkpoint
and `deepspeed.init_inference` keeps its shard (AutoTP). Rank 0 reads each runner call from the
daemon's control socket and broadcasts it; every rank runs the same `TorchRunner` method on its
shard (the all-reduces inside the forward keep them in step, and every rank holds the same KV cache
bookkeeping); rank 0 sends the result back. Followers never talk to the daemon.

Calls and answers are pickled tuples: ("prefill", seq_id, token_ids, start), ("decode", seq_ids,
token_ids), ("release", seq_id) (no answer), ("close",). Answers: ("ready", facts), ("ok", logits),
("error", message) (the step failed, the rank carries on), ("fatal", message) (the rank exits).

A rank ignores SIGINT/SIGTERM (the daemon drains first, then closes it), exits when the control socket
closes (rank 0) or a collective fails (followers), and is killed with its parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

import structlog
from dsnode.config import ModelSection
from dsnode.logs import configure_logging

log = structlog.get_logger("dsnode.central.rank")

PR_SET_PDEATHSIG = 1
ANSWERED = ("prefill", "decode")
CALLS = ("prefill", "decode", "release")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(args.log_level, args.log_format, stream=sys.stderr)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    structlog.contextvars.bind_contextvars(rank=rank)
    control = Connection(args.control_fd) if args.control_fd is not None else None
    model = ModelSection.model_validate(json.loads(args.model))  # python mode: the path validator
    try:
        runner, facts, group = load_rank(model, args.device, local_rank, world)
    except Exception as exc:
        log.exception("rank_load_failed", model=model.name)
        if control is not None:
            control.send(("fatal", f"rank {rank} failed to load the model: {type(exc).__name__}: {exc}"))
        return 1
    log.info("rank_ready", device=args.device, **facts)
    if control is not None:
        control.send(("ready", facts))
    return serve_calls(runner, control, world, group)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsnode.central.tp_worker")
    p.add_argument("--model", required=True, help="the [model] section, as JSON")
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--control-fd", type=int, help="rank 0: its end of the daemon's control socket")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", default="auto")
    return p


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL when the daemon's thread that started us ends (Linux); exit if it already has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: rank 0 still exits when its socket closes
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


# --- load -------------------------------------------------------------------------------------------
def load_rank(model: ModelSection, device_kind: str, local_rank: int, world: int) -> tuple[Any, dict[str, Any], Any]:
    """This rank's shard behind a `TorchRunner`, facts for the daemon, and the control group."""
    import torch

    from .torch_runner import TorchRunner
    from .transformers_engine import load_hf_model, pick_dtype

    if device_kind == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(model.threads or max(1, (os.cpu_count() or 1) // world))
    dist_group = _init_distributed(device_kind)
    dtype = pick_dtype(model.dtype, device)
    facts: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch.")}
    if model.quantization == "none":
        module = _deepspeed_shard(load_hf_model(model, torch.device("cpu"), dtype), world, dtype)
        facts["deepspeed_init_inference"] = True
    else:
        # bitsandbytes layers can neither be sharded by AutoTP nor cast by init_inference; the engine
        # only allows quantization with tensor_parallel = 1, where DeepSpeed would add nothing
        module = load_hf_model(model, device, dtype)
        facts["deepspeed_init_inference"] = False
    facts["weights_bytes_per_rank"] = module.get_memory_footprint()
    facts["sharded_linears"] = sum(type(m).__name__ in _TP_LAYERS for m in module.modules())
    return TorchRunner(module, device), facts, dist_group


_TP_LAYERS = {"LinearLayer", "LinearAllreduce", "LmHeadLinearAllreduce"}


def _init_distributed(device_kind: str) -> Any:
    """torch.distributed through DeepSpeed: nccl between GPUs, gloo on CPU; returns the gloo group
    the calls are broadcast on (CPU objects, whatever the model's backend)."""
    import deepspeed
    import torch.distributed as dist

    if device_kind == "cpu":
        # DeepSpeed's shared-memory all-reduce op segfaults on CPU (0.19.8); without it, gloo
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if device_kind == "cuda" else "gloo",
                               auto_mpi_discovery=False, verbose=False)
    return dist.new_group(backend="gloo") if device_kind == "cuda" else None


def _deepspeed_shard(hf: Any, world: int, dtype: Any) -> Any:
    import deepspeed

    engine = deepspeed.init_inference(
        hf, tensor_parallel={"tp_size": world}, dtype=dtype, replace_with_kernel_inject=False
    )
    return engine.module


# --- serve ------------------------------------------------------------------------------------------
def serve_calls(runner: Any, control: Connection | None, world: int, group: Any) -> int:
    """Run calls until "close"; returns the exit code."""
    while True:
        try:
            call = _next_call(control, world, group)
        except RuntimeError as exc:  # a peer died mid-broadcast; the daemon already knows
            log.error("rank_collective_failed", error=str(exc).splitlines()[0][:300])
            return 1
        op = call[0]
        if op == "close":
            _close_distributed()
            log.info("rank_closed")
            return 0
        if op not in CALLS:
            raise ValueError(f"unknown call {op!r}")
        try:
            result = getattr(runner, op)(*call[1:])
        except Exception as exc:
            message = f"{op} failed: {type(exc).__name__}: {exc}"
            if world > 1:  # the other ranks may be stuck in a collective: this group is done
                log.exception("rank_call_failed", call=op)
                if control is not None:
                    control.send(("fatal", message))
                return 1
            log.exception("step_failed", call=op)
            if control is not None:
                control.send(("error", message))
            continue
        if control is not None and op in ANSWERED:
            control.send(("ok", result))


def _next_call(control: Connection | None, world: int, group: Any) -> tuple[Any, ...]:
    call: tuple[Any, ...] | None = None
    if control is not None:
        try:
            call = control.recv()
        except (EOFError, OSError):  # the daemon is gone
            call = ("close",)
    if world > 1:
        import torch.distributed as dist

        box = [call]
        dist.broadcast_object_list(box, src=0, group=group)
        call = box[0]
    assert call is not None
    return call


def _close_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
