"""What `[routing] affinity = "prefix"` gives conversations that an edge forwards to two centrals.

    .venv/bin/python benchmarks/bench_affinity.py FOLDER [--conversations 5] [--turns 4] [--user 192]
        [--answer 32] [--rounds 2]

Two `dsnode serve` centrals serve FOLDER (a `dsnode convert` output: backend onnx, one thread each,
the prompt cache on, as by default) and an edge forwards to them with weights 1 and 1 (the model is
theirs only; the edge's own, the bundled dense model, is never asked). Chat conversations of random
words go to the edge's /v1/chat/completions, streamed, as a chat client sends them: each turn the
whole history (every earlier message and greedy answer) plus a user message of `--user` words. The
conversations take turns (c1's turn 1, c2's turn 1, ..., c1's turn 2, ...); with an odd number of
them, round-robin sends a conversation's next turn to the other central. For each mode (`none`, `prefix`) fresh nodes; the modes alternate over rounds.
Prints per turn the median time to first token (the stream's first event, which a node sends once
the first token is made, as the client sees it through the edge) and the tokens the centrals reported
taken from their prompt caches. (The issue-14 benchmark model's greedy tokens decode to no text, so
its answers come back empty and the next turn holds the earlier prompts, not the answers.)
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

from tests.support.models import bundled_models
from tests.support.nodes import ServeProcess, free_port, node_toml, write_config

MODEL = "bench-central"
WORDS = ["the", "model", "central", "edge", "cache", "prompt", "token", "batch", "expert", "layer", "weight", "answer", "question", "turn", "node", "route", "upstream", "memory", "host", "latency", "stream", "reason", "think", "tool", "json", "schema", "request", "client", "server"]


def stream_turn(port: int, messages: list[dict], answer: int) -> tuple[float, str, int]:
    """(seconds to the first token, the answer's text, cached prompt tokens) of one streamed chat turn."""
    body = {"model": MODEL, "messages": messages, "max_tokens": answer, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    started = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    first, text, cached = None, "", 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        if first is None:  # a node sends a stream's head and first event once the first token is made
            first = time.perf_counter() - started
        event = json.loads(line[6:])
        if event.get("usage"):
            cached = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        for choice in event.get("choices", []):
            delta = choice.get("delta") or {}
            text += (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    connection.close()
    return first or 0.0, text, cached


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def start(folder: Path, affinity: str, work: Path) -> list[ServeProcess]:
    nodes, ports = [], [free_port(), free_port()]
    for i, port in enumerate(ports):
        toml = node_toml(f"central-{i + 1}", "central", port, MODEL, folder, "onnx")
        nodes.append(ServeProcess(f"central-{i + 1}", write_config(work / f"c{i}.toml", toml), port, work / f"c{i}.log"))
    upstreams = "".join(f'\n[[routing.upstream]]\nurl = "http://127.0.0.1:{p}"\nweight = 1\n' for p in ports)
    edge_port = free_port()
    toml = node_toml("edge-1", "edge", edge_port, "bench-edge", bundled_models().dense, "transformers",
                     extra=f'[routing]\naffinity = "{affinity}"\npoll_interval = 0.5\n{upstreams}')
    nodes.append(ServeProcess("edge-1", write_config(work / "edge.toml", toml), edge_port, work / "edge.log"))
    for node in nodes:
        node.start()
    for node in nodes:
        node.wait_ready(timeout=300)
    nodes[-1].wait_peers_healthy(60)
    return nodes


def run(folder: Path, affinity: str, args: argparse.Namespace) -> dict[str, list]:
    with tempfile.TemporaryDirectory(prefix="bench-affinity-") as tmp:
        nodes = start(folder, affinity, Path(tmp))
        try:
            rng = np.random.default_rng(0)
            histories: list[list[dict]] = [[] for _ in range(args.conversations)]
            ttft: list[list[float]] = [[] for _ in range(args.turns)]
            cached: list[int] = [0] * args.turns
            for turn in range(args.turns):
                for history in histories:
                    history.append({"role": "user", "content": words(rng, args.user)})
                    first, answer, reused = stream_turn(nodes[-1].port, history, args.answer)
                    history.append({"role": "assistant", "content": answer})
                    ttft[turn].append(first)
                    cached[turn] += reused
            return {"ttft": ttft, "cached": cached}
        finally:
            for node in nodes:
                node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--conversations", type=int, default=5)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--user", type=int, default=192)
    parser.add_argument("--answer", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[dict[str, list]]] = {"none": [], "prefix": []}
    for round_ in range(args.rounds):
        for affinity, runs in results.items():
            runs.append(run(args.folder, affinity, args))
            print(f"round {round_ + 1} affinity={affinity}: cached per turn {runs[-1]['cached']}, median TTFT "
                  f"per turn {[round(statistics.median(t), 3) for t in runs[-1]['ttft']]}", flush=True)
    print("turn  TTFT none  TTFT prefix  none / prefix  cached none  cached prefix  (cached: all conversations)")
    for turn in range(args.turns):
        medians = {a: statistics.median(t for r in runs for t in r["ttft"][turn]) for a, runs in results.items()}
        cached = {a: statistics.median(r["cached"][turn] for r in runs) for a, runs in results.items()}
        print(f"{turn + 1:>4}  {medians['none']:>8.3f} s  {medians['prefix']:>10.3f} s"
              f"  {medians['none'] / medians['prefix']:>12.2f}x  {cached['none']:>11.0f}  {cached['prefix']:>13.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
