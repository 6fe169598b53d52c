"""Converted folders against their source on many random prompts: top-1 agreement and logit error.

    .venv/bin/python benchmarks/agreement_probe.py /tmp/benchwork/source /tmp/benchwork/dsnode-int8 \
        /tmp/benchwork/dsnode-int8-b64 [--prompts 48 --steps 16 --seed 7]
    .venv/bin/python benchmarks/agreement_probe.py ~/.cache/dsnode/bundled-v3/dense FOLDERS --texts --steps 32

The validation report of `dsnode convert` has 96 steps (6 prompts x 16 tokens): on a model whose logits
are near-ties (the random-weight benchmark model) one or two flips move it by a point or two. This
probe teacher-forces each folder with the source's greedy tokens over `--prompts` random prompts (8–63
tokens) through the engine's `SlotRunner`, and prints the agreement and the RMS logit error (a
continuous measure that does not depend on where near-ties fall), plus how many source steps had a
top-1/top-2 margin under 0.01 and 0.02. `--texts`: English prompts instead (the validation prompts and
six openings of public-domain books), for a trained model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OPENINGS = ("Call me Ishmael. Some years ago, never mind how long precisely", "We hold these truths to be self-evident",
            "In the beginning God created the heaven and the earth.", "It is a truth universally acknowledged",
            "The sky above the port was the color of", "Happy families are all alike; every unhappy family")


def text_prompts(source: Path) -> list[list[int]]:
    from dsnode.edge.validate import prompt_set
    from dsnode.inference.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.from_folder(source)
    return [ids for _, ids in prompt_set(tokenizer)] + [tokenizer.encode(text) for text in OPENINGS]


def source_references(source: Path, prompts: list[list[int]], steps: int) -> list[tuple[list[int], np.ndarray]]:
    import torch
    from dsnode.edge.validate import reference
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    with torch.inference_mode():
        return [reference(model, ids, steps) for ids in prompts]


def probe(folder: Path, prompts: list[list[int]], refs: list[tuple[list[int], np.ndarray]],
          threads: int) -> tuple[int, int, float]:
    """(agreed steps, steps, RMS logit error) of one converted folder."""
    from dsnode.edge.onnx_runner import open_session
    from dsnode.edge.slot_runner import SlotRunner

    runner = SlotRunner(open_session(folder / "model.onnx", "cpu", threads), 4096)
    agreed = total = 0
    squared = 0.0
    for i, (ids, (tokens, logits)) in enumerate(zip(prompts, refs)):
        seq = f"probe-{i}"
        rows = [runner.prefill(seq, ids, 0).copy()]
        for token in tokens[:-1]:
            rows.append(runner.decode([seq], [token])[0].copy())
        runner.release(seq)
        got = np.stack(rows)  # (steps, V)
        agreed += int((got.argmax(-1) == np.asarray(tokens)).sum())
        total += len(tokens)
        squared += float(((got - logits) ** 2).sum())
    return agreed, total, (squared / (total * refs[0][1].shape[1])) ** 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the Hugging Face folder the others were converted from")
    parser.add_argument("folders", type=Path, nargs="+", help="`dsnode convert` folders (gqa graphs)")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--texts", action="store_true", help="English prompts instead of random token ids")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    vocab = json.loads((args.source / "config.json").read_text())["vocab_size"]
    prompts = [rng.integers(4, vocab, int(rng.integers(8, 64))).tolist() for _ in range(args.prompts)]
    if args.texts:
        prompts = text_prompts(args.source)
    refs = source_references(args.source, prompts, args.steps)
    margins = np.concatenate([np.diff(np.sort(logits, axis=-1)[:, -2:], axis=-1)[:, 0] for _, logits in refs])
    print(f"{len(margins)} steps; source top-1/top-2 margin < 0.01: {(margins < 0.01).sum()}, "
          f"< 0.02: {(margins < 0.02).sum()}")
    for folder in args.folders:
        agreed, total, rmse = probe(folder, prompts, refs, args.threads)
        print(f"{folder}: agreement {agreed}/{total} = {agreed / total:.1%}, logit RMS error {rmse:.5f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
