"""Tiny random MoE checkpoints for the expert-parallel tests, saved as transformers saves them
(per-expert tensors, several shards), with the bundled tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")

# DeepSeek-V3 layout, 18 routed experts (4 ranks hold 5, 5, 4, 4), routed experts ≈ 94% of the weights
DEEPSEEK_V3 = dict(
    vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=1024, num_hidden_layers=4,
    first_k_dense_replace=1, n_routed_experts=18, n_shared_experts=1, num_experts_per_tok=4, n_group=3,
    topk_group=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=2048,
    initializer_range=0.1, bos_token_id=0, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
)
COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=512,
              initializer_range=0.1, bos_token_id=0, eos_token_id=2, pad_token_id=3)


def model_config(architecture: str) -> Any:
    from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig

    if architecture == "deepseek_v3":
        return DeepseekV3Config(**DEEPSEEK_V3)
    if architecture == "mixtral":
        return MixtralConfig(num_local_experts=6, **COMMON)
    return Qwen2MoeConfig(num_experts=6, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                          **COMMON)


def build(architecture: str, folder: Path, tokenizer_dir: Path, seed: int = 0,
          max_shard_size: str = "24MB") -> Any:
    """Random weights (a non-zero DeepSeek correction bias), saved in several shards; returns the model."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(architecture)).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.1)
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, folder / name)
    return model


def greedy(model: Any, prompt_ids: list[int], max_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def link_copy(source: Path, target: Path) -> Path:
    """A copy of a model folder made of hard links (cheap), to break one file of."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        (target / item.name).hardlink_to(item)
    return target
