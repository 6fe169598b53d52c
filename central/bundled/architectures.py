"""Configurations of the bundled models: a dense Qwen2 (the R1-Distill-Qwen family, for edges) and a
DeepSeek-V3 Mixture-of-Experts (MLA attention, routed + shared experts, for centrals)."""

from __future__ import annotations

from typing import Any


def dense_config(vocab_size: int, special: dict[str, int]) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        **special,
    )


def moe_config(vocab_size: int, special: dict[str, int]) -> Any:
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=96,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        kv_lora_rank=64,
        q_lora_rank=96,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=2048,
        rope_scaling=None,
        tie_word_embeddings=False,
        **special,
    )
