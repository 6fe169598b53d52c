"""Scoring a prompt while it is prefilled (`prompt_logprobs`): the rows line up with the tokens they
score, across chunk and piece boundaries, whether the runner returns every position or only the last."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest
from dsnode.inference import prompt_scoring
from dsnode.inference.prompt_scoring import first_scores, prefill_scoring
from dsnode.inference.sampling import token_logprob

VOCAB = 11


def causal_logits(prefix: Sequence[int]) -> np.ndarray:
    """A stand-in model: the logits after `prefix` depend on all of it."""
    return np.random.default_rng(abs(hash(tuple(prefix))) % 2**32).normal(size=VOCAB).astype(np.float32)


class LastOnly:
    """A runner like the edge's: prefill returns the last position's logits."""

    def __init__(self) -> None:
        self.fed: dict[str, list[int]] = {}
        self.calls = 0

    def prefill(self, seq_id: str, token_ids: Sequence[int], start: int) -> np.ndarray:
        return self._feed(seq_id, token_ids, start)[-1]

    def _feed(self, seq_id: str, token_ids: Sequence[int], start: int) -> np.ndarray:
        fed = self.fed.setdefault(seq_id, [])
        assert start == len(fed), "fed out of order"
        self.calls += 1
        rows = []
        for token in token_ids:
            fed.append(token)
            rows.append(causal_logits(fed))
        return np.stack(rows)


class EveryPosition(LastOnly):
    """A runner like the transformers one: it can return every fed position's logits."""

    def prefill_all(self, seq_id: str, token_ids: Sequence[int], start: int) -> np.ndarray:
        return self._feed(seq_id, token_ids, start)


PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]


def expected() -> list:
    return [None] + [token_logprob(causal_logits(PROMPT[:i]), PROMPT[i], 2) for i in range(1, len(PROMPT))]


@pytest.mark.parametrize("runner_type", [LastOnly, EveryPosition])
def test_every_prompt_token_is_scored_by_the_position_before_it(runner_type, monkeypatch):
    monkeypatch.setattr(prompt_scoring, "SCORED_PIECE_TOKENS", 4)  # pieces split inside the chunks
    runner, scores = runner_type(), first_scores(PROMPT)
    assert scores[0].token_id == 3 and scores[0].logprob is None and scores[1:] == [None] * 13
    last = None
    for start, end in ((0, 6), (6, 7), (7, len(PROMPT))):  # the scheduler's chunks
        last = prefill_scoring(runner, "s", PROMPT, start, end, scores, 2)
    assert scores[1:] == expected()[1:]
    assert np.array_equal(last, causal_logits(PROMPT))  # what the first generated token is sampled from
    assert runner.calls == (len(PROMPT) if runner_type is LastOnly else 5)  # one token, or pieces of 4


def test_positions_past_the_prompt_are_not_scored():
    """A sequence fed again after preemption carries its generated tokens: they score nothing."""
    runner, scores = EveryPosition(), first_scores(PROMPT[:5])
    prefill_scoring(runner, "s", PROMPT, 0, 9, scores, 0)
    assert len(scores) == 5 and all(e is not None and e.top == () for e in scores[1:])
