"""Per-channel scales for an int8 KV cache (`dsnode convert --kv-cache int8`; convert time, torch).

GroupQueryAttention stores an int8 cache as round(x / scale) per channel (kv head x head dim), with
scales fixed in the graph, so they are chosen here: the source model runs over calibration prompts
(sample text, then random token ids so that unusual tokens are covered too), and each channel's scale
is its largest |value| seen, times MARGIN, over 127. Keys are taken as the cache holds them: after
the rotary embedding. A value beyond the calibrated range saturates at +-127 rather than wrapping.

Calibration prompts are not the validation prompts (`edge/validate.py`), so the validation report
measures the cache's rounding on text the scales were not fitted to. `--calibration-text FILE` replaces
the built-in sample texts with the operator's (text like what the model will serve); the random
prompts stay.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from dsnode.inference.tokenizer import TextTokenizer

# Above the calibrated maximum (values beyond it saturate). A shallow optimum between ~1.2 and ~1.5 by
# logit error on the models measured; a sweep from 1.1 to 3.0 is in docs/edge.md.
MARGIN = 1.2
INT8_MAX = 127
RANDOM_PROMPTS = 4
RANDOM_PROMPT_TOKENS = 256
# --calibration-text: at most this many passages of at most this many tokens (each is one forward of the
# source model at convert time: 32 x 512 tokens is minutes for a 7B on a CPU, not hours)
MAX_PASSAGES = 32
PASSAGE_TOKENS = 512
CALIBRATION_TEXTS = (
    ("Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
     "and nothing particular to interest me on shore, I thought I would sail about a little and see the watery "
     "part of the world."),
    ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
     "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
     "neighbourhood, this truth is so well fixed in the minds of the surrounding families."),
    ("We hold these truths to be self-evident, that all men are created equal, that they are endowed by their "
     "Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness."),
    ("import json\nfrom pathlib import Path\n\ndef load(path):\n    with open(path) as f:\n        return "
     "json.load(f)\n\nfor name in sorted(Path('.').glob('*.json')):\n    print(name, len(load(name)))\n"),
    ("The mitochondria is the powerhouse of the cell. In 1905 Einstein published four papers; the third "
     "introduced special relativity, and the fourth derived E = mc^2 from it."),
)


@dataclass(frozen=True)
class KVScales:
    """Per layer, the scale of each key and value channel: (layers, kv_heads * head_dim) float32."""

    key: np.ndarray
    value: np.ndarray

    def __post_init__(self) -> None:
        for name, scales in (("key", self.key), ("value", self.value)):
            if scales.ndim != 2 or not np.all(np.isfinite(scales)) or np.any(scales <= 0):
                raise ValueError(f"{name} scales must be finite and positive, shaped (layers, channels)")


def read_passages(path: Path) -> list[str]:
    """The operator's calibration text (`--calibration-text FILE`): passages separated by blank lines,
    the first MAX_PASSAGES of them. ValueError says what is wrong with the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    passages = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not passages:
        raise ValueError("no text in it")
    return passages[:MAX_PASSAGES]


def calibration_prompts(tokenizer: TextTokenizer, vocab: int, seed: int = 0,
                        passages: Sequence[str] = CALIBRATION_TEXTS) -> list[list[int]]:
    """`passages` (the built-in sample texts, or the operator's), each cut at PASSAGE_TOKENS, then
    RANDOM_PROMPTS prompts of random token ids."""
    rng = np.random.default_rng(seed)
    texts = [tokenizer.encode(text)[:PASSAGE_TOKENS] for text in passages]
    randoms = [rng.integers(0, vocab, RANDOM_PROMPT_TOKENS).tolist() for _ in range(RANDOM_PROMPTS)]
    return [ids for ids in texts + randoms if ids]


def calibrate(model: Any, prompts: list[list[int]]) -> KVScales:
    """Run `model` (a transformers causal LM) over `prompts`; the scales from the largest cached values."""
    import torch

    key_max: np.ndarray | None = None
    value_max: np.ndarray | None = None
    with torch.inference_mode():
        for ids in prompts:
            cache = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1).cache
            keys = np.stack([_channel_max(layer.keys) for layer in cache.layers])  # (layers, kv_heads * dim)
            values = np.stack([_channel_max(layer.values) for layer in cache.layers])
            key_max = keys if key_max is None else np.maximum(key_max, keys)
            value_max = values if value_max is None else np.maximum(value_max, values)
    if key_max is None or value_max is None:
        raise ValueError("no calibration prompts")
    return KVScales(scales_of(key_max), scales_of(value_max))


def scales_of(channel_max: np.ndarray) -> np.ndarray:
    """A channel that never moved (all zeros) still gets a usable scale: the smallest of the others."""
    floor = channel_max[channel_max > 0].min() if np.any(channel_max > 0) else 1.0
    return (np.maximum(channel_max, floor) * MARGIN / INT8_MAX).astype(np.float32)


def _channel_max(cached: Any) -> np.ndarray:
    """(1, kv_heads, S, dim) → (kv_heads * dim,): the largest |value| of each channel over positions."""
    return cached.float().abs().amax(dim=(0, 2)).reshape(-1).numpy()
