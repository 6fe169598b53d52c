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


# --- DeepSeek's FP8 layout ----------------------------------------------------------------------------
FP8_BLOCK = 128
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}


def stored_fp8(name: str, shape: tuple[int, ...]) -> bool:
    """What DeepSeek-V3/R1's checkpoint stores as FP8: the 2-D weights of the decoder layers' linears
    and experts; not the embeddings, the head, the norms or the router (`mlp.gate`)."""
    return (".layers." in name and name.endswith(".weight") and len(shape) == 2
            and ".mlp.gate." not in name and "norm" not in name)


def from_fp8_blocks(quantized: Any, scale: Any) -> Any:
    from dsnode.central.eight_bit import dequantize_fp8

    return dequantize_fp8(quantized, scale)


def write_fp8(source: Path, fp8_folder: Path, dequantized_folder: Path, shards: int = 4) -> None:
    """`source`'s checkpoint in DeepSeek's FP8 layout (F8_E4M3 weights + F32 `weight_scale_inv`, BF16
    for the rest, `quantization_config` in config.json, several shards with an index), and the same
    numbers dequantized to float32 in `dequantized_folder` (the reference it must agree with)."""
    import json

    import torch
    from dsnode.central.eight_bit import quantize_fp8_blocks
    from safetensors.torch import load_file, save_file

    tensors: dict[str, Any] = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    fp8: dict[str, Any] = {}
    dequantized: dict[str, Any] = {}
    for name, tensor in sorted(tensors.items()):
        if stored_fp8(name, tuple(tensor.shape)):
            quantized, scale = quantize_fp8_blocks(tensor)
            fp8[name], fp8[name + "_scale_inv"] = quantized, scale
            dequantized[name] = from_fp8_blocks(quantized, scale)
        else:
            fp8[name] = tensor.to(torch.bfloat16)
            dequantized[name] = fp8[name].float()
    _save_sharded(fp8, fp8_folder, shards, save_file)
    save_file(dequantized, str(dequantized_folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    for folder, extra in ((fp8_folder, {"quantization_config": FP8_QUANTIZATION_CONFIG, "dtype": "bfloat16"}),
                          (dequantized_folder, {})):
        (folder / "config.json").write_text(json.dumps({**config, **extra}, indent=2))
        for name in TOKENIZER_FILES:
            shutil.copy(source / name, folder / name)


def _save_sharded(tensors: dict[str, Any], folder: Path, shards: int, save_file: Any) -> None:
    import json

    names = sorted(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
