"""Sampling: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

import numpy as np
import pytest
from dsnode.inference.engine import SamplingParams
from dsnode.inference.sampling import new_generator, sample_token

LOGITS = np.array([1.0, 3.0, 2.0, 0.5, 2.9], dtype=np.float32)


def draws(params: SamplingParams, n: int = 2000) -> np.ndarray:
    rng = new_generator(params)
    return np.array([sample_token(LOGITS, params, rng) for _ in range(n)])


def test_greedy_is_argmax():
    assert sample_token(LOGITS, SamplingParams(max_tokens=1, temperature=0), new_generator(SamplingParams(1))) == 1
    assert sample_token(LOGITS, SamplingParams(max_tokens=1, top_k=1), new_generator(SamplingParams(1))) == 1


def test_top_k_only_draws_the_k_best():
    assert set(draws(SamplingParams(max_tokens=1, top_k=2))) == {1, 4}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # probabilities of [3.0, 2.9] ≈ 0.39, 0.35: together ≥ 0.7, so id 2 (≈0.14) is never drawn
    assert set(draws(SamplingParams(max_tokens=1, top_p=0.7))) == {1, 4}
    assert set(draws(SamplingParams(max_tokens=1, top_p=0.01))) == {1}


def test_full_distribution_matches_softmax():
    counts = np.bincount(draws(SamplingParams(max_tokens=1, seed=3), 20000), minlength=5) / 20000
    expected = np.exp(LOGITS - LOGITS.max()) / np.exp(LOGITS - LOGITS.max()).sum()
    assert np.allclose(counts, expected, atol=0.02)


def test_low_temperature_sharpens():
    hot = np.mean(draws(SamplingParams(max_tokens=1, temperature=2.0, seed=1)) == 1)
    cold = np.mean(draws(SamplingParams(max_tokens=1, temperature=0.2, seed=1)) == 1)
    assert cold > hot + 0.2


def test_same_seed_same_tokens_different_seed_differs():
    a = draws(SamplingParams(max_tokens=1, seed=42), 200)
    b = draws(SamplingParams(max_tokens=1, seed=42), 200)
    c = draws(SamplingParams(max_tokens=1, seed=43), 200)
    assert (a == b).all() and not (a == c).all()


@pytest.mark.parametrize("top_k", [0, 5, 100])
def test_top_k_off_or_larger_than_vocab_draws_everything(top_k):
    assert set(draws(SamplingParams(max_tokens=1, top_k=top_k, temperature=5.0, seed=0), 3000)) == {0, 1, 2, 3, 4}


def test_a_negative_seed_is_a_seed_too():
    """OpenAI clients may send any signed 64-bit seed (found by tests/e2e/test_fuzz.py)."""
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=-4367879369836)
    assert (draws(params, 50) == draws(params, 50)).all()
