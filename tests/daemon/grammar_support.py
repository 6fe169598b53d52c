"""A small real tokenizer (byte-level BPE with the bundled format markers) and a random 'model', for
constrained-decoding tests that need no trained weights."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from dsnode.central.bundled.tokenizer import CHAT_TEMPLATE, IM_END, train_tokenizer
from dsnode.inference.engine import SamplingParams
from dsnode.inference.grammar import Constraint, start_guide
from dsnode.inference.sampling import sample_token
from dsnode.inference.tokenizer import TextTokenizer

TEXT = ('{"name": "Ishmael", "year": 1851, "tags": ["sea", "whale"], "ok": true}\n'
        "It was the best of times, it was the worst of times.\n") * 4


def small_tokenizer(template: str = CHAT_TEMPLATE, extra_markers: list[str] | None = None) -> TextTokenizer:
    from tokenizers import AddedToken

    tok = train_tokenizer(TEXT, 300)
    if extra_markers:
        tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in extra_markers])
    raw = tok.to_str()
    eos = tok.token_to_id(IM_END)
    return TextTokenizer(tok, template, None, IM_END, frozenset({eos}), hashlib.sha256(raw.encode()).hexdigest())


def generate(tokenizer: TextTokenizer, constraint: Constraint, max_tokens: int, seed: int,
             prefer: dict[int, float] | None = None) -> tuple[str, str]:
    """Random logits (a model that knows nothing) under the constraint, sampled as the engine does.
    Returns (text, finish reason)."""
    rng = np.random.default_rng(seed)
    guide = start_guide(tokenizer, constraint, max_tokens)
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0)
    ids: list[int] = []
    for step in range(max_tokens):
        logits = rng.normal(0, 3, tokenizer.vocab_size + 7).astype(np.float32)  # (V+pad,) as real models pad
        for token, boost in (prefer or {}).items():
            logits[token] += boost
        token = sample_token(guide.mask(logits, max_tokens - step), params, rng)
        if token in tokenizer.eos_token_ids:
            return tokenizer.decode(ids, skip_special_tokens=False), "stop"
        guide.accept(token)
        ids.append(token)
        if guide.finished:
            return tokenizer.decode(ids, skip_special_tokens=False), "stop"
    return tokenizer.decode(ids, skip_special_tokens=False), "length"


def loads(text: str) -> object:
    return json.loads(text)
