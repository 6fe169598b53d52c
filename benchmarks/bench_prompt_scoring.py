"""What scoring a prompt costs on the edge (`echo` + `logprobs`): a plain prefill against a scored one.

    taskset -c 1 .venv/bin/python benchmarks/bench_prompt_scoring.py FOLDER [FOLDER ...] [--tokens 512] [--rounds 3]

Each FOLDER is a `dsnode convert` output, run through `SlotRunner` and `prefill_scoring` alone (no
engine, no HTTP) in a fresh process per measurement, the folders taking turns: a plain prefill of a
random `--tokens` prompt, then the same prompt scored (every position's log-probability, pieces of
256). A folder converted before 2026-12-01 has no `last_position` input and is scored one token at a
time. Prints one JSON line per run and the medians; seconds of wall clock, one intra-op thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(folder: Path, tokens: int) -> dict[str, object]:
    import numpy as np
    from dsnode.edge.onnx_runner import open_session
    from dsnode.edge.slot_runner import SlotRunner
    from dsnode.inference.prompt_scoring import first_scores, prefill_scoring

    runner = SlotRunner(open_session(folder / "model.onnx", "cpu", 1), tokens + 64)
    prompt = np.random.default_rng(0).integers(4, runner.vocab, tokens).tolist()
    runner.prefill("warm-up", prompt[:64], 0)
    runner.release("warm-up")
    started = time.perf_counter()
    runner.prefill("plain", prompt, 0)
    plain = time.perf_counter() - started
    scores = first_scores(prompt)
    started = time.perf_counter()
    prefill_scoring(runner, "scored", prompt, 0, tokens, scores, 1)
    scored = time.perf_counter() - started
    return {"folder": folder.name, "picks_positions": runner.picks_positions, "plain_s": round(plain, 3),
            "scored_s": round(scored, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child's single measurement
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.folders[0], args.tokens)))
        return 0
    runs: dict[str, list[dict[str, object]]] = {}
    for _ in range(args.rounds):
        for folder in args.folders:
            out = subprocess.run([sys.executable, __file__, str(folder), "--tokens", str(args.tokens), "--one"],
                                 check=True, capture_output=True, text=True).stdout
            run = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(run))
            runs.setdefault(folder.name, []).append(run)
    for name, mine in runs.items():
        plain = statistics.median(float(r["plain_s"]) for r in mine)  # type: ignore[arg-type]
        scored = statistics.median(float(r["scored_s"]) for r in mine)  # type: ignore[arg-type]
        print(f"{name}: plain prefill {plain:.2f} s, scored {scored:.2f} s ({scored / plain:.2f}x), "
              f"{'by position' if mine[0]['picks_positions'] else 'token by token'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
