"""What computing a prompt once for its `n` choices gives: the same `n` requests against a node with the
prompt cache (the first choice's prompt shared with the others) and without it (every choice prefills
the prompt), rounds alternating.

    taskset -c 1 .venv/bin/python benchmarks/bench_n_choices.py FOLDER [--n 4] [--words 400] [--answer 16]
        [--requests 4] [--rounds 3]

FOLDER is a `dsnode convert` output, served by one `dsnode serve` (backend onnx, one thread) per mode,
started fresh each round. Each request is a text completion of `--words` random words with `n`
choices of `--answer` tokens (`ignore_eos`), streamed; every request has a `cache_salt` of its own, so
nothing is reused from one request to the next, only within it. Prints per mode the median time to
the first event and to the whole answer, and the ratios without / with.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.nodes import ServeProcess, free_port, node_toml, write_config

MODEL = "bench-n"
WORDS = ["the", "model", "central", "edge", "cache", "prompt", "token", "batch", "expert", "layer", "weight",
         "answer", "question", "turn", "node", "route", "upstream", "memory", "host", "latency", "stream"]


def ask(port: int, prompt: str, args: argparse.Namespace, salt: str) -> tuple[float, float, int]:
    """(seconds to the first event, seconds to the end, prompt tokens) of one streamed request."""
    body = {"model": MODEL, "prompt": prompt, "n": args.n, "max_tokens": args.answer, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "cache_salt": salt}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    first, tokens = None, 0
    for line in response:
        if line.startswith(b"data: {"):
            first = first or time.perf_counter() - started
            usage = json.loads(line[6:]).get("usage")
            tokens = usage["prompt_tokens"] if usage else tokens
    connection.close()
    return first or 0.0, time.perf_counter() - started, tokens


def run(folder: Path, cache_mb: int, args: argparse.Namespace, round_: int) -> list[tuple[float, float, int]]:
    with tempfile.TemporaryDirectory(prefix="bench-n-") as tmp:
        port = free_port()
        toml = node_toml("central-1", "central", port, MODEL, folder, "onnx",
                         extra=f"[batching]\nprompt_cache_mb = {cache_mb}\n")
        node = ServeProcess("central-1", write_config(Path(tmp) / "node.toml", toml), port, Path(tmp) / "node.log")
        node.start()
        try:
            node.wait_ready(timeout=300)
            rng = np.random.default_rng(round_)
            ask(port, " ".join(WORDS[:20]), args, "warm-up")
            return [ask(port, " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), args.words)), args,
                        f"{round_}-{i}") for i in range(args.requests)]
        finally:
            node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--words", type=int, default=400)
    parser.add_argument("--answer", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    modes = {"shared (prompt cache on)": 1024, "each choice prefills (prompt cache off)": 0}
    results: dict[str, list[tuple[float, float, int]]] = {mode: [] for mode in modes}
    for round_ in range(args.rounds):
        for mode, cache_mb in modes.items():
            results[mode] += run(args.folder, cache_mb, args, round_)
    print(f"n = {args.n}, ~{args.words}-word prompts ({results[next(iter(modes))][0][2]} tokens), "
          f"{args.answer} tokens per choice, {args.requests} requests x {args.rounds} rounds per mode")
    medians = {}
    for mode, rows in results.items():
        medians[mode] = (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows))
        print(f"  {mode:<42} first event {medians[mode][0]:.3f} s   whole answer {medians[mode][1]:.3f} s")
    shared, each = medians.values()
    print(f"  without / with sharing: first event {each[0] / shared[0]:.2f}x, whole answer {each[1] / shared[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
