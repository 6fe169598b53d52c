"""One measured run of one contender, in its own process (started by bench_edge.py, pinned to a core).

    python benchmarks/edge_contenders.py KIND FOLDER --batch B --prompt 512 --new 128 --threads 1

KIND: `dsnode` (a folder from `dsnode convert`, served by the real `OnnxEngine`: scheduler, sampling,
detokenizer, continuous batching), `genai` (an onnxruntime-genai builder folder, its own Generator), or
`torch` (a Hugging Face folder, transformers' generate). B prompts of random token ids, greedy (dsnode and
genai sample with `--temperature` and `--top-p`),
exactly `--new` tokens each. Prints one JSON line:
  ttft_s: until every sequence has its first token (B prompts prefilled: the batch's time to first token)
  prefill_tok_s: B x prompt / ttft_s
  decode_tok_s: tokens produced per second while all B sequences decode together (after the last
    first token, until the first sequence finishes)
  decode_tok_cpu_s: the same tokens per CPU second of this process (all its threads): what the
    figure would be on a core of its own (on a shared machine, wall-clock time counts the neighbours)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, min(vocab, 32000), length).tolist() for _ in range(batch)]


Clock = tuple[float, float]  # (perf_counter, process_time)


def now() -> Clock:
    return time.perf_counter(), time.process_time()


def rates(batch: int, prompt: int, start: Clock, first: Clock, tokens: int, end: Clock) -> dict[str, float]:
    """`first`: every sequence has its first token; `tokens` were produced between `first` and `end`."""
    return {"ttft_s": first[0] - start[0], "prefill_tok_s": batch * prompt / (first[0] - start[0]),
            "prefill_tok_cpu_s": batch * prompt / max(first[1] - start[1], 1e-9),
            "decode_tok_s": tokens / max(end[0] - first[0], 1e-9),
            "decode_tok_cpu_s": tokens / max(end[1] - first[1], 1e-9)}


async def run_dsnode(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    from dsnode.config import BatchingSection, ModelSection
    from dsnode.edge.onnx_engine import OnnxEngine
    from dsnode.inference.engine import GenerationRequest, SamplingParams

    model = ModelSection(name="bench", path=folder, backend="onnx", threads=args.threads, device="cpu")
    batching = BatchingSection(max_batch_tokens=32768, prefill_chunk_tokens=2048,
                               **({} if args.prompt_cache_mb is None else {"prompt_cache_mb": args.prompt_cache_mb}))
    engine = OnnxEngine(model, batching)
    await engine.load()
    vocab = 32000
    stamps: list[list[Clock]] = [[] for _ in range(args.batch)]
    params = SamplingParams(max_tokens=args.new, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            ignore_eos=True)

    async def one(i: int, ids: list[int]) -> None:
        request = GenerationRequest(f"bench-{i}", tuple(ids), params)
        async for delta in engine.generate(request):
            stamps[i].extend([now()] * len(delta.token_ids))

    start = now()
    await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts(args.batch, args.prompt, vocab, args.seed))))
    await engine.close()
    return steady_rates(stamps, start, args)


def steady_rates(stamps: list[list[Clock]], start: Clock, args: argparse.Namespace) -> dict[str, float]:
    first = max((s[0] for s in stamps), key=lambda c: c[0])  # every sequence has its first token
    end = min((s[-1] for s in stamps), key=lambda c: c[0])  # the first one is done
    tokens = sum(1 for s in stamps for t in s if first[0] < t[0] <= end[0])
    return rates(args.batch, args.prompt, start, first, tokens, end)


def run_genai(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    model = og.Model(config)
    params = og.GeneratorParams(model)
    sampling = {"temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else {}
    params.set_search_options(do_sample=args.temperature > 0, batch_size=args.batch, max_length=args.prompt + args.new,
                              min_length=args.prompt + args.new, **sampling)
    generator = og.Generator(model, params)
    ids = np.asarray(prompts(args.batch, args.prompt, 32000, args.seed), dtype=np.int32)  # (B, P)
    start = now()
    generator.append_tokens(ids)
    generator.generate_next_token()
    generator.get_next_tokens()
    first = now()
    steps = 0
    while not generator.is_done():
        generator.generate_next_token()
        generator.get_next_tokens()
        steps += 1
    end = now()
    return rates(args.batch, args.prompt, start, first, steps * args.batch, end)


def run_torch(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.tensor(prompts(args.batch, args.prompt, model.config.vocab_size, args.seed))  # (B, P)
    with torch.inference_mode():
        start = now()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        first = now()
        for _ in range(args.new - 1):
            out = model(input_ids=nxt, cache=out.cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        end = now()
    return rates(args.batch, args.prompt, start, first, (args.new - 1) * args.batch, end)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("dsnode", "genai", "torch"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0, help="dsnode and genai: 0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="dsnode and genai, with --temperature")
    parser.add_argument("--prompt-cache-mb", type=int, default=None, help="dsnode: [batching] prompt_cache_mb")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.kind == "dsnode":
        result = asyncio.run(run_dsnode(args.folder, args))
    elif args.kind == "genai":
        result = run_genai(args.folder, args)
    else:
        result = run_torch(args.folder, args)
    print(json.dumps({k: round(v, 4) for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
