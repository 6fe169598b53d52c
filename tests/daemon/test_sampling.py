"""Sampling: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

import numpy as np
import pytest
from dsnode.inference.engine import SamplingParams
from dsnode.inference.sampling import TokenCounts, new_generator, process_logits, sample_token, token_logprob

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


# --- logits processors and log-probabilities ------------------------------------------------------------
def counts_of(vocab: int, tokens: list[int], prompt_len: int) -> TokenCounts:
    """The counts the engine would hold after generating tokens[prompt_len:], one at a time."""
    counts = TokenCounts(vocab, tokens[:prompt_len])
    for token in tokens[prompt_len:]:
        counts.add(token)
    return counts


def test_logit_bias_adds_to_its_ids_and_can_force_or_ban_a_token():
    params = SamplingParams(max_tokens=1, temperature=0, logit_bias=((0, 5.0), (1, -100.0), (99, 1.0)))
    out = process_logits(LOGITS, params, counts_of(5, [3], 1))
    assert np.allclose(out, LOGITS + np.array([5.0, -100.0, 0, 0, 0]))  # id 99 is past the logits: ignored
    assert sample_token(out, params, new_generator(params)) == 0
    assert np.array_equal(LOGITS, np.array([1.0, 3.0, 2.0, 0.5, 2.9], dtype=np.float32))  # the row is untouched


def test_presence_and_frequency_penalties_count_the_output_only():
    params = SamplingParams(max_tokens=1, presence_penalty=0.5, frequency_penalty=0.25)
    tokens = [1, 1, 4, 4, 4, 2]  # prompt: 1, 1 · output: 4, 4, 4, 2
    out = process_logits(LOGITS, params, counts_of(5, tokens, 2))
    expected = LOGITS - np.array([0, 0, 0.5 + 0.25, 0, 0.5 + 3 * 0.25])
    assert np.allclose(out, expected)
    negative = SamplingParams(max_tokens=1, presence_penalty=-1.0)  # negative values encourage repeats
    assert np.allclose(process_logits(LOGITS, negative, counts_of(5, tokens, 2))[[2, 4]], LOGITS[[2, 4]] + 1.0)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_prompt_and_output():
    logits = np.array([2.0, -2.0, 1.0, 4.0], dtype=np.float32)
    params = SamplingParams(max_tokens=1, repetition_penalty=2.0)
    out = process_logits(logits, params, counts_of(4, [0, 1, 1], 2))  # token 1 in both: penalised once
    assert np.allclose(out, [1.0, -4.0, 1.0, 4.0])


def test_greedy_takes_the_argmax_of_the_processed_logits():
    params = SamplingParams(max_tokens=1, temperature=0, frequency_penalty=2.0)
    tokens = [0, 1]  # the output so far: token 1, the argmax of the raw logits
    assert sample_token(process_logits(LOGITS, params, counts_of(5, tokens, 1)), params, new_generator(params)) == 4


def test_token_counts_ignore_ids_past_the_logits():
    counts = counts_of(3, [0, 7, 2, 9, 2], 2)  # a vocabulary padded differently from the tokenizer's
    assert counts.output.tolist() == [0, 0, 2] and counts.seen.tolist() == [True, False, True]


def test_processors_are_off_by_default():
    assert not SamplingParams(max_tokens=1).processes_logits
    assert SamplingParams(max_tokens=1, repetition_penalty=1.1).processes_logits
    assert SamplingParams(max_tokens=1, logit_bias=((1, 0.5),)).processes_logits


def test_token_logprob_is_log_softmax_with_the_best_alternatives_first():
    entry = token_logprob(LOGITS, 2, top=3)
    log_softmax = LOGITS - np.log(np.exp(LOGITS).sum())
    assert entry.token_id == 2 and np.isclose(entry.logprob, log_softmax[2], atol=1e-6)
    assert [t for t, _ in entry.top] == [1, 4, 2]
    assert np.allclose([lp for _, lp in entry.top], log_softmax[[1, 4, 2]], atol=1e-6)
    assert token_logprob(LOGITS, 0, top=0).top == ()
    huge = np.array([1000.0, 0.0, -1000.0], dtype=np.float32)  # no overflow, no NaN
    assert token_logprob(huge, 0, 2).logprob == 0.0 and np.isfinite(token_logprob(huge, 1, 2).logprob)


@pytest.mark.parametrize("temperature", [1e-320, 5e-324, 1e-6])
def test_a_vanishing_temperature_is_greedy_not_a_nan(temperature):
    """Found by tests/e2e/test_fuzz.py: logits divided by 1e-320 are infinite, and their softmax NaN."""
    params = SamplingParams(max_tokens=1, temperature=temperature)
    assert params.greedy and sample_token(LOGITS, params, new_generator(params)) == 1
    assert not SamplingParams(max_tokens=1, temperature=1e-4).greedy
