"""What constrained decoding costs per token: the same prompt streamed free and under each kind of
structure (a JSON schema, vLLM's `structured_outputs` regex and Lark grammar), one request at a time
against one running node, modes in turn within each round.

    .venv/bin/python benchmarks/bench_structured.py URL [--model NAME] [--rounds 7] [--max-tokens 96]

Per request it measures the time between the first and the last streamed token over the tokens in
between (the decode time per token: the prompt and the grammar's compilation are outside it), and
prints per mode the median over rounds and the ratio to free text measured in the same rounds. The
difference is the token mask's cost on the engine's worker thread (llguidance's mask plus applying it
to the logits), which does not grow with the model: on the bundled models a step is a fraction of a
millisecond, so the ratio there is the worst case; on a 7B model the same milliseconds are a few
percent of a step. Point it at `dsnode demo`'s edge (http://127.0.0.1:8401) or central (8400).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import aiohttp

from dsnode.ops import loadgen

PROMPT = "Describe the ship and its captain."
SCHEMA = {"type": "object", "properties": {"ship": {"type": "string"}, "captain": {"type": "string"},
                                           "crew": {"type": "array", "items": {"type": "string"}},
                                           "year": {"type": "integer"}},
          "required": ["ship", "captain", "crew", "year"]}
MODES: dict[str, dict[str, Any]] = {
    "free": {"ignore_eos": True},
    "json schema": {"structured_outputs": {"json": SCHEMA}},
    "regex": {"structured_outputs": {"regex": r"([A-Z][a-z]+ ){1,6}(is|was) [a-z ,]{10,300}\."}},
    "grammar": {"structured_outputs": {"grammar": 'start: sentence+\nsentence: WORD (" " WORD)* ". "\n'
                                                  'WORD: /[A-Za-z]{1,12}/'}},
}


async def decode_ms_per_token(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int,
                              extra: dict[str, Any]) -> tuple[float, int]:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **extra}
    stamps: list[float] = []
    tokens = 0
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise SystemExit(f"{response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event["choices"] and (event["choices"][0]["delta"].get("content")
                                     or event["choices"][0]["delta"].get("reasoning_content")):
                stamps.append(time.perf_counter())
    if len(stamps) < 3:
        raise SystemExit(f"too few tokens streamed for {extra}: {len(stamps)}")
    # the chunks between the first and the last: tokens - 1 steps (a chunk may hold more than one token)
    return (stamps[-1] - stamps[0]) * 1000 / max(1, tokens - 1), tokens


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--model", default=None, help="default: the first model /v1/models lists")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    model = args.model or await loadgen.first_model(args.url)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    counts: dict[str, list[int]] = {mode: [] for mode in MODES}
    print(f"{args.url}  model {model}  {args.rounds} rounds, max_tokens {args.max_tokens}, one request at a time")
    async with aiohttp.ClientSession() as session:
        for mode, extra in MODES.items():  # a first request of each: compiles, warms caches; not counted
            await decode_ms_per_token(session, args.url, model, args.max_tokens, extra)
        for _ in range(args.rounds):
            for mode, extra in MODES.items():
                ms, tokens = await decode_ms_per_token(session, args.url, model, args.max_tokens, extra)
                times[mode].append(ms)
                counts[mode].append(tokens)
    free = statistics.median(times["free"])
    print("mode          ms/token (median)  range          tokens  vs free  extra ms/token")
    for mode in MODES:
        median = statistics.median(times[mode])
        print(f"{mode:<12}  {median:>17.3f}  {min(times[mode]):.3f}-{max(times[mode]):.3f}  "
              f"{statistics.median(counts[mode]):>6.0f}  {median / free:>6.2f}x  {median - free:>+14.3f}")


if __name__ == "__main__":
    asyncio.run(main())
