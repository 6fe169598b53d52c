"""What the prompt cache saves on a conversation: time to first token of each turn, with and without it.

    taskset -c 1 .venv/bin/python benchmarks/bench_prompt_cache.py FOLDER [--turns 4] [--user 256]
        [--answer 64] [--rounds 3]

FOLDER is a `dsnode convert` output, served by the real `OnnxEngine` (scheduler, slots, sampling) in a
fresh process per measurement, `prompt_cache_mb` 1024 and 0 taking turns. A conversation of random
tokens: each turn sends the whole history (every earlier prompt and greedy answer) plus `--user` new
tokens, as a chat client resends it, and the model answers `--answer` tokens. Prints one JSON line
per run, then per turn the median TTFT of each mode and their ratio (without / with). The time to keep
a finished sequence's cache (copied out when the next request is scheduled) is inside the next TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


async def conversation(folder: Path, cache_mb: int, turns: int, user: int, answer: int) -> dict[str, object]:
    import numpy as np
    from dsnode.config import BatchingSection, ModelSection
    from dsnode.edge.onnx_engine import OnnxEngine
    from dsnode.inference.engine import GenerationRequest, SamplingParams

    engine = OnnxEngine(ModelSection(name="bench", path=str(folder), backend="onnx", threads=1),
                        BatchingSection(prompt_cache_mb=cache_mb))
    await engine.load()
    rng = np.random.default_rng(0)
    vocab = engine.tokenizer.vocab_size
    history: list[int] = []
    ttft, cached = [], []
    try:
        for turn in range(turns + 1):  # turn 0 warms the session up (not counted)
            history += rng.integers(4, vocab, user if turn else 16).tolist()
            params = SamplingParams(temperature=0.0, max_tokens=answer, ignore_eos=True)
            started, first = time.perf_counter(), None
            async for delta in engine.generate(GenerationRequest(f"t{turn}", tuple(history), params)):
                if first is None:
                    first = time.perf_counter() - started
                    cached.append(delta.cached_tokens)
                history += delta.token_ids
            if turn:
                ttft.append(round(first or 0.0, 4))
    finally:
        await engine.close()
    return {"prompt_cache_mb": cache_mb, "ttft_s": ttft, "cached_tokens": cached[1:], "final_prompt": len(history)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--user", type=int, default=256)
    parser.add_argument("--answer", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child: its cache size
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(asyncio.run(conversation(args.folder, args.one, args.turns, args.user, args.answer))))
        return 0
    runs: dict[int, list[dict]] = {1024: [], 0: []}
    for _ in range(args.rounds):
        for mb, mine in runs.items():
            command = [sys.executable, __file__, str(args.folder), "--turns", str(args.turns), "--user",
                       str(args.user), "--answer", str(args.answer), "--one", str(mb)]
            run = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(json.dumps(run))
            mine.append(run)
    print("turn  prompt  cached  TTFT with  TTFT without  without / with")
    for turn in range(args.turns):
        with_cache = statistics.median(r["ttft_s"][turn] for r in runs[1024])
        without = statistics.median(r["ttft_s"][turn] for r in runs[0])
        prompt = 16 + (turn + 1) * (args.user + args.answer)  # the warm-up turn: 16 tokens and its answer
        print(f"{turn + 1:>4}  {prompt:>6}  {runs[1024][0]['cached_tokens'][turn]:>6}  {with_cache:>8.3f} s"
              f"  {without:>10.3f} s  {without / with_cache:>10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
