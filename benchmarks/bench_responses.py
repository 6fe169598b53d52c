"""What serving OpenAI's Responses API by translation costs: the same load as chat completions and as
Responses API requests, against one running node, rounds alternating.

    .venv/bin/python benchmarks/bench_responses.py URL [--model NAME] [--rounds 5] [-n 160] [-c 8]
        [--mix 8:64:1]

Each round runs `dsnode bench load`'s load generator (`dsnode.ops.loadgen`) once with `--endpoint chat`
and once with `--endpoint responses` (streamed, `ignore_eos`, so both generate the same tokens), in
turn; prints per round the output tokens per second and the median time to the first token of each,
and the medians of the per-round ratios responses / chat. Point it at an edge (`dsnode demo`:
http://127.0.0.1:8401) with short prompts for the local route, or with prompts over the edge's
`long_prompt_tokens` (the demo's: 48) for the forwarded one (`--mix 60:32:1`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from typing import Any

from dsnode.ops import loadgen
from dsnode.ops.loadgen import LoadPlan, parse_mix, summarise


async def one(plan: LoadPlan) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    outcomes = await loadgen.run_load(plan)
    report = summarise(plan, outcomes, loop.time() - started)
    failed = report["requests"]["failed"]
    if failed:
        raise SystemExit(f"{plan.endpoint}: {failed} requests failed: {report['error_examples']}")
    return report


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--model", default=None, help="default: the first model /v1/models lists")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-n", "--requests", type=int, default=160)
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("--mix", type=parse_mix, default=parse_mix("8:64:1"))
    args = parser.parse_args()
    model = args.model or await loadgen.first_model(args.url)
    ratios: dict[str, list[float]] = {"tokens/s": [], "ttft p50": []}
    print(f"{args.url}  model {model}  {args.requests} requests, concurrency {args.concurrency}")
    print("round  chat tok/s  responses tok/s  ratio   chat TTFT p50  responses TTFT p50  ratio  routes")
    for round_ in range(1, args.rounds + 1):
        reports = {}
        for endpoint in ("chat", "responses"):
            plan = LoadPlan(args.url, model, endpoint, args.concurrency, args.requests, mix=args.mix,
                            ignore_eos=True)
            reports[endpoint] = await one(plan)
        chat, resp = reports["chat"], reports["responses"]
        speed = resp["throughput"]["output_tokens_per_s"] / chat["throughput"]["output_tokens_per_s"]
        ttft = resp["ttft_s"]["p50"] / chat["ttft_s"]["p50"]
        ratios["tokens/s"].append(speed)
        ratios["ttft p50"].append(ttft)
        routes = ", ".join(f"{n['node']} {n['route']} {n['requests']}" for n in resp["nodes"])
        print(f"{round_:>5}  {chat['throughput']['output_tokens_per_s']:>10.0f}  "
              f"{resp['throughput']['output_tokens_per_s']:>15.0f}  {speed:>5.2f}x  "
              f"{chat['ttft_s']['p50'] * 1000:>10.1f} ms  {resp['ttft_s']['p50'] * 1000:>15.1f} ms  "
              f"{ttft:>5.2f}x  {routes}")
    for name, values in ratios.items():
        print(f"responses / chat, {name}: median {statistics.median(values):.2f}x "
              f"(rounds {min(values):.2f}-{max(values):.2f})")


if __name__ == "__main__":
    asyncio.run(main())
