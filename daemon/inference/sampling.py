"""Token sampling shared by every engine: numpy only, so the edge needs no torch.

Order as in Hugging Face / vLLM: temperature, then top-k, then top-p (nucleus), then a draw from the
request's own random generator (seeded when the request gives `seed`, so the same seed gives the same
text whatever else is in the batch).
"""

from __future__ import annotations

import numpy as np

from .engine import SamplingParams


def new_generator(params: SamplingParams) -> np.random.Generator:
    seed = params.seed
    if seed is not None and seed < 0:  # OpenAI's seed is a signed 64-bit integer; numpy's is not signed
        seed &= 2**64 - 1
    return np.random.default_rng(seed)


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """logits: (vocab,) float. Returns one token id."""
    if params.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature  # (V,)
    candidates = _top_k_indices(scaled, params.top_k)
    probs = _softmax(scaled[candidates])
    candidates, probs = _top_p_filter(candidates, probs, params.top_p)
    return int(candidates[rng.choice(len(candidates), p=probs)])


def _top_k_indices(scaled: np.ndarray, top_k: int) -> np.ndarray:
    """Candidate ids sorted by decreasing logit (all of them when top_k is 0)."""
    if 0 < top_k < scaled.shape[0]:
        part = np.argpartition(-scaled, top_k - 1)[:top_k]
        return part[np.argsort(-scaled[part], kind="stable")]
    return np.argsort(-scaled, kind="stable")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _top_p_filter(ids: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep the smallest prefix (probs sorted descending) whose mass reaches top_p; renormalise."""
    if top_p >= 1.0:
        return ids, probs
    cumulative = np.cumsum(probs)
    keep = int(np.searchsorted(cumulative, top_p, side="left")) + 1
    kept = probs[:keep]
    return ids[:keep], kept / kept.sum()
