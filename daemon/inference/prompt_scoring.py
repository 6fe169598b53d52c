"""The log-probability of every prompt token (`prompt_logprobs`: a text completion's `echo` with
`logprobs`), computed while the prompt is prefilled.

Position i's logits score token i + 1. A runner that can return every position's logits of a chunk
(`prefill_all`: the transformers and DeepSpeed runners, the edge's `SlotRunner`) is fed in pieces of
`SCORED_PIECE_TOKENS`, so at most that many rows of the vocabulary are on the host at once (256 x
129,280 float32 = 132 MB for DeepSeek's); any other runner (the edge's legacy `export` graphs) is fed
one token at a time, each call a decode-sized step: slower, and only for the requests that ask.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from .engine import TokenLogprob
from .runner import ModelRunner
from .sampling import token_logprob

SCORED_PIECE_TOKENS = 256


class ScoringRunner(Protocol):
    def prefill_all(self, seq_id: str, token_ids: Sequence[int], start: int) -> np.ndarray:
        """As `prefill`, returning the logits of every fed position (n, V)."""
        ...


def first_scores(prompt: Sequence[int]) -> list[TokenLogprob | None]:
    """A prompt's entries before any is scored: its first token has no log-probability."""
    return [TokenLogprob(int(prompt[0]), None), *([None] * (len(prompt) - 1))]


def prefill_scoring(runner: ModelRunner, seq_id: str, tokens: Sequence[int], start: int, end: int,
                    scores: list[TokenLogprob | None], top: int) -> np.ndarray:
    """Prefill tokens[start:end] of `seq_id`, filling `scores` for the prompt positions their logits
    score; returns the last position's logits (V,), as `prefill` does."""
    every = getattr(runner, "prefill_all", None)
    piece = SCORED_PIECE_TOKENS if every is not None else 1
    rows = np.empty((0, 0), np.float32)
    for at in range(start, end, piece):
        fed = tokens[at : min(end, at + piece)]
        rows = every(seq_id, fed, at) if every is not None else runner.prefill(seq_id, fed, at)[None]
        for r, row in enumerate(rows):
            target = at + r + 1
            if target < len(scores):
                scores[target] = token_logprob(row, tokens[target], top)
    last: np.ndarray = rows[-1]
    return last
