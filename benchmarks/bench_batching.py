"""What continuous batching buys: 16 requests decoded together vs the same 16 served one at a time.

    .venv/bin/python benchmarks/bench_batching.py [--backend transformers|deepspeed] [--requests 16]
        [--max-tokens 64] [--rounds 3] [--threads 1] [--tensor-parallel N]

One engine (the bundled DeepSeek-V3-architecture MoE), loaded once. Each round runs both modes on it,
alternating which goes first: `sequential` awaits each request before sending the next, `concurrent`
sends all of them at once, so the scheduler batches their decode steps. Every request is greedy with
`ignore_eos` and a fixed `max_tokens`, so both modes generate exactly the same tokens (checked). The
figure is aggregate generated tokens per second of wall time; medians over rounds, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsnode.config import (
    BatchingSection,  # noqa: E402
    ModelSection,  # noqa: E402
)
from dsnode.inference.engine import Engine, GenerationRequest, SamplingParams  # noqa: E402

from tests.support.models import bundled_models  # noqa: E402

PROMPTS = ("It was the best", "Four score and seven years", "We hold these truths to be", "The Lord is my shepherd")


def build_engine(args: argparse.Namespace) -> Engine:
    model = ModelSection(
        name="bench-moe", path=bundled_models().moe, backend=args.backend, threads=args.threads,
        device="cpu", tensor_parallel=args.tensor_parallel,
    )
    batching = BatchingSection(max_running=max(64, args.requests))
    if args.backend == "deepspeed":
        from dsnode.central.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, batching)
    from dsnode.central.transformers_engine import TransformersEngine

    return TransformersEngine(model, batching)


async def one(engine: Engine, index: int, max_tokens: int) -> list[int]:
    prompt = engine.tokenizer.encode(PROMPTS[index % len(PROMPTS)])
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    request = GenerationRequest(f"bench-{index}", tuple(prompt), params)
    return [t async for delta in engine.generate(request) for t in delta.token_ids]


async def sequential(engine: Engine, n: int, max_tokens: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    outputs = [await one(engine, i, max_tokens) for i in range(n)]
    return time.perf_counter() - start, outputs


async def concurrent(engine: Engine, n: int, max_tokens: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    outputs = await asyncio.gather(*(one(engine, i, max_tokens) for i in range(n)))
    return time.perf_counter() - start, list(outputs)


async def main(args: argparse.Namespace) -> dict[str, object]:
    engine = build_engine(args)
    await engine.load()
    try:
        await one(engine, 0, 8)  # warm-up: first-call allocations, lazy imports
        rates: dict[str, list[float]] = {"sequential": [], "concurrent": []}
        reference: list[list[int]] | None = None
        for round_ in range(args.rounds):
            order = (sequential, concurrent) if round_ % 2 == 0 else (concurrent, sequential)
            for mode in order:
                elapsed, outputs = await mode(engine, args.requests, args.max_tokens)
                tokens = sum(len(o) for o in outputs)
                assert tokens == args.requests * args.max_tokens
                reference = reference or outputs
                assert outputs == reference, "both modes must generate the same tokens"
                rates[mode.__name__].append(tokens / elapsed)
                print(f"round {round_ + 1} {mode.__name__:>10}: {tokens / elapsed:8.1f} tokens/s "
                      f"({tokens} tokens in {elapsed:.2f}s)", flush=True)
    finally:
        await engine.close()
    seq, conc = statistics.median(rates["sequential"]), statistics.median(rates["concurrent"])
    return {
        "benchmark": "batching",
        "backend": args.backend,
        "tensor_parallel": args.tensor_parallel or 1,
        "threads": args.threads,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "sequential_tokens_per_s_median": round(seq, 1),
        "concurrent_tokens_per_s_median": round(conc, 1),
        "speedup": round(conc / seq, 2),
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("transformers", "deepspeed"), default="transformers")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (per rank)")
    p.add_argument("--tensor-parallel", type=int, default=None, help="deepspeed: CPU ranks")
    return p.parse_args(argv)


if __name__ == "__main__":
    summary = asyncio.run(main(parse()))
    print(f"sequential {summary['sequential_tokens_per_s_median']} tokens/s, concurrent "
          f"{summary['concurrent_tokens_per_s_median']} tokens/s: {summary['speedup']}x")
    print(json.dumps(summary))
