"""Where int8's logit error comes from: weights or activations, and which kind of layer (torch simulation).

    .venv/bin/python benchmarks/error_budget.py /tmp/benchwork/source [--prompts 8 --block 128]

Rounds, in the source model itself, what MatMulNBits at accuracy level 4 rounds: each linear weight to
int8 in blocks of `--block` input features (symmetric, max|w|/127 per block, as `dsnode convert`'s int8
default) and/or each linear's input activations to int8 in blocks of the same size (the CPU kernel's
int8 dot products). Prints the RMS logit error against the float32 model over the last 16 positions
of `--prompts` random 64-token prompts: everything rounded, weights only, activations only, then one
kind of layer at a time (q/k/v together, o, gate, up, down, lm_head). The kinds' errors do not add up
exactly (they interact), but they show which rounding matters.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

KINDS = ("qkv", "o", "gate", "up", "down", "lm_head")


def kind_of(name: str) -> str:
    if name.endswith(("q_proj", "k_proj", "v_proj")):
        return "qkv"
    return name.rsplit(".", 1)[-1].removesuffix("_proj")


def rounded_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Symmetric int8 rounding in blocks of `block` along the last dimension."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.round(blocks / scale).clamp(-127, 127) * scale).reshape(x.shape)


class Budget:
    def __init__(self, source: Path, prompts: int, block: int) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
        self.block = block
        rng = np.random.default_rng(7)
        vocab = self.model.config.vocab_size
        self.prompts = [torch.tensor([rng.integers(4, vocab, 64).tolist()]) for _ in range(prompts)]
        self.linears = {n: m for n, m in self.model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.weights = {n: m.weight.data.clone() for n, m in self.linears.items()}
        self.reference = self._logits()

    def _logits(self) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [self.model(p).logits[0, -16:].clone() for p in self.prompts]

    def error(self, weights: Iterable[str] = (), activations: Iterable[str] = ()) -> float:
        weights, activations = set(weights), set(activations)
        hooks = []
        for name, module in self.linears.items():
            kind = kind_of(name)
            original = self.weights[name]
            module.weight.data = rounded_blocks(original, self.block) if kind in weights else original
            if kind in activations:
                hooks.append(module.register_forward_pre_hook(
                    lambda _module, inputs: (rounded_blocks(inputs[0], self.block),)))
        try:
            errors = torch.cat([got - want for got, want in zip(self._logits(), self.reference)])
        finally:
            for hook in hooks:
                hook.remove()
        return float(errors.pow(2).mean().sqrt())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args()
    budget = Budget(args.source, args.prompts, args.block)
    print(f"RMS logit error, int8 blocks of {args.block}, {args.prompts} prompts x 16 positions")
    print(f"  weights and activations  {budget.error(KINDS, KINDS):.5f}")
    print(f"  weights only             {budget.error(KINDS, ()):.5f}")
    print(f"  activations only         {budget.error((), KINDS):.5f}")
    for kind in KINDS:
        print(f"  {kind:8s} weights {budget.error((kind,), ()):.5f}   activations {budget.error((), (kind,)):.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
