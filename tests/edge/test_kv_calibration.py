"""Per-channel int8 KV cache scales: chosen from the source model's largest cached values, never zero."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dsnode.edge.kv_calibration import INT8_MAX, MARGIN, KVScales, calibrate, calibration_prompts, scales_of
from dsnode.edge.validate import TEXT_PROMPTS
from dsnode.inference.tokenizer import TextTokenizer


def test_a_scale_maps_the_largest_value_seen_inside_the_int8_range_with_the_margin():
    scales = scales_of(np.array([[2.54, 0.0, 1.27]], np.float32))
    np.testing.assert_allclose(scales, [[2.54 * MARGIN / INT8_MAX, 1.27 * MARGIN / INT8_MAX, 1.27 * MARGIN / INT8_MAX]],
                               rtol=1e-6)  # a channel that never moved borrows the smallest usable range
    assert np.all(np.round(2.54 / scales[0, 0]) <= INT8_MAX)


@pytest.mark.parametrize("bad", [np.zeros((2, 4), np.float32), np.full((2, 4), np.nan, np.float32),
                                 np.ones(4, np.float32)])
def test_scales_must_be_finite_positive_and_per_layer(bad):
    with pytest.raises(ValueError, match="finite and positive"):
        KVScales(bad, np.ones((2, 4), np.float32))


@pytest.fixture(scope="module")
def source(dense_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()


def test_calibration_covers_every_channel_of_every_layer_with_what_the_cache_holds(source, dense_dir):
    tokenizer = TextTokenizer.from_folder(dense_dir)
    prompts = calibration_prompts(tokenizer, source.config.vocab_size)
    scales = calibrate(source, prompts)
    config = source.config
    channels = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    assert scales.key.shape == scales.value.shape == (config.num_hidden_layers, channels)
    with torch.inference_mode():  # every cached value of a calibration prompt fits its channel's range
        cache = source(input_ids=torch.tensor([prompts[0]]), use_cache=True).cache
    for layer, cached in enumerate(cache.layers):
        keys = cached.keys[0].permute(0, 2, 1).reshape(channels, -1).numpy()  # (channels, positions)
        assert np.all(np.abs(keys) / scales.key[layer][:, None] <= INT8_MAX / MARGIN + 1e-3)


def test_calibration_text_is_not_the_validation_text(dense_dir):
    tokenizer = TextTokenizer.from_folder(dense_dir)
    calibration = {tuple(ids) for ids in calibration_prompts(tokenizer, 1000)}
    assert not calibration & {tuple(tokenizer.encode(text)) for text in TEXT_PROMPTS}


def test_an_operator_s_text_is_split_into_passages_and_capped(tmp_path, dense_dir):
    from dsnode.edge.kv_calibration import MAX_PASSAGES, PASSAGE_TOKENS, RANDOM_PROMPTS, read_passages

    text = tmp_path / "domain.txt"
    text.write_text("\n\n".join(f"passage {i}\nline two of {i}" for i in range(MAX_PASSAGES + 5)) + "\n\n"
                    + "word " * 3000)
    passages = read_passages(text)
    assert len(passages) == MAX_PASSAGES and passages[0] == "passage 0\nline two of 0"
    tokenizer = TextTokenizer.from_folder(dense_dir)
    prompts = calibration_prompts(tokenizer, 1000, passages=["word " * 3000, "short"])
    assert [len(p) for p in prompts[:2]] == [PASSAGE_TOKENS, len(tokenizer.encode("short"))]
    assert len(prompts) == 2 + RANDOM_PROMPTS
