"""Edge decode speed and size: torch fp32 eager vs ONNX fp32 vs ONNX int8, side by side in one run.

    taskset -c 1 .venv/bin/python benchmarks/bench_edge.py --threads 1      # pinned: steadier figures
    .venv/bin/python benchmarks/bench_edge.py --threads 2 --reps 7

One random-weight Qwen2 (hidden 512, 8 layers, intermediate 768, 8 heads / 4 KV heads, vocab 32000,
untied LM head like R1-Distill-Qwen: ~48M parameters) is converted twice by the product's own
`convert_model` (`--quant none` and `int8`; random weights, so the validation bar is off). Every engine
decodes through the runner the server uses: `OnnxRunner` (edge) and `TorchRunner` (central,
transformers on CPU); a plain Hugging Face forward loop is measured too, so the torch baseline is the
faster of the two. Per repetition, each contender prefills B prompts of 32 tokens, then decodes
`--warm-steps` untimed and `--steps` timed greedy tokens per sequence (prefill is not timed).
Contenders take turns within each repetition, so a neighbour's load burst on a shared machine is
spread over all of them; figures are medians over repetitions after one warm-up repetition, as tokens
per wall-clock second and per CPU second of this process, with ratios to torch. On a shared machine the
figures (and the ratios: a small model's speed depends on the shared L3 cache) move between runs: run
it several times, on a quiet machine for the figure you quote.

Targets (issue 3): int8 ONNX >= 4x torch fp32 eager tokens/s at batch 1, and <= 45% of its bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT_TOKENS = 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def build_source(folder: Path) -> Path:
    """The random-weight model, saved as a Hugging Face folder with the bundled tokenizer files."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.support.models import bundled_models

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=32000, hidden_size=512, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=2, pad_token_id=3,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:  # the validation prompts only need ids < 32000: any tokenizer does
        shutil.copy(bundled_models().dense / name, folder / name)
    return folder


Rate = tuple[float, float]  # tokens per wall-clock second, tokens per CPU second of this process


class RunnerContender:
    """Decodes through a `ModelRunner` (the engines' own code): B prompts prefilled, then greedy steps."""

    def __init__(self, runner, vocab: int) -> None:
        self.runner, self.vocab = runner, vocab

    def start(self, batch: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.seqs = [f"s{i}" for i in range(batch)]
        for seq in self.seqs:
            self.runner.prefill(seq, rng.integers(4, self.vocab, PROMPT_TOKENS).tolist(), 0)
        self.tokens = [5] * batch

    def step(self) -> None:
        self.tokens = self.runner.decode(self.seqs, self.tokens).argmax(axis=-1).tolist()

    def stop(self) -> None:
        for seq in self.seqs:
            self.runner.release(seq)


class HfLoopContender:
    """model(input_ids, cache) one token at a time, equal-length prompts (no padding, no runner)."""

    def __init__(self, model, vocab: int) -> None:
        self.model, self.vocab = model, vocab

    def start(self, batch: int, seed: int) -> None:
        import torch

        ids = torch.tensor(np.random.default_rng(seed).integers(4, self.vocab, (batch, PROMPT_TOKENS)))
        with torch.inference_mode():
            self.out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)

    def step(self) -> None:
        import torch

        with torch.inference_mode():
            nxt = self.out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            self.out = self.model(input_ids=nxt, cache=self.out.cache, use_cache=True, logits_to_keep=1)

    def stop(self) -> None:
        self.out = None


def measure(contender, batch: int, steps: int, warm_steps: int, seed: int) -> Rate:
    """Decode rate of one contender: prefill, `warm_steps` untimed (its weights back in the caches
    after the previous contender evicted them), then `steps` timed."""
    contender.start(batch, seed)
    for _ in range(warm_steps):
        contender.step()
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(steps):
        contender.step()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    contender.stop()
    return batch * steps / wall, batch * steps / cpu


def folder_model_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and ONNX Runtime")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per contender and batch")
    parser.add_argument("--steps", type=int, default=48, help="decode steps per repetition")
    parser.add_argument("--warm-steps", type=int, default=8, help="untimed decode steps before the timed ones")
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()

    import torch
    from dsnode.central.torch_runner import TorchRunner
    from dsnode.edge.convert import STAGES, convert_model
    from dsnode.edge.onnx_runner import OnnxRunner, open_session
    from dsnode.edge.progress import Progress
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-edge-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        source = build_source(work / "source")
        folders = {}
        for quant in ("none", "int8"):
            target = work / f"onnx-{quant}"
            shutil.rmtree(target, ignore_errors=True)
            print(f"== dsnode convert --quant {quant}", flush=True)
            result = convert_model(source, target, quant=quant, min_agreement=0.0, progress=Progress(STAGES))
            folders[quant] = result.path
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
        vocab = model.config.vocab_size
        params = sum(p.numel() for p in model.parameters())
        contenders = {
            "torch fp32 eager (HF loop)": HfLoopContender(model, vocab),
            "torch fp32 eager (TorchRunner)": RunnerContender(TorchRunner(model, torch.device("cpu")), vocab),
            "onnx fp32 (OnnxRunner)": RunnerContender(
                OnnxRunner(open_session(folders["none"] / "model.onnx", "cpu", args.threads)), vocab),
            "onnx int8 (OnnxRunner)": RunnerContender(
                OnnxRunner(open_session(folders["int8"] / "model.onnx", "cpu", args.threads)), vocab),
        }
        rates: dict[str, dict[int, dict[str, float]]] = {"wall": {}, "cpu": {}}
        for batch in (int(b) for b in args.batches.split(",")):
            samples: dict[str, list[Rate]] = {name: [] for name in contenders}
            for rep in range(args.reps + 1):
                for name, contender in contenders.items():
                    rate = measure(contender, batch, args.steps, args.warm_steps, seed=rep)
                    if rep:  # repetition 0 warms allocators and lazy initialisations up
                        samples[name].append(rate)
            for clock, index in (("wall", 0), ("cpu", 1)):
                rates[clock][batch] = {name: statistics.median(r[index] for r in values)
                                       for name, values in samples.items()}

        sizes = {
            "torch fp32 (model.safetensors)": folder_model_bytes(source, "*.safetensors"),
            "onnx fp32 (model.onnx*)": folder_model_bytes(folders["none"], "model.onnx*"),
            "onnx int8 (model.onnx*)": folder_model_bytes(folders["int8"], "model.onnx*"),
        }
        report = {"params": params, "threads": args.threads, "reps": args.reps, "steps": args.steps,
                  "decode_tokens_per_s": rates, "bytes": sizes,
                  "cpu_affinity": sorted(os.sched_getaffinity(0))}
        print_report(report, rates, sizes)
        (work / "bench_edge.json").write_text(json.dumps(report, indent=2))
        print(f"\njson: {work / 'bench_edge.json'}" if args.work else "")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def print_report(report: dict, rates: dict[str, dict[int, dict[str, float]]], sizes: dict[str, int]) -> None:
    print(f"\nmodel: random Qwen2, {report['params'] / 1e6:.1f}M params; threads {report['threads']}, "
          f"cpus {report['cpu_affinity']}; median of {report['reps']} reps x {report['steps']} decode steps, "
          f"prompt {PROMPT_TOKENS} tokens")
    verdicts = []
    for clock, title in (("wall", "tokens per wall-clock second"), ("cpu", "tokens per CPU second")):
        for batch, by_name in rates[clock].items():
            torch_best = max(v for k, v in by_name.items() if k.startswith("torch"))
            print(f"\nbatch {batch}, {title} (ratio to the faster torch fp32 eager)")
            for name, rate in by_name.items():
                print(f"  {name:<32} {rate:8.1f}  {rate / torch_best:5.2f}x")
            if batch == 1:
                verdicts.append((clock, by_name["onnx int8 (OnnxRunner)"] / torch_best))
    base = sizes["torch fp32 (model.safetensors)"]
    print("\nbytes (ratio to torch fp32)")
    for name, size in sizes.items():
        print(f"  {name:<32} {size / 2**20:8.1f} MB  {size / base:5.1%}")
    int8_bytes = sizes["onnx int8 (model.onnx*)"] / base
    speed = ", ".join(f"{ratio:.2f}x ({clock}: {'met' if ratio >= 4 else 'NOT met'})" for clock, ratio in verdicts)
    print(f"\ntargets: int8 >= 4x torch at batch 1: {speed}; "
          f"int8 <= 45% of torch bytes: {int8_bytes:.1%} ({'met' if int8_bytes <= 0.45 else 'NOT met'})")


if __name__ == "__main__":
    sys.exit(main())
