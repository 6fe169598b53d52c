"""The central and edge engines on a real GPU, in one go (under 10 minutes on one H200); one JSON summary.

    python3 scripts/gpu_check.py [--size full|tiny] [--device cuda|cpu] [--out FILE]

1. `moe_model`: a DeepSeek-V3-architecture MoE of realistic layer sizes (DeepSeek-V2-Lite's: hidden 2048,
   64 routed experts top-6 + 2 shared, MLA; only 4 layers; random weights, nothing downloaded), wrapped
   by `deepspeed.init_inference`, driven in-process by dsnode's `TorchRunner` (the engine's own forward
   code and batch KV cache): prefill tokens/s at 1024 tokens, decode tokens/s at batch 1, 8 and 32.
2. `moe_engine`: the same weights saved to disk and served by `DeepSpeedEngine` (worker process, nccl,
   the scheduler, sampling, detokenizing): the same figures through the whole engine, so the gap to (1)
   is what the engine's process boundary and bookkeeping cost.
3. `edge_onnx`: a random Qwen2 of DeepSeek-R1-Distill-Qwen-7B's shape (hidden 3584, 28 heads / 4 KV heads,
   intermediate 18944, vocab 152064; `--edge-layers` of them, default 8, 28 = the whole 7B) converted by
   `dsnode convert --quant int8 --target cuda` (MatMulNBits + GroupQueryAttention, float16; validation skipped:
   random weights), then (a) an ONNX Runtime session on the CUDA provider with
   `session.disable_cpu_ep_fallback = 1`: it starts only if every node has a CUDA kernel, and (b)
   `OnnxEngine` on it: decode tokens/s at batch 1, 8 and 32. Skipped, saying why, where dsnode.edge or
   the CUDA provider is missing.
4. `nccl`: `dsnode bench nccl --json`, if that command exists.
5. `moe_expert_parallel`: the MoE of (2) served by `DeepSpeedEngine` over every local GPU (2 CPU ranks
   with `--device cpu`), each rank holding its range of the routed experts: decode tokens/s at batch
   1, 8 and 32, each rank's weights by kind and peak host memory while loading, and what `dsnode plan`'s
   arithmetic (`dsnode.sizing`) says a rank holds. Skipped on a host with one GPU (NCCL takes one
   rank per GPU).
6. `moe_fp8` (scripts/gpu_check_fp8.py): DeepSeek's FP8 layout kept in FP8: one linear's kernel against
   bf16, the MoE written as FP8 against its dequantized copy, and `DeepSpeedEngine` with two ranks (one
   on a one-GPU host) choosing FP8 by itself. Skipped, saying why, where the GPU lacks FP8 compute
   (compute capability below 8.9) and on `--device cpu`.

Every section runs even if an earlier one failed; each reports `ok`, its figures or its error. Each figure
is a median of `--repeats` timed runs after a warm-up. `--size tiny --device cpu` smoke-tests the
script on a CPU host in about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

SIZES: dict[str, dict[str, Any]] = {
    # DeepSeek-V2-Lite's layer shapes (a DeepSeek-V3/R1 layer is 3.5x wider, same structure), 4 layers
    "full": dict(
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=4, q_lora_rank=1536,
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        vocab_size=102400, max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=64,
        kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
        vocab_size=512, max_position_embeddings=2048,
    ),
}
TOKENIZER_VOCAB = 512  # the bundled byte-level BPE; larger model vocabularies decode unknown ids to ""
BATCHES = (1, 8, 32)
PREFILL_TOKENS = 1024
DECODE_STEPS = 64
PROMPT_TOKENS = 128


def main() -> int:
    args = parse()
    if args.device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="dsnode-gpu-check-"))
    summary: dict[str, Any] = {"check": "dsnode gpu-check", "size": args.size, "device": args.device,
                               "environment": environment()}
    sections: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("moe_model", lambda: moe_model(args)),
        ("moe_engine", lambda: asyncio.run(moe_engine(args, work))),
        ("edge_onnx", lambda: asyncio.run(edge_onnx(args, work, Helpers(engine_figures, save_tokenizer_files, Skip)))),
        ("nccl", lambda: nccl(args)),
        ("moe_expert_parallel", lambda: asyncio.run(moe_expert_parallel(args, work))),
        ("moe_fp8", lambda: moe_fp8(args, work)),
    ]
    try:
        for name, run in sections:
            if name in args.skip:
                summary[name] = {"ok": None, "skipped": "--skip"}
                continue
            summary[name] = section(name, run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(summary, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text, flush=True)
    return 0 if all(summary[n].get("ok") is not False for n, _ in sections) else 1


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=tuple(SIZES), default="full")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--edge-layers", type=int, default=None,
                   help="decoder layers of the 7B-shaped edge model (default: 8 with --size full, 2 tiny; 28: 7B)")
    p.add_argument("--out", help="also write the JSON summary here")
    p.add_argument("--skip", nargs="*", default=(),
                   choices=("moe_model", "moe_engine", "edge_onnx", "nccl", "moe_expert_parallel", "moe_fp8"))
    return p.parse_args()


def section(name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"[gpu-check] {name} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        result = {"ok": True, **run()}
    except Skip as exc:
        result = {"ok": None, "skipped": str(exc)}
    except Exception as exc:
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    result["seconds"] = round(time.monotonic() - started, 1)
    print(f"[gpu-check] {name}: {json.dumps(result, default=str)}", file=sys.stderr, flush=True)
    return result


class Skip(Exception):
    pass


def environment() -> dict[str, Any]:
    facts: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    for package in ("torch", "transformers", "deepspeed", "onnxruntime", "bitsandbytes", "dsnode"):
        try:
            facts[package] = __import__(package).__version__
        except Exception as exc:  # missing, or broken on this host: say which
            facts[package] = f"unavailable ({type(exc).__name__})"
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            facts["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                            "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    except Exception:
        pass
    return facts


def median_rate(work: float, runs: list[float]) -> float:
    return round(work / statistics.median(runs), 1)


# --- 1. the MoE model in-process -------------------------------------------------------------------
def build_moe(size: str, device: Any, dtype: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    # special-token ids as in the bundled tokenizer: <|endoftext|> 0, <|im_end|> 2, <|pad|> 3
    config = DeepseekV3Config(**SIZES[size], rope_scaling=None, tie_word_embeddings=False,
                              bos_token_id=0, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def moe_model(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from dsnode.central.torch_runner import TorchRunner

    device, dtype = devices(args)
    model = build_moe(args.size, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    module = deepspeed_wrap(model, dtype)
    runner = TorchRunner(module, device)
    rng = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(4, TOKENIZER_VOCAB, (n,), generator=rng).tolist()

    def prefill_once() -> float:
        start = time.perf_counter()
        runner.prefill("p", prompt(PREFILL_TOKENS), 0)  # returns numpy: the GPU is done
        elapsed = time.perf_counter() - start
        runner.release("p")
        return elapsed

    prefill_once()  # warm-up
    prefill = [prefill_once() for _ in range(args.repeats)]
    decode: dict[str, float] = {}
    for batch in BATCHES:
        seqs = [f"s{i}" for i in range(batch)]
        for seq in seqs:
            runner.prefill(seq, prompt(PROMPT_TOKENS), 0)
        tokens = [5] * batch
        runner.decode(seqs, tokens)  # warm-up, and the batch cache is packed
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(DECODE_STEPS // args.repeats or 1):
                logits = runner.decode(seqs, tokens)
                tokens = [int(t) for t in logits.argmax(-1)]
            runs.append((time.perf_counter() - start) / (DECODE_STEPS // args.repeats or 1))
        decode[f"batch_{batch}"] = median_rate(batch, runs)
        for seq in seqs:
            runner.release(seq)
    result = {
        "parameters": params,
        "weights_gib": round(module.get_memory_footprint() / 2**30, 2),
        "dtype": str(dtype).removeprefix("torch."),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "prefill_tokens_per_s": {f"tokens_{PREFILL_TOKENS}": median_rate(PREFILL_TOKENS, prefill)},
        "decode_tokens_per_s": decode,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del runner, module, model
    free_gpu()
    return result


def devices(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise Skip("no CUDA device (run with --device cpu to smoke-test on CPU)")
        return torch.device("cuda", 0), torch.bfloat16
    return torch.device("cpu"), torch.float32


def deepspeed_wrap(model: Any, dtype: Any) -> Any:
    """`deepspeed.init_inference` as the engine's rank does it, in this process (world size 1)."""
    import importlib

    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    on_cuda = next(model.parameters()).device.type == "cuda"
    if not on_cuda:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", auto_mpi_discovery=False, verbose=False)
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": 1}, dtype=dtype,
                                      replace_with_kernel_inject=False)
    return engine.module


def free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- 2. the same model behind DeepSpeedEngine ------------------------------------------------------
def save_tokenizer_files(folder: Path, context: int) -> None:
    from dsnode.central.bundled.corpus import TEXT
    from dsnode.central.bundled.tokenizer import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(TEXT, TOKENIZER_VOCAB), folder, context)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "do_sample": False}))


def saved_moe(args: argparse.Namespace, work: Path) -> tuple[Path, float]:
    """The MoE of section 1 as a checkpoint folder (saved once); seconds it took."""
    folder = work / "moe"
    if (folder / "config.json").exists():
        return folder, 0.0
    started = time.monotonic()
    device, dtype = devices(args)
    # built (initialised) on the GPU: on the CPU, initialising and saving 2.26B parameters took 79.5 s on
    # the H200 host (2026-11-30); save_pretrained copies each tensor to the host as it writes it
    model = build_moe(args.size, device, dtype)
    model.save_pretrained(str(folder), max_shard_size="2GB")
    del model
    free_gpu()
    save_tokenizer_files(folder, SIZES[args.size]["max_position_embeddings"])
    return folder, time.monotonic() - started


def moe_section(args: argparse.Namespace, folder: Path, ranks: int | None = None) -> Any:
    from dsnode.config import ModelSection

    return ModelSection(name="gpu-check-moe", path=folder, backend="deepspeed", device=args.device,
                        dtype="bfloat16" if args.device == "cuda" else "float32", tensor_parallel=ranks)


async def moe_engine(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from dsnode.central.deepspeed_engine import DeepSpeedEngine
    from dsnode.config import BatchingSection

    devices(args)
    folder, saved_s = saved_moe(args, work)
    engine = DeepSpeedEngine(moe_section(args, folder, 1), BatchingSection(max_running=max(BATCHES)))
    started = time.monotonic()
    await engine.load()
    try:
        result: dict[str, Any] = {"save_s": round(saved_s, 1), "load_s": round(time.monotonic() - started, 1),
                                  "device": engine.info.device, "tensor_parallel": engine.info.tensor_parallel,
                                  "ranks": engine.info.extra}
        result.update(await engine_figures(engine, BATCHES, args.repeats, prefill=True))
        return result
    finally:
        await engine.close()


async def engine_figures(engine: Any, batches: tuple[int, ...], repeats: int, prefill: bool) -> dict[str, Any]:
    import random

    from dsnode.inference.engine import GenerationRequest, SamplingParams

    rng = random.Random(0)

    def prompt(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(4, TOKENIZER_VOCAB) for _ in range(n))

    async def timed(request_id: str, prompt_ids: tuple[int, ...], max_tokens: int) -> list[float]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        stamps = []
        async for _ in engine.generate(GenerationRequest(request_id, prompt_ids, params)):
            stamps.append(time.perf_counter())
        return stamps

    figures: dict[str, Any] = {}
    if prefill:
        runs = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            stamps = await timed(f"prefill{i}", prompt(PREFILL_TOKENS), 1)
            runs.append(stamps[0] - start)
        figures["prefill_tokens_per_s"] = {f"tokens_{PREFILL_TOKENS}": median_rate(PREFILL_TOKENS, runs[1:])}
    decode: dict[str, float] = {}
    for batch in batches:
        rates = []
        for r in range(repeats + 1):
            streams = await asyncio.gather(
                *(timed(f"d{batch}.{r}.{i}", prompt(PROMPT_TOKENS), DECODE_STEPS) for i in range(batch))
            )
            start = max(s[0] for s in streams)  # every sequence is decoding from here
            end = min(s[-1] for s in streams)
            tokens = sum(sum(1 for t in s if start < t <= end) for s in streams)
            rates.append(tokens / (end - start))
        decode[f"batch_{batch}"] = round(statistics.median(rates[1:]), 1)  # the first run warms up
    figures["decode_tokens_per_s"] = decode
    return figures


# --- 3. the edge model on ONNX Runtime's CUDA provider (scripts/gpu_check_edge.py) ----------------
async def edge_onnx(args: argparse.Namespace, work: Path, helpers: Any) -> dict[str, Any]:
    import gpu_check_edge

    return await gpu_check_edge.section(args, work, helpers)


class Helpers:
    """What a section kept in a module of its own borrows from this script (it imports nothing of it:
    run as a script, this file is `__main__`, and `Skip` must be this one)."""

    def __init__(self, figures: Callable[..., Any], save_tokenizer: Callable[..., None], skip: type[Exception]):
        self.figures, self.save_tokenizer, self.skip = figures, save_tokenizer, skip


# --- 4. nccl ---------------------------------------------------------------------------------------
def nccl(args: argparse.Namespace) -> dict[str, Any]:
    if importlib.util.find_spec("dsnode.ops.nccl") is None:
        raise Skip("`dsnode bench nccl` is not in this tree yet")
    backend = ["--backend", "gloo", "-g", "2"] if args.device == "cpu" else []
    command = [sys.executable, "-m", "dsnode.cli", "bench", "nccl", "--json", "--max-bytes", "64M", *backend]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    result: dict[str, Any] = {"command": " ".join(command[1:]), "exit_code": done.returncode}
    try:
        result["result"] = json.loads(done.stdout)
    except json.JSONDecodeError:
        result["output"] = (done.stdout + done.stderr).strip()[-2000:]
    if done.returncode not in (0, 3):  # 3: nothing to measure (one GPU): a clear message, not a failure
        raise RuntimeError(f"exit {done.returncode}: {result.get('output', '')}")
    return result


# --- 5. expert parallelism over the local GPUs -----------------------------------------------------
PER_RANK_FACTS = ("rank", "routed_experts", "weights_bytes", "weights_bytes_by_kind", "load_rss_before_bytes",
                  "load_peak_rss_bytes")


async def moe_expert_parallel(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from dsnode.central.deepspeed_engine import DeepSpeedEngine
    from dsnode.config import BatchingSection
    from dsnode.hfconfig import read_hf_config
    from dsnode.sizing import FORMATS, model_shape, rank_bytes

    devices(args)
    ranks = torch.cuda.device_count() if args.device == "cuda" else 2
    if ranks < 2:
        raise Skip(f"{ranks} GPU here: expert parallelism needs 2 or more (NCCL takes one rank per GPU)")
    folder, _ = saved_moe(args, work)
    engine = DeepSpeedEngine(moe_section(args, folder, ranks), BatchingSection(max_running=max(BATCHES)))
    started = time.monotonic()
    await engine.load()
    try:
        shape = model_shape(read_hf_config(folder))
        fmt = FORMATS["bf16" if args.device == "cuda" else "fp32"]
        result: dict[str, Any] = {
            "ranks": ranks, "load_s": round(time.monotonic() - started, 1),
            "spread": engine.info.extra.get("expert_parallel", {}).get("spread"),
            "per_rank": [{key: r[key] for key in PER_RANK_FACTS} for r in engine.info.extra["ranks"]],
            "plan_weights_bytes_per_rank": [sum(rank_bytes(shape, ranks, r, fmt).values()) for r in range(ranks)],
        }
        result.update(await engine_figures(engine, BATCHES, args.repeats, prefill=False))
        return result
    finally:
        await engine.close()


# --- 6. FP8 kept on GPUs that compute in FP8 (scripts/gpu_check_fp8.py) ----------------------------
def moe_fp8(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import gpu_check_fp8

    return gpu_check_fp8.section(args, work, saved_moe, free_gpu, engine_figures, BATCHES, Skip)


if __name__ == "__main__":
    sys.exit(main())
