"""One tensor-parallel rank of the DeepSpeed engine: `python -m dsnode.central.tp_worker`.

The daemon starts `tensor_parallel` of these (`dsnode.central.ranks`). Every rank reads only its
shard of the checkpoint and `deepspeed.init_inference` splits the rest (`dsnode.central.rank_load`).
Rank 0 reads each runner call from the daemon's control socket and broadcasts it; every rank runs the
same `TorchRunner` method on its shard (the all-reduces inside the forward keep them in step, and
every rank holds the same KV cache bookkeeping); rank 0 sends the result back. With `[distributed]`,
local rank 0 of a follower host also has a control socket to its own daemon, which only hears
"ready" and "fatal" from it: the calls come from global rank 0, on the leader. When no call comes for
`TICK_S`, rank 0 broadcasts a no-op ("tick"): the other ranks' wait stays far inside the process
group's timeout, and a dead peer is found within a tick even when the node is idle.

Calls and answers are pickled tuples: ("prefill" or "prefill_all", seq_id, token_ids, start),
("decode", seq_ids, token_ids), ("release", seq_id) and ("keep_prefix", seq_id) (no answer),
("reuse_prefix", seq_id, token_ids, scope), ("close",). Answers: ("ready", facts), ("ok", logits),
("error", message) (the step failed, the rank carries on), ("fatal", message) (the rank exits).

A rank ignores SIGINT/SIGTERM (the daemon drains first, then closes it), exits when the control socket
closes (rank 0) or a collective fails (followers), and is killed with its parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

import structlog
from dsnode.config import ModelSection
from dsnode.logs import configure_logging

from .rank_load import WEIGHTS, LoadRefused, RankPlace, load_rank

log = structlog.get_logger("dsnode.central.rank")

PR_SET_PDEATHSIG = 1
ANSWERED = ("prefill", "prefill_all", "decode", "reuse_prefix")
CALLS = ("prefill", "prefill_all", "decode", "release", "reuse_prefix", "keep_prefix")
TICK_S = 30.0  # rank 0 broadcasts a no-op after this long without a call


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
    place = RankPlace(rank, local_rank, world, args.weights, args.group_timeout)
    try:
        runner, facts, group = load_rank(model, args.device, place, args.prompt_cache_bytes)
    except LoadRefused as exc:  # every rank has the same one-line reason; no traceback for bad input
        log.error("rank_load_failed", model=model.name, error=str(exc))
        if control is not None:
            control.send(("fatal", f"cannot load the model: {exc}"))
        _barrier(world)  # rank 0's reason reaches the daemon before any rank exits
        return 1
    except Exception as exc:
        log.exception("rank_load_failed", model=model.name)
        if control is not None:
            control.send(("fatal", f"rank {rank} failed to load the model: {type(exc).__name__}: {exc}"))
        return 1
    log.info("rank_ready", device=args.device, **{k: v for k, v in facts.items() if k != "ranks"})
    if control is not None:
        control.send(("ready", facts))
    return serve_calls(runner, control, rank, world, group)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsnode.central.tp_worker")
    p.add_argument("--model", required=True, help="the [model] section, as JSON")
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--control-fd", type=int, help="local rank 0: its end of the daemon's control socket")
    p.add_argument("--weights", choices=WEIGHTS, default="model",
                   help="model: the model dtype; int8: 8-bit integer weights (W8A16); "
                        "fp8: FP8 kept (GPUs 8.9+)")
    p.add_argument("--group-timeout", type=float, default=600.0,
                   help="seconds torch.distributed waits for a peer (meeting, or one collective)")
    p.add_argument("--prompt-cache-bytes", type=int, default=0,
                   help="host memory for this rank's prompt cache ([batching] prompt_cache_mb); 0: none")
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


# --- serve ------------------------------------------------------------------------------------------
def serve_calls(runner: Any, control: Connection | None, rank: int, world: int, group: Any) -> int:
    """Run calls until "close"; returns the exit code. Only global rank 0 reads calls and answers."""
    calls = control if rank == 0 else None
    while True:
        try:
            call = _next_call(calls, world, group)
        except RuntimeError as exc:  # a peer died mid-broadcast; the daemon already knows
            log.error("rank_collective_failed", error=str(exc).splitlines()[0][:300])
            return 1
        op = call[0]
        if op == "tick":
            continue
        if op == "close":
            _close_distributed()
            log.info("rank_closed")
            return 0
        if op not in CALLS:
            raise ValueError(f"unknown call {op!r}")
        try:
            result = getattr(runner, op)(*call[1:])
            if op == "reuse_prefix":  # with what rank 0's cache holds, for the engine's figures
                result = (_agreed_reuse(runner, call[1], result, group) if world > 1 else result,
                          runner.prompts.nbytes)
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
        if calls is not None and op in ANSWERED:
            calls.send(("ok", result))


def _agreed_reuse(runner: Any, seq_id: str, cached: int, group: Any) -> int:
    """Every rank looked its sequence up in its own prompt cache. They take the same calls in the same
    order with caches of the same size, so they agree; should one differ (another `prompt_cache_mb` on
    another host), none reuses anything for this sequence: the ranks must feed from one position."""
    import torch
    import torch.distributed as dist

    extremes = torch.tensor([cached, -cached], dtype=torch.int64)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)  # [max, -min]
    if int(extremes[0]) == -int(extremes[1]):
        return cached
    log.warning("ranks_disagree_on_prompt_cache", seq_id=seq_id, cached=cached, most=int(extremes[0]),
                least=-int(extremes[1]))
    runner.release(seq_id)  # the lookup's pending copy: this rank computes the prompt whole, as the others
    return 0


def _next_call(calls: Connection | None, world: int, group: Any) -> tuple[Any, ...]:
    call: tuple[Any, ...] | None = None
    if calls is not None:
        try:
            call = calls.recv() if world == 1 or calls.poll(TICK_S) else ("tick",)
        except (EOFError, OSError):  # the daemon is gone
            call = ("close",)
    if world > 1:
        import torch.distributed as dist

        box = [call]
        dist.broadcast_object_list(box, src=0, group=group)
        call = box[0]
    assert call is not None
    return call


def _barrier(world: int) -> None:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:  # a peer is gone already: nothing to wait for
            pass


def _close_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # no interpreter teardown: torch's and DeepSpeed's finalizers take seconds per rank, and a rank has
    # nothing left to save (its collectives are closed, its answer sent)
    os._exit(exit_code)
