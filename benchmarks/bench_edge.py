"""Edge engine vs onnxruntime-genai on CPU: decode and prefill speed, bytes, agreement, in one run.

    .venv/bin/pip install -c constraints-cpu.txt -e '.[bench]'            # onnxruntime-genai, pinned
    .venv/bin/python benchmarks/bench_edge.py --rounds 3 --cpu 1 --skip "torch fp32"   # docs/performance.md
    .venv/bin/python benchmarks/bench_edge.py --rounds 1 --new 32 --prompt 128   # a quick look
    .venv/bin/python benchmarks/bench_edge.py --temperature 0.6 --top-p 0.95 ...  # sampled, as R1 is served

The model is the issue's: a random-weight Qwen2 of 246M parameters with Qwen2-7B's proportions (hidden
1024, 16 layers, 16 heads / 4 KV heads, intermediate 2816, vocab 32000, untied LM head). It is
converted by the product (`dsnode convert`: int8, int8 with 64-weight blocks, int8 with an int8 KV cache,
int8 with both, int4, int8-dynamic) and
by onnxruntime-genai's builder (int8 and int4, block 128, accuracy level 4, as dsnode's default; its
blocks are symmetric, as dsnode's int8; dsnode's int4 blocks carry zero points).

Every measurement is a fresh process (`edge_contenders.py`) pinned to one core (`taskset -c CPU`) with
one intra-op thread: B prompts of `--prompt` random tokens, greedy (or sampled with `--temperature`
and `--top-p`: dsnode and genai; transformers stays greedy), `--new` tokens each. dsnode runs
through its real engine (`OnnxEngine`: scheduler, continuous batching, sampling, detokenizer); genai
through its own Generator; transformers through a plain forward loop. Rounds take the contenders in
turn (so a neighbour's burst on a shared machine is spread over all of them); the table shows medians
over rounds and ratios to genai int8 from the same run. Tokens per CPU second of the measured process
are shown beside wall-clock tokens/s: on a shared 2-core machine the wall clock also counts the
neighbours, the CPU clock does not (it still sees their cache and memory-bandwidth pressure).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
CHILD = Path(__file__).with_name("edge_contenders.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
BASELINE = "genai int8"
# name, --quant, --block-size (None: the default, 128), --kv-cache
DSNODE_CONTENDERS = (("dsnode int8", "int8", None, "float"), ("dsnode int8 b64", "int8", 64, "float"),
                     ("dsnode int8 kv8", "int8", None, "int8"), ("dsnode int8 b64 kv8", "int8", 64, "int8"),
                     ("dsnode int4", "int4", None, "float"),
                     ("dsnode int8-dynamic", "int8-dynamic", None, "float"))
METRICS = ("decode_tok_s", "decode_tok_cpu_s", "prefill_tok_s", "prefill_tok_cpu_s", "ttft_s")


def build_source(folder: Path) -> Path:
    """The random-weight model, saved as a Hugging Face folder with the bundled tokenizer files."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.support.models import bundled_models

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=2, pad_token_id=3,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:  # the validation prompts only need ids < 32000: any tokenizer does
        shutil.copy(bundled_models().dense / name, folder / name)
    return folder


def convert_dsnode(source: Path, work: Path, quant: str, block_size: int | None, kv_cache: str,
                   reuse: bool) -> tuple[Path, dict]:
    from dsnode.edge.convert import STAGES, convert_model
    from dsnode.edge.convert_options import ConvertOptions
    from dsnode.edge.nbits import DEFAULT_BLOCK_SIZE
    from dsnode.edge.progress import Progress

    block = block_size or DEFAULT_BLOCK_SIZE
    target = work / (f"dsnode-{quant}" + (f"-b{block}" if block != DEFAULT_BLOCK_SIZE else "")
                     + ("-kv8" if kv_cache == "int8" else ""))
    if reuse and (target / "manifest.json").exists():
        return target, json.loads((target / "validation.json").read_text())
    shutil.rmtree(target, ignore_errors=True)
    print(f"== dsnode convert --quant {quant} --block-size {block} --kv-cache {kv_cache}", flush=True)
    options = ConvertOptions(quant=quant, block_size=block, kv_cache=kv_cache)
    result = convert_model(source, target, min_agreement=0.0, progress=Progress(STAGES), options=options)
    return target, result.report.summary()


def convert_genai(source: Path, work: Path, precision: str, threads: int, reuse: bool) -> Path:
    """onnxruntime-genai's builder, block 128; its session pinned to `threads` intra-op threads."""
    target = work / f"genai-{precision}"
    if reuse and (target / "genai_config.json").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    print(f"== onnxruntime-genai builder -p {precision} (block 128)", flush=True)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(target),
                    "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache"), "--extra_options",
                    "block_size=128"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config_path = target / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"].update(intra_op_num_threads=threads, inter_op_num_threads=1)
    config_path.write_text(json.dumps(config, indent=2))
    return target


def measure(kind: str, folder: Path, batch: int, args: argparse.Namespace) -> dict[str, float]:
    command = ["taskset", "-c", str(args.cpu), sys.executable, str(CHILD), kind, str(folder), "--batch", str(batch),
               "--prompt", str(args.prompt), "--new", str(args.new), "--threads", str(args.threads),
               "--temperature", str(args.temperature), "--top-p", str(args.top_p)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise RuntimeError(f"{kind} {folder.name} b{batch} failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data", ".safetensors")
               or p.name.endswith(".onnx.data"))


def run_rounds(contenders: dict[str, tuple[str, Path]], args: argparse.Namespace) -> dict[str, dict[int, list]]:
    samples: dict[str, dict[int, list]] = {name: {} for name in contenders}
    batches = [int(b) for b in args.batches.split(",")]
    for round_index in range(args.rounds):
        for batch in batches:
            for name, (kind, folder) in contenders.items():
                result = measure(kind, folder, batch, args)
                samples[name].setdefault(batch, []).append(result)
                print(f"round {round_index + 1} b{batch} {name:<22} " + " ".join(
                    f"{k}={result[k]:.2f}" for k in METRICS), flush=True)
    return samples


def medians(samples: dict[str, dict[int, list]]) -> dict[str, dict[int, dict[str, float]]]:
    return {name: {b: {m: statistics.median(r[m] for r in runs) for m in METRICS} for b, runs in by_batch.items()}
            for name, by_batch in samples.items()}


def print_table(table: dict[str, dict[int, dict[str, float]]], sizes: dict[str, int], agreement: dict[str, float],
                fp32_bytes: int) -> None:
    batches = sorted(next(iter(table.values())))
    head = "| contender | " + " | ".join(
        f"decode b{b} tok/s (cpu tok/s) | prefill b{b} tok/s (cpu)" for b in batches) + " | bytes vs fp32 | agreement |"
    print("\n" + head + "\n|" + "---|" * (head.count("|") - 1))
    base = table.get(BASELINE)
    for name, by_batch in table.items():
        cells = []
        for b in batches:
            m = by_batch[b]
            ratio = f" {m['decode_tok_s'] / base[b]['decode_tok_s']:.2f}x / {m['decode_tok_cpu_s'] / base[b]['decode_tok_cpu_s']:.2f}x" if base else ""
            pre = f" {m['prefill_tok_s'] / base[b]['prefill_tok_s']:.2f}x" if base else ""
            cells.append(f"{m['decode_tok_s']:.1f} ({m['decode_tok_cpu_s']:.1f}){ratio} | "
                         f"{m['prefill_tok_s']:.0f} ({m['prefill_tok_cpu_s']:.0f}){pre}")
        share = f"{sizes[name] / fp32_bytes:.1%}" if name in sizes else ""
        agree = f"{agreement[name]:.1%}" if name in agreement else ""
        print(f"| {name} | " + " | ".join(cells) + f" | {share} | {agree} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0, help="dsnode and genai sample (0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--cpu", type=int, default=1, help="the core every measured process is pinned to")
    parser.add_argument("--reuse", action="store_true", help="keep conversions already in --work")
    parser.add_argument("--skip", default="", help="comma-separated contenders to leave out (e.g. 'torch fp32')")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-edge-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        source = work / "source"
        if not (source / "config.json").exists():
            build_source(source)
        agreement, contenders = {}, {}
        for name, quant, block, kv_cache in DSNODE_CONTENDERS:
            folder, summary = convert_dsnode(source, work, quant, block, kv_cache, args.reuse)
            contenders[name] = ("dsnode", folder)
            agreement[name] = summary["agreement"]
        for precision in ("int8", "int4"):
            contenders[f"genai {precision}"] = ("genai", convert_genai(source, work, precision, args.threads,
                                                                       args.reuse))
        contenders["torch fp32"] = ("torch", source)
        contenders = {k: v for k, v in contenders.items() if k not in args.skip.split(",")}
        table = medians(run_rounds(contenders, args))
        sizes = {name: model_bytes(folder) for name, (kind, folder) in contenders.items() if kind != "torch"}
        print(f"\nmedians of {args.rounds} rounds; prompt {args.prompt}, {args.new} new tokens, greedy; one process "
              f"per run pinned to cpu {args.cpu}, {args.threads} thread(s); ratios: to {BASELINE} (wall / cpu clock)")
        print_table(table, sizes, agreement, model_bytes(source))
        (work / "bench_edge.json").write_text(json.dumps({"medians": table, "bytes": sizes, "agreement": agreement,
                                                          "args": vars(args) | {"work": str(work)}}, indent=2))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
