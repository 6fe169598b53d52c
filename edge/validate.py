"""The converted model against its source: greedy-token agreement and logit error (convert time; torch).

For each prompt of a fixed set the source model (torch: float32, or the dtype a large checkpoint is
stored in) generates `NEW_TOKENS` greedy tokens.
The ONNX model is then driven through the engine's own `OnnxRunner` with those same tokens (teacher
forcing): every prompt prefilled alone, then all of them decoded together as one left-padded batch, so
the padding path the server uses is checked too. At each step we compare the ONNX argmax with the
source's token, and the logits. Because the inputs are identical up to the first disagreement, a
prompt's "identical prefix" is exactly how many tokens free-running greedy decoding would share.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from dsnode.inference.runner import ModelRunner
from dsnode.inference.tokenizer import TextTokenizer

NEW_TOKENS = 16
TEXT_PROMPTS = (
    "It was the best of times",
    "Four score and seven years ago",
    "The quick brown fox jumps over",
    "def fibonacci(n):\n    ",
    "Question: What is 17 + 25?\nAnswer:",
)
CHAT_PROMPT = "Explain in one sentence why the sky is blue."


@dataclass(frozen=True)
class PromptResult:
    prompt: str
    tokens: int
    agreed: int  # steps where the ONNX argmax is the source's token
    identical_prefix: int  # tokens before the first disagreement
    max_abs_logit_error: float


@dataclass(frozen=True)
class ValidationReport:
    quantization: str
    prompts: tuple[PromptResult, ...]
    min_agreement: float
    float_layers: dict[str, str] = field(default_factory=dict)  # quantization asked for, not possible: why
    reference: str = "float32"  # the dtype the source model computed the references in

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.prompts)

    @property
    def agreement(self) -> float:
        return sum(p.agreed for p in self.prompts) / max(1, self.tokens)

    @property
    def max_abs_logit_error(self) -> float:
        return max((p.max_abs_logit_error for p in self.prompts), default=0.0)

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement

    def summary(self) -> dict[str, Any]:
        return {
            "quantization": self.quantization,
            "prompts": len(self.prompts),
            "tokens": self.tokens,
            "agreement": round(self.agreement, 4),
            "identical_prefix_min": min((p.identical_prefix for p in self.prompts), default=0),
            "max_abs_logit_error": round(self.max_abs_logit_error, 6),
            "min_agreement": self.min_agreement,
            "passed": self.passed,
            "float_layers": dict(self.float_layers),
            "reference": self.reference,
        }

    def to_json(self) -> str:
        return json.dumps({**self.summary(), "per_prompt": [asdict(p) for p in self.prompts]}, indent=2) + "\n"

    def render(self) -> str:
        kind = "float32" if self.quantization == "none" else self.quantization
        lines = [
            (f"validation: {kind} ONNX vs the source model ({self.reference} torch), "
             f"{len(self.prompts)} prompts x {NEW_TOKENS} greedy tokens"),
            f"  {'prompt':<38} {'agree':>7} {'same prefix':>11} {'max |dlogit|':>12}",
        ]
        for p in self.prompts:
            shown = repr(p.prompt if len(p.prompt) <= 34 else p.prompt[:31] + "...")
            lines.append(f"  {shown:<38} {p.agreed:>3}/{p.tokens:<3} {p.identical_prefix:>11} "
                         f"{p.max_abs_logit_error:>12.5f}")
        for layer, why in self.float_layers.items():
            lines.append(f"  not quantized (kept float): {layer}: {why}")
        verdict = "pass" if self.passed else "FAIL"
        lines.append(
            f"  top-1 agreement {self.agreement:.1%} ({sum(p.agreed for p in self.prompts)}/{self.tokens}), "
            f"max |dlogit| {self.max_abs_logit_error:.5f}; {verdict} (required >= {self.min_agreement:.0%})"
        )
        return "\n".join(lines)


def prompt_set(tokenizer: TextTokenizer) -> list[tuple[str, list[int]]]:
    prompts = [(text, tokenizer.encode(text)) for text in TEXT_PROMPTS]
    if tokenizer.chat_template:
        prompts.append((f"[chat] {CHAT_PROMPT}", tokenizer.encode_chat([{"role": "user", "content": CHAT_PROMPT}])))
    return [(text, ids) for text, ids in prompts if ids]


@torch.inference_mode()
def reference(model: Any, prompt_ids: Sequence[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens of the source model and the logits (steps, V) each was chosen from."""
    out = model(input_ids=torch.tensor([list(prompt_ids)]), use_cache=True, logits_to_keep=1)
    tokens, logits = [], []
    for _ in range(steps):
        step_logits = out.logits[0, -1].float()  # (V,)
        logits.append(step_logits.numpy())
        tokens.append(int(step_logits.argmax()))
        out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True, logits_to_keep=1)
    return tokens, np.stack(logits)


@dataclass(frozen=True)
class Reference:
    """The source model's greedy continuation of one prompt, and the logits (steps, V) it chose from."""

    prompt: str
    ids: list[int]
    tokens: list[int]
    logits: np.ndarray
    dtype: str = "float32"  # what the source model computed in


def references(model: Any, tokenizer: TextTokenizer, on_prompt: Callable[[], None] = lambda: None) -> list[Reference]:
    """Computed before the ONNX model is opened, so the source can be freed first (a 7B source and its
    converted copy do not fit in memory together)."""
    found = []
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    for text, ids in prompt_set(tokenizer):
        tokens, logits = reference(model, ids, NEW_TOKENS)
        found.append(Reference(text, ids, tokens, logits.astype(np.float32), dtype))
        on_prompt()
    return found


def compare(
    refs: Sequence[Reference],
    runner: ModelRunner,
    quantization: str,
    min_agreement: float,
    float_layers: dict[str, str] | None = None,
) -> ValidationReport:
    """Teacher-force the converted model with the source's tokens: each prompt prefilled alone, then
    all decoded together as one batch, as the server runs them."""
    seq_ids = [f"validate-{i}" for i in range(len(refs))]
    # onnx_logits[i]: (steps, V) for prompt i
    onnx_logits = [[runner.prefill(seq, ref.ids, 0)] for seq, ref in zip(seq_ids, refs)]
    for step in range(NEW_TOKENS - 1):
        fed = [ref.tokens[step] for ref in refs]
        for i, row in enumerate(runner.decode(seq_ids, fed)):
            onnx_logits[i].append(row)
    for seq in seq_ids:
        runner.release(seq)
    results = [_compare(ref.prompt, ref.tokens, ref.logits, np.stack(got)) for ref, got in zip(refs, onnx_logits)]
    dtype = refs[0].dtype if refs else "float32"
    return ValidationReport(quantization, tuple(results), min_agreement, dict(float_layers or {}), dtype)


def validate(
    model: Any,
    runner: ModelRunner,
    tokenizer: TextTokenizer,
    quantization: str,
    min_agreement: float,
    on_prompt: Callable[[], None] = lambda: None,
) -> ValidationReport:
    return compare(references(model, tokenizer, on_prompt), runner, quantization, min_agreement)


def _compare(prompt: str, tokens: list[int], ref_logits: np.ndarray, got: np.ndarray) -> PromptResult:
    chosen = got.argmax(axis=-1)  # (steps,)
    agree = chosen == np.asarray(tokens)
    prefix = int(np.argmin(agree)) if not agree.all() else len(tokens)
    error = float(np.abs(got.astype(np.float64) - ref_logits).max())
    return PromptResult(prompt, len(tokens), int(agree.sum()), prefix, error)
