"""`dsnode bench nccl`: all-reduce latency and bus bandwidth across this host's GPUs.

Measured the way nccl-tests' `all_reduce_perf` does it: one process per GPU, for each message size a
few warm-up all-reduces, then `iters` timed ones between two `cuda.synchronize()` (every rank times
its own loop; the reported time is the ranks' average, the slowest rank's is kept too), and

    algbw = bytes / time        busbw = algbw * 2 * (n - 1) / n

(busbw is what a ring all-reduce moves over the slowest link, comparable across GPU counts). Each size
also checks the sum is right. `--backend gloo` runs the same measurement on CPU processes (no GPU).

The result can be published to a file that the node on this host reads at every scrape of `/metrics`
(`dsnode_nccl_allreduce_latency_seconds`): by default `$STATE_DIRECTORY/nccl-allreduce.json`
(systemd's `StateDirectory=`), else `/var/lib/dsnode/nccl-allreduce.json`.

Torch is imported only when a benchmark runs: edge hosts have none, and say so.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import re
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Sequence

from ..nccl_result import RESULT_KIND, RESULT_VERSION

EXIT_OK = 0
EXIT_FAILED = 1  # a rank crashed, timed out, or the all-reduce summed wrong
EXIT_NOTHING_TO_MEASURE = 3  # no torch, no CUDA GPUs, no NCCL, one rank, or fewer GPUs than --world-size
# An H200 host (2026-11-30) "measured" 64 MiB in 14 us at world size 1: a one-rank all-reduce returns at once
ONE_RANK = "an all-reduce over one rank moves no data, so there is nothing to measure"

_SIZE_RE = re.compile(r"^(\d+)\s*([KMG]?)(i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


class CannotMeasure(Exception):
    """This host cannot run the requested benchmark (exit code 3)."""


class BenchFailed(Exception):
    """The benchmark started but did not finish correctly (exit code 1)."""


@dataclass(frozen=True)
class NcclPlan:
    backend: str  # "nccl" | "gloo"
    world_size: int
    sizes: tuple[int, ...]  # message sizes in bytes
    iters: int = 20
    warmup: int = 5
    dtype: str = "float32"
    timeout_s: float = 600.0


# --- pure helpers ---------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'8', '64K', '128M', '1G', '4MiB' → bytes (binary units, as nccl-tests)."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 8, 64K, 128M, 1G)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def size_range(min_bytes: int, max_bytes: int, factor: int) -> tuple[int, ...]:
    if min_bytes < 1 or max_bytes < min_bytes or factor < 2:
        raise ValueError("need 1 <= min-bytes <= max-bytes and step factor >= 2")
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= factor
    return tuple(sizes)


def bus_bandwidth(algbw: float, world_size: int) -> float:
    """nccl-tests' all-reduce bus bandwidth: algbw * 2(n-1)/n."""
    return algbw * 2 * (world_size - 1) / world_size


def human_size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


# --- running ----------------------------------------------------------------------------------------
def check_host(backend: str, world_size: int | None) -> tuple[int, list[str]]:
    """The world size to use and the devices' names; raises CannotMeasure with the reason."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        raise CannotMeasure(
            "dsnode bench nccl needs PyTorch, which this host does not have (an edge host?). "
            "Install the central extra: pip install 'dsnode[central]'."
        ) from None
    if not dist.is_available():
        raise CannotMeasure("this PyTorch build has no torch.distributed")
    if world_size == 1:
        raise CannotMeasure(ONE_RANK + " (--world-size 1); ask for 2 or more")
    if backend == "gloo":
        if not dist.is_gloo_available():
            raise CannotMeasure("this PyTorch build has no gloo backend")
        n = world_size or 2
        return n, ["cpu"] * n
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        raise CannotMeasure(
            "no CUDA GPUs visible here (torch.cuda.device_count() is 0): no NCCL all-reduce to measure. "
            "For the CPU variant: dsnode bench nccl --backend gloo --world-size 2"
        )
    if not dist.is_nccl_available():
        raise CannotMeasure("this PyTorch build has no NCCL backend")
    if gpus == 1 and world_size is None:
        raise CannotMeasure(
            f"one CUDA GPU here ({torch.cuda.get_device_name(0)}): {ONE_RANK}. NCCL takes one rank per GPU, "
            "so this host's all-reduce needs 2 or more; the CPU variant: dsnode bench nccl --backend gloo"
        )
    n = world_size or gpus
    if n > gpus:
        raise CannotMeasure(f"--world-size {n} needs {n} GPUs; this host has {gpus}")
    return n, [torch.cuda.get_device_name(i) for i in range(n)]


def run_allreduce(plan: NcclPlan, devices: Sequence[str]) -> dict[str, Any]:
    """Spawn one process per rank, measure every size, return the result document."""
    ctx = multiprocessing.get_context("spawn")
    results: Any = ctx.Queue()
    port = _free_port()
    ranks = [
        ctx.Process(
            target=_rank_main, args=(rank, plan, port, results), name=f"dsnode-nccl-rank{rank}", daemon=True
        )
        for rank in range(plan.world_size)
    ]
    for process in ranks:
        process.start()
    try:
        rows = _wait_for_rows(ranks, results, plan.timeout_s)
    finally:
        for process in ranks:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()
    return {
        "kind": RESULT_KIND,
        "version": RESULT_VERSION,
        "measured_at": time.time(),
        "operation": "all_reduce_sum",
        "backend": plan.backend,
        "world_size": plan.world_size,
        "devices": list(devices),
        "dtype": plan.dtype,
        "iters": plan.iters,
        "warmup": plan.warmup,
        "results": rows,
    }


def _wait_for_rows(ranks: list[Any], results: Any, timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            kind, payload = results.get(timeout=0.5)
        except queue_module.Empty:
            dead = [(i, p.exitcode) for i, p in enumerate(ranks) if p.exitcode not in (None, 0)]
            if dead:
                raise BenchFailed(f"rank {dead[0][0]} exited with code {dead[0][1]}") from None
            if time.monotonic() > deadline:
                raise BenchFailed(f"no result after {timeout_s:.0f} s") from None
            continue
        if kind == "error":
            raise BenchFailed(payload)
        rows: list[dict[str, Any]] = payload
        wrong = [r["bytes"] for r in rows if not r["correct"]]
        if wrong:
            raise BenchFailed(f"all-reduce returned a wrong sum at sizes {wrong}")
        return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- one rank (a spawned process) ---------------------------------------------------------------
def _rank_main(rank: int, plan: NcclPlan, port: int, results: Any) -> None:
    try:
        rows = _measure(rank, plan, port)
    except BaseException:
        results.put(("error", f"rank {rank} failed:\n{traceback.format_exc(limit=6)}"))
        raise SystemExit(1) from None
    if rank == 0:
        results.put(("ok", rows))


def _measure(rank: int, plan: NcclPlan, port: int) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist

    cuda = plan.backend == "nccl"
    if cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)  # one core per rank, as one GPU per rank
        device = torch.device("cpu")
    extra: dict[str, Any] = {"device_id": device} if cuda else {}
    dist.init_process_group(
        plan.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=plan.world_size, **extra
    )
    try:
        dtype = getattr(torch, plan.dtype)
        element = torch.empty((), dtype=dtype).element_size()
        return [_measure_size(torch, dist, device, cuda, plan, size, element) for size in plan.sizes]
    finally:
        dist.destroy_process_group()


def _measure_size(
    torch: Any, dist: Any, device: Any, cuda: bool, plan: NcclPlan, size: int, element: int
) -> dict[str, Any]:
    count = max(1, size // element)
    nbytes = count * element
    n = plan.world_size
    buffer = torch.zeros(count, dtype=getattr(torch, plan.dtype), device=device)  # zeros: sums stay finite
    own_time = _time_allreduce(torch, dist, buffer, plan, cuda)
    times = torch.tensor([own_time], dtype=torch.float64, device=device)
    slowest = times.clone()
    dist.all_reduce(times)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    mean_time = float(times.item()) / n
    buffer.fill_(dist.get_rank() + 1)
    dist.all_reduce(buffer)
    correct = torch.tensor([1.0 if bool((buffer == n * (n + 1) / 2).all()) else 0.0], device=device)
    dist.all_reduce(correct, op=dist.ReduceOp.MIN)
    algbw = nbytes / mean_time
    return {
        "bytes": nbytes,
        "count": count,
        "time_s": mean_time,
        "time_max_s": float(slowest.item()),
        "algbw_bytes_per_s": algbw,
        "busbw_bytes_per_s": bus_bandwidth(algbw, n),
        "correct": bool(correct.item() == 1.0),
    }


def _time_allreduce(torch: Any, dist: Any, buffer: Any, plan: NcclPlan, cuda: bool) -> float:
    for _ in range(plan.warmup):
        dist.all_reduce(buffer)
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(plan.iters):
        dist.all_reduce(buffer)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / plan.iters


# --- presentation -------------------------------------------------------------------------------
def format_result(result: dict[str, Any]) -> str:
    devices = result["devices"]
    names = ", ".join(f"{name} x{devices.count(name)}" for name in dict.fromkeys(devices))
    lines = [
        f"# dsnode bench nccl: all_reduce (sum), backend {result['backend']}, {result['world_size']} ranks "
        f"({names}), {result['dtype']}, {result['iters']} iterations after {result['warmup']} warm-up",
        f"# {'size':>12} {'count':>12} {'time(us)':>11} {'max(us)':>11} {'algbw(GB/s)':>12} "
        f"{'busbw(GB/s)':>12}  check",
    ]
    for row in result["results"]:
        lines.append(
            f"  {row['bytes']:>12} {row['count']:>12} "
            f"{row['time_s'] * 1e6:>11.1f} {row['time_max_s'] * 1e6:>11.1f} "
            f"{row['algbw_bytes_per_s'] / 1e9:>12.3f} {row['busbw_bytes_per_s'] / 1e9:>12.3f}  "
            f"{'ok' if row['correct'] else 'WRONG'}"
        )
    rows = result["results"]
    if rows:
        smallest = rows[0]
        peak = max(rows, key=lambda r: r["busbw_bytes_per_s"])
        lines.append(
            f"# latency at {human_size(smallest['bytes'])}: {smallest['time_s'] * 1e6:.1f} us; "
            f"peak bus bandwidth {peak['busbw_bytes_per_s'] / 1e9:.3f} GB/s at {human_size(peak['bytes'])}"
        )
    return "\n".join(lines)
