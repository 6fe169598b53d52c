"""`dsnode bench load|nccl`: operator benchmarks (docs/observability.md has the details)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from ..nccl_result import result_path, write_result
from . import loadgen, nccl

DEFAULT_URL = "http://127.0.0.1:8000"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("bench", help="operator benchmarks: load (a server's throughput), nccl (GPUs)")
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    _register_load(sub)
    _register_nccl(sub)


# --- load ---------------------------------------------------------------------------------------------
def _register_load(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("load", help="requests against an OpenAI-compatible URL: throughput, TTFT, latency")
    p.add_argument("--url", default=DEFAULT_URL, help=f"server base URL (default {DEFAULT_URL})")
    p.add_argument("--model", help="model name (default: the first one /v1/models lists)")
    p.add_argument(
        "--concurrency", "-c", type=_positive_int, default=4, help="requests in flight (default 4)"
    )
    p.add_argument(
        "--requests",
        "-n",
        type=_positive_int,
        help="requests to send (default 64, or unlimited with --duration)",
    )
    p.add_argument("--duration", "-d", type=float, help="seconds to keep sending (requests in flight finish)")
    p.add_argument(
        "--mix",
        type=_mix,
        default=loadgen.DEFAULT_MIX,
        help="request shapes PROMPT_WORDS:MAX_TOKENS[:WEIGHT],... (default 64:64:4,1024:64:1); "
        "long-context prompts: e.g. 64:64:8,3000:128:1",
    )
    p.add_argument(
        "--endpoint",
        choices=("chat", "completions", "responses"),
        default="chat",
        help="/v1/chat/completions, /v1/completions or /v1/responses (default chat)",
    )
    stream = p.add_mutually_exclusive_group()
    stream.add_argument(
        "--stream",
        dest="stream",
        action="store_true",
        default=True,
        help="stream answers (default; needed for TTFT)",
    )
    stream.add_argument("--no-stream", dest="stream", action="store_false", help="ask for whole answers")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="always generate max_tokens (vLLM/dsnode extension; other servers may refuse it)",
    )
    p.add_argument("--seed", type=int, default=0, help="prompt and mix randomness (default 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default 600)")
    p.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default $OPENAI_API_KEY)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display on stderr")
    p.set_defaults(func=run_load)


def run_load(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    requests = args.requests if args.requests is not None else (None if args.duration else 64)
    try:
        if args.model:
            asyncio.run(loadgen.check_reachable(url))
        model = args.model or asyncio.run(loadgen.first_model(url, api_key=args.api_key))
    except loadgen.CannotStart as exc:
        print(f"dsnode bench load: {exc}", file=sys.stderr)
        return 1
    plan = loadgen.LoadPlan(
        url=url,
        model=model,
        endpoint=args.endpoint,
        concurrency=args.concurrency,
        requests=requests,
        duration_s=args.duration,
        mix=args.mix,
        stream=args.stream,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
        timeout_s=args.timeout,
        api_key=args.api_key,
    )
    progress = loadgen.Progress(plan.requests, plan.duration_s)
    show = _ProgressPrinter(enabled=not args.quiet)
    outcomes = asyncio.run(loadgen.run_load(plan, progress, on_tick=show))
    show(progress, final=True)
    report = loadgen.summarise(plan, outcomes, progress.elapsed_s)
    print(json.dumps(report, indent=2) if args.json else loadgen.format_report(report))
    return 0


class _ProgressPrinter:
    """On a terminal, one line rewritten in place; otherwise a line every 5 s (logs, CI)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, progress: loadgen.Progress, final: bool = False) -> None:
        if not self.enabled:
            return
        line = loadgen.format_progress(progress)
        if self.tty:
            sys.stderr.write("\r\033[K" + line + ("\n" if final else ""))
        elif final or progress.elapsed_s - self.last >= 5.0:
            self.last = progress.elapsed_s
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


# --- nccl ---------------------------------------------------------------------------------------------
def _register_nccl(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("nccl", help="all-reduce latency and bus bandwidth across this host's GPUs")
    p.add_argument(
        "--backend",
        choices=("nccl", "gloo"),
        default="nccl",
        help="nccl: one process per GPU (default); gloo: CPU processes, for hosts without GPUs",
    )
    p.add_argument(
        "--world-size", "-g", type=_positive_int, help="ranks (default: every GPU for nccl, 2 for gloo)"
    )
    p.add_argument("--min-bytes", "-b", type=_size, default=8, help="smallest message (default 8)")
    p.add_argument(
        "--max-bytes", "-e", type=_size, default=128 * 2**20, help="largest message (default 128M)"
    )
    p.add_argument(
        "--step-factor", "-f", type=int, default=2, help="size multiplier between steps (default 2)"
    )
    p.add_argument(
        "--iters", "-n", type=_positive_int, default=20, help="timed all-reduces per size (default 20)"
    )
    p.add_argument(
        "--warmup", "-w", type=int, default=5, help="untimed all-reduces per size first (default 5)"
    )
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run (default 600)")
    p.add_argument(
        "--publish",
        nargs="?",
        const="",
        metavar="PATH",
        help="also write the result where this host's node reads it for /metrics "
        "(default $STATE_DIRECTORY/nccl-allreduce.json, else /var/lib/dsnode/...)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_nccl)


def run_nccl(args: argparse.Namespace) -> int:
    try:
        sizes = nccl.size_range(args.min_bytes, args.max_bytes, args.step_factor)
        world_size, devices = nccl.check_host(args.backend, args.world_size)
    except ValueError as exc:
        print(f"dsnode bench nccl: {exc}", file=sys.stderr)
        return 2
    except nccl.CannotMeasure as exc:
        print(f"dsnode bench nccl: {exc}", file=sys.stderr)
        return nccl.EXIT_NOTHING_TO_MEASURE
    plan = nccl.NcclPlan(
        args.backend, world_size, sizes, args.iters, max(0, args.warmup), args.dtype, args.timeout
    )
    try:
        result = nccl.run_allreduce(plan, devices)
    except nccl.BenchFailed as exc:
        print(f"dsnode bench nccl: failed: {exc}", file=sys.stderr)
        return nccl.EXIT_FAILED
    print(json.dumps(result, indent=2) if args.json else nccl.format_result(result))
    if args.publish is not None:
        path = Path(args.publish) if args.publish else result_path(args.state_directory)
        try:
            write_result(path, result)
        except OSError as exc:
            print(f"dsnode bench nccl: cannot publish to {path}: {exc}", file=sys.stderr)
            return nccl.EXIT_FAILED
        print(f"published to {path}", file=sys.stderr)
    return nccl.EXIT_OK


# --- argument types -------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {text})")
    return value


def _mix(text: str) -> tuple[loadgen.RequestShape, ...]:
    try:
        return loadgen.parse_mix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    try:
        return nccl.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
