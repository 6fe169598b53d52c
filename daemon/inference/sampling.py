"""Token sampling shared by every engine: numpy only, so the edge needs no torch.

Order as in Hugging Face / vLLM: the logits processors (`process_logits`: logit_bias, the repetition,
frequency and presence penalties), then temperature, then top-k, then top-p (nucleus), then a draw from
the request's own random generator (seeded when the request gives `seed`, so the same seed gives the
same text whatever else is in the batch). Greedy takes the argmax of the processed logits.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .engine import SamplingParams, TokenLogprob


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


class TokenCounts:
    """What the penalties look at, kept up to date token by token (a step costs O(vocabulary), not
    O(answer length)): how often each token is in the output, and which are in the prompt or output."""

    def __init__(self, vocab: int, prompt: Sequence[int]) -> None:
        self.output = np.zeros(vocab, dtype=np.int32)
        self.seen = np.zeros(vocab, dtype=bool)
        ids = np.asarray(prompt, dtype=np.int64)
        self.seen[ids[ids < vocab]] = True

    def add(self, token: int) -> None:
        if token < self.output.shape[0]:
            self.output[token] += 1
            self.seen[token] = True


def process_logits(logits: np.ndarray, params: SamplingParams, counts: TokenCounts) -> np.ndarray:
    """logits (V,) with the request's processors applied, as a new float32 array (the engine's row is
    left as it is).

    - logit_bias: added to its token ids (the API refused ids outside the model's vocabulary; ids
      past these logits are ignored).
    - repetition_penalty (transformers, vLLM): every token of the prompt and the output so far has its
      logit divided by the penalty when positive, multiplied when negative.
    - frequency_penalty and presence_penalty (OpenAI): minus count x frequency_penalty and, for a
      token generated at least once, minus presence_penalty; counted over the output only.
    """
    out = np.array(logits, dtype=np.float32, copy=True)
    vocab = out.shape[0]
    for token, bias in params.logit_bias:
        if token < vocab:
            out[token] += bias
    if params.repetition_penalty != 1.0:
        seen = out[counts.seen]
        out[counts.seen] = np.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
    if params.frequency_penalty or params.presence_penalty:
        generated = counts.output > 0
        out[generated] -= counts.output[generated] * params.frequency_penalty + params.presence_penalty
    return out


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """The log-probability of `token` under softmax(logits), and the `top` most likely tokens (best
    first, ties by id)."""
    shifted = logits.astype(np.float64) - float(np.max(logits))
    logprobs = shifted - np.log(np.exp(shifted).sum())
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        ids = _top_k_indices(logprobs, top)
        best = tuple((int(i), float(logprobs[i])) for i in ids)
    return TokenLogprob(int(token), float(logprobs[token]), best)


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
