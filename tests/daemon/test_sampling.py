"""Sampling: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

import numpy as np
import pytest
from dsnode.inference.engine import SamplingParams
from dsnode.inference.sampling import (
    TokenCounts,
    hold_end,
    new_generator,
    nucleus_floor,
    process_logits,
    sample_token,
    token_logprob,
)

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


# --- sampling without sorting the vocabulary ------------------------------------------------------------
def sorted_nucleus(logits: np.ndarray, temperature: float, top_p: float) -> set[int]:
    """The nucleus as the rule defines it: sort the whole vocabulary by probability (ties by id), keep
    the shortest prefix whose mass reaches top_p."""
    scaled = logits.astype(np.float64) / temperature
    ids = np.argsort(-scaled, kind="stable")
    probs = np.exp(scaled[ids] - scaled.max())
    probs /= probs.sum()
    keep = int(np.searchsorted(np.cumsum(probs), top_p, side="left")) + 1
    return set(ids[:keep].tolist())


def mask_of(logits: np.ndarray, temperature: float, top_p: float) -> set[int]:
    log_weights = logits.astype(np.float32) / np.float32(temperature)
    log_weights -= log_weights.max()
    weights = np.exp(log_weights)
    return set(np.flatnonzero(weights >= nucleus_floor(log_weights, weights, top_p)).tolist())


RNG = np.random.default_rng(5)
DISTRIBUTIONS = {
    "flat (a random model's)": RNG.standard_normal(32000).astype(np.float32) * 0.64,
    "spread": RNG.standard_normal(32000).astype(np.float32) * 3,
    "peaked (a trained model's)": np.concatenate([[12.0, 10.5, 9.0], RNG.standard_normal(129277) - 4]).astype(
        np.float32),
    "masked": np.where(RNG.random(5000) < 0.9, -np.inf, RNG.standard_normal(5000)).astype(np.float32),
    "over 32 nats": np.concatenate([[40.0], RNG.standard_normal(999)]).astype(np.float32),
}


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
@pytest.mark.parametrize("top_p, temperature", [(0.95, 0.6), (0.5, 1.0), (0.99, 1.5), (0.9, 0.1), (0.999999, 1.0)])
def test_the_bucketed_nucleus_is_the_one_sorting_the_whole_vocabulary_keeps(name, top_p, temperature):
    logits = DISTRIBUTIONS[name]
    ours, theirs = mask_of(logits, temperature, top_p), sorted_nucleus(logits, temperature, top_p)
    assert len(ours ^ theirs) <= 1, (len(ours), len(theirs))  # at most the crossing token, by rounding
    assert ours == theirs or abs(len(ours) - len(theirs)) == 1


def test_top_p_draws_only_the_nucleus_in_proportion():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.06, 0.04])).astype(np.float32)
    params = SamplingParams(max_tokens=1, top_p=0.8, seed=9)  # nucleus: 0.5 + 0.25 + 0.15 (crosses 0.8)
    rng = new_generator(params)
    counts = np.bincount([sample_token(logits, params, rng) for _ in range(20000)], minlength=5) / 20000
    assert counts[3] == counts[4] == 0
    assert np.allclose(counts[:3], np.array([0.5, 0.25, 0.15]) / 0.9, atol=0.015)


def test_the_full_distribution_is_drawn_in_id_order_with_the_right_frequencies():
    logits = np.array([np.log(0.1), -np.inf, np.log(0.6), np.log(0.3)], dtype=np.float32)  # id 1: masked out
    params = SamplingParams(max_tokens=1, seed=2)
    rng = new_generator(params)
    counts = np.bincount([sample_token(logits, params, rng) for _ in range(20000)], minlength=4) / 20000
    assert counts[1] == 0 and np.allclose(counts, [0.1, 0.0, 0.6, 0.3], atol=0.015)


def test_non_finite_logits_are_an_error_not_a_token():
    params = SamplingParams(max_tokens=1, seed=1)
    with pytest.raises(ValueError, match="finite"):
        sample_token(np.array([0.0, np.nan, 1.0], dtype=np.float32), params, new_generator(params))


def test_a_large_vocabulary_is_drawn_block_by_block_with_the_right_frequencies():
    """Over 4,096 weights the draw picks a block, then a token in it: every token keeps its probability,
    and masked ones (a constraint's -inf) stay impossible, also at the ends of blocks."""
    rng = np.random.default_rng(3)
    logits = np.full(10000, -np.inf, dtype=np.float32)
    allowed = np.array([0, 1023, 1024, 5000, 9999])  # block edges included
    logits[allowed] = np.log([0.1, 0.2, 0.3, 0.15, 0.25])
    params = SamplingParams(max_tokens=1, seed=4)
    draw = new_generator(params)
    counts = np.bincount([sample_token(logits, params, draw) for _ in range(20000)], minlength=10000) / 20000
    assert set(np.flatnonzero(counts)) == set(allowed.tolist())
    assert np.allclose(counts[allowed], [0.1, 0.2, 0.3, 0.15, 0.25], atol=0.015)
    flat = rng.standard_normal(32000).astype(np.float32)  # many blocks, none empty: the mean id is central
    ids = [sample_token(flat, params, draw) for _ in range(4000)]
    assert abs(np.mean(ids) - 16000) < 600 and len(set(ids)) > 3000


def test_min_p_cuts_tokens_under_a_fraction_of_the_likeliest():
    logits = np.log(np.array([0.5, 0.3, 0.12, 0.08])).astype(np.float32)  # relative: 1, 0.6, 0.24, 0.16
    params = SamplingParams(max_tokens=1, min_p=0.2, seed=3)
    rng = new_generator(params)
    counts = np.bincount([sample_token(logits, params, rng) for _ in range(20000)], minlength=4) / 20000
    assert counts[3] == 0 and np.allclose(counts[:3], np.array([0.5, 0.3, 0.12]) / 0.92, atol=0.015)
    with_top_k = SamplingParams(max_tokens=1, min_p=0.5, top_k=3, seed=3)  # the top-k path: 1, 0.6 stay
    rng = new_generator(with_top_k)
    assert set(sample_token(logits, with_top_k, rng) for _ in range(2000)) == {0, 1}


def test_hold_end_masks_the_end_tokens_in_a_copy():
    out = hold_end(LOGITS, {1, 4, 99})
    assert out[1] == out[4] == -np.inf and np.array_equal(out[[0, 2, 3]], LOGITS[[0, 2, 3]])
    assert LOGITS[1] == 3.0
