"""ModelShape: what the GQA builder reads from config.json; its rotary tables against transformers'."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dsnode.edge.manifest import read_manifest
from dsnode.edge.model_shape import NotBuildable, model_shape
from dsnode.edge.op_coverage import check_file

from tests.edge.conftest import convert_cli, copy_tokenizer

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # head_dim 16: kept, interpolated and divided frequencies
# Qwen2.5's long-context form (factor 4 over the original context), scaled down: original 64 of 512
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def tiny_llama(rope_scaling: dict | None):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rope_scaling=rope_scaling, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2,
                       pad_token_id=3)


@pytest.mark.parametrize("rope_scaling", [
    None, {"rope_type": "linear", "factor": 4.0}, LLAMA3, YARN,
    {**YARN, "beta_fast": 16, "beta_slow": 2, "attention_factor": 1.3},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "mscale": 0.707,
     "mscale_all_dim": 1.0},  # DeepSeek-V3's form: the attention factor from mscale / mscale_all_dim
], ids=["default", "linear", "llama3", "yarn", "yarn-explicit", "yarn-mscale"])
def test_the_rotary_tables_are_transformers_own(rope_scaling):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = tiny_llama(rope_scaling)
    shape = model_shape(config.to_dict())
    cos, sin = shape.rotary_caches()  # (512, 8)
    positions = torch.arange(512)[None]
    want_cos, want_sin = LlamaRotaryEmbedding(config)(torch.zeros(1, 512, 16), positions)  # (1, 512, 16)
    np.testing.assert_allclose(cos, want_cos[0, :, :8].numpy(), atol=2e-5)
    np.testing.assert_allclose(sin, want_sin[0, :, :8].numpy(), atol=2e-5)
    if rope_scaling:  # the scaling changed something: not the unscaled tables
        default_cos, _ = model_shape(tiny_llama(None).to_dict()).rotary_caches()
        assert not np.allclose(cos, default_cos, atol=1e-3)


@pytest.mark.parametrize(("change", "message"), [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, r"rope_type 'dynamic'"),  # depends on the length
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"'llama3' without low_freq_factor, high_freq_factor"),
    ({"partial_rotary_factor": 0.5}, r"partial rotary"),
])
def test_ropes_the_builder_does_not_compute_take_the_export_path_saying_why(change, message):
    config = {**tiny_llama(None).to_dict(), **change}
    config.pop("rope_parameters", None)
    with pytest.raises(NotBuildable, match=message):
        model_shape(config)


@pytest.mark.parametrize("rope_scaling", [LLAMA3, YARN], ids=["llama3", "yarn"])
def test_a_scaled_rope_model_is_built_for_cuda_and_cpu_and_matches_its_source(tmp_path, dense_dir, rope_scaling):
    """R1-Distill-Llama's rope (llama3) and Qwen2.5's long-context one (yarn): built by the GQA builder
    (so --target cuda converts), validated on the CPU against torch."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    src = tmp_path / "src"
    LlamaForCausalLM(tiny_llama(rope_scaling)).save_pretrained(src)
    copy_tokenizer(dense_dir, src)
    run = convert_cli(str(src), str(tmp_path / "float"), "--quant", "none", "--quiet")
    assert run.code == 0, run.stderr
    assert read_manifest(tmp_path / "float").graph == "gqa"
    report = json.loads((tmp_path / "float" / "validation.json").read_text())
    assert report["agreement"] == 1.0 and report["max_abs_logit_error"] < 1e-3
    run = convert_cli(str(src), str(tmp_path / "cuda"), "--target", "cuda", "--min-agreement", "0", "--quiet")
    assert run.code == 0, run.stderr
    assert read_manifest(tmp_path / "cuda").target == "cuda"


def tiny_qwen3(**changes):
    from transformers import Qwen3Config

    # head_dim 32 with hidden 64 / 4 heads: q/k/v wider than the hidden size, as in Qwen3-0.6B
    return Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=3, **changes)


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_a_qwen3_model_with_per_head_qk_norms_is_built_and_matches_its_source(tmp_path, dense_dir, target):
    """DeepSeek-R1-0528-Qwen3-8B's architecture: q and k heads RMS-normalised before the rotary embedding.
    Float on the CPU matches torch to rounding; int8 converts for either target and validates."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3())
    with torch.no_grad():  # trained norms are not all ones: make the q/k norms matter
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    src = tmp_path / "src"
    model.save_pretrained(src)
    copy_tokenizer(dense_dir, src)
    assert model_shape(json.loads((src / "config.json").read_text())).qk_norm
    if target == "cpu":
        run = convert_cli(str(src), str(tmp_path / "float"), "--quant", "none", "--quiet")
        assert run.code == 0, run.stderr
        assert read_manifest(tmp_path / "float").graph == "gqa"
        report = json.loads((tmp_path / "float" / "validation.json").read_text())
        assert report["agreement"] == 1.0 and report["max_abs_logit_error"] < 1e-3
    run = convert_cli(str(src), str(tmp_path / "int8"), "--target", target, "--quiet")
    assert run.code == 0, run.stderr
    assert read_manifest(tmp_path / "int8").target == target
    if target == "cuda":  # the norms' Reshape/Split/Concat have CUDA kernels: nothing falls back to the CPU
        assert check_file(tmp_path / "int8" / "model.onnx") == []


def test_qwen_sliding_windows_take_the_export_path():
    with pytest.raises(NotBuildable, match="sliding-window"):
        model_shape(tiny_qwen3(use_sliding_window=True, sliding_window=128).to_dict())
