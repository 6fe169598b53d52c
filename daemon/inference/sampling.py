"""Token sampling shared by every engine: numpy only, so the edge needs no torch.

Order as in Hugging Face / vLLM: the logits processors (`process_logits`: logit_bias, the repetition,
frequency and presence penalties), then temperature, then top-k, then top-p (nucleus), then min-p, then
a draw from the request's own random generator (seeded when the request gives `seed`, so the same seed
gives the same text whatever else is in the batch). Greedy takes the argmax of the processed logits.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .engine import SamplingParams, TokenLogprob


def new_generator(params: SamplingParams) -> np.random.Generator:
    seed = params.seed
    if seed is not None and seed < 0:  # OpenAI's seed is a signed 64-bit integer; numpy's is not signed
        seed &= 2**64 - 1
    return np.random.default_rng(seed)


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """logits: (vocab,) float. Returns one token id.

    Never sorts the whole vocabulary (a sort of DeepSeek's 129,280 logits took ~11 ms per token): top-k
    sorts its k; top-p buckets the tokens by log-probability and sorts only the bucket where the
    nucleus ends; the draw is by the cumulative distribution in id order. The exponentials are
    float32 (float64's took ~1 ms over that vocabulary), the sums float64."""
    if params.greedy:
        return int(np.argmax(logits))
    scaled = np.array(logits, dtype=np.float32)  # (V,): one new array, worked on in place
    scaled /= np.float32(params.temperature)
    if 0 < params.top_k < scaled.shape[0]:
        candidates = _top_k_indices(scaled, params.top_k)
        probs = _softmax(scaled[candidates].astype(np.float64))
        candidates, probs = _top_p_filter(candidates, probs, params.top_p)
        probs[probs < params.min_p * probs[0]] = 0.0  # min-p: against the likeliest, which is first
        return _draw(candidates, probs, rng)
    scaled -= scaled.max()  # log-weights, the largest 0
    weights = np.exp(scaled)  # probabilities relative to the likeliest's
    if params.top_p < 1.0:
        weights[weights < nucleus_floor(scaled, weights, params.top_p)] = 0.0
    if params.min_p > 0.0:
        weights[weights < params.min_p] = 0.0
    return _draw(None, weights, rng)


_BUCKETS_PER_NAT = 16
_BUCKETS = 32 * _BUCKETS_PER_NAT  # log-weights under -32 share the last bucket


def nucleus_floor(log_weights: np.ndarray, weights: np.ndarray, top_p: float) -> float:
    """The smallest weight in the top-p nucleus: the tokens weighing at least this much are the
    smallest most-probable set whose probability reaches top_p (the prefix the whole vocabulary sorted
    by probability would keep, the token that crosses top_p included; tokens tied with it are in too).

    Only tokens of probability at least (1 - top_p) / V can be in it (the others together hold less
    than 1 - top_p). Those are bucketed by log-weight, 1/16 nat wide: the buckets above the one where
    the mass reaches top_p are in whole, and only that bucket's weights are sorted."""
    total = float(weights.sum(dtype=np.float64))
    need = top_p * total
    candidates = weights >= (1.0 - top_p) / weights.shape[0] * total
    mass, logs = weights[candidates], log_weights[candidates]
    bucket = np.minimum(-logs * _BUCKETS_PER_NAT, _BUCKETS - 1).astype(np.int32)  # 0: most probable
    cumulative = np.cumsum(np.bincount(bucket, weights=mass, minlength=_BUCKETS))
    last = min(int(np.searchsorted(cumulative, need, side="left")), _BUCKETS - 1)
    before = float(cumulative[last - 1]) if last > 0 else 0.0
    edge = np.sort(mass[bucket == last])[::-1]  # that bucket's weights, largest first
    keep = int(np.searchsorted(before + np.cumsum(edge, dtype=np.float64), need, side="left"))
    return float(edge[min(keep, edge.shape[0] - 1)])


_DRAW_BLOCK = 1024  # over 4 blocks of weights, the draw picks a block first (a cumsum of the block
# sums, then one inside the block) instead of a cumsum over the whole vocabulary


def _draw(candidates: np.ndarray | None, weights: np.ndarray, rng: np.random.Generator) -> int:
    """One index drawn in proportion to `weights` by one uniform number and the cumulative sum (as
    `Generator.choice` does), mapped through `candidates` when given. A token of weight 0 is never
    drawn."""
    starts = np.arange(0, weights.shape[0], _DRAW_BLOCK) if weights.shape[0] > 4 * _DRAW_BLOCK else None
    sums = weights if starts is None else np.add.reduceat(weights, starts, dtype=np.float64)
    cumulative = np.cumsum(sums, dtype=np.float64)
    total = cumulative[-1]
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"cannot sample: the probabilities sum to {total} (are the logits finite?)")
    target = rng.random() * total
    index = _positive_at_or_before(sums, int(np.searchsorted(cumulative, target, side="right")))
    if starts is not None:
        block = weights[starts[index] : starts[index] + _DRAW_BLOCK]
        inside = np.cumsum(block, dtype=np.float64)
        target -= cumulative[index] - sums[index]  # how far into the block
        inner = int(np.searchsorted(inside, target, side="right"))
        index = int(starts[index]) + _positive_at_or_before(block, inner)
    return int(index if candidates is None else candidates[index])


def _positive_at_or_before(weights: np.ndarray, index: int) -> int:
    """`index`, or the last index before it of a positive weight (rounding can put a draw just past the
    end of a cumulative sum whose last entries weigh nothing)."""
    index = min(index, weights.shape[0] - 1)
    if weights[index] > 0:
        return index
    return int(np.flatnonzero(weights[:index])[-1])


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
        penalty = params.repetition_penalty
        out[counts.seen] = np.where(seen > 0, seen / penalty, seen * penalty)
    if params.frequency_penalty or params.presence_penalty:
        generated = counts.output > 0
        out[generated] -= counts.output[generated] * params.frequency_penalty + params.presence_penalty
    return out


def hold_end(logits: np.ndarray, end_ids: Iterable[int]) -> np.ndarray:
    """logits with the end-of-sequence and stop token ids at -inf (`min_tokens` not reached yet), as a
    new array."""
    out = np.array(logits, dtype=np.float32, copy=True)
    ids = [i for i in end_ids if i < out.shape[0]]
    out[ids] = -np.inf
    return out


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """The log-probability of `token` under softmax(logits), and the `top` most likely tokens (best
    first, ties by id). The exponentials float32, their sum and the logarithm float64."""
    shifted = np.array(logits, dtype=np.float32)
    shifted -= shifted.max()
    log_total = float(np.log(np.exp(shifted).sum(dtype=np.float64)))
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        ids = _top_k_indices(shifted, min(top, shifted.shape[0]))
        best = tuple((int(i), float(shifted[i]) - log_total) for i in ids)
    rank = 1 + int(np.count_nonzero(shifted > shifted[token]))
    return TokenLogprob(int(token), float(shifted[token]) - log_total, best, rank)


def _top_k_indices(scaled: np.ndarray, top_k: int) -> np.ndarray:
    """The top_k ids by decreasing value, ties by id (0 < top_k <= V)."""
    if top_k < scaled.shape[0]:
        part = np.sort(np.argpartition(scaled, scaled.shape[0] - top_k)[-top_k:])
    else:
        part = np.arange(scaled.shape[0])
    return part[np.argsort(-scaled[part], kind="stable")]


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
