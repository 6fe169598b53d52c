"""A random-weight Qwen2 checkpoint written straight to bf16 safetensors shards, like a published one.

No transformers model is built: its initialisers and `save_pretrained` took most of the GPU check's
edge section at 7B (2026-11-30). Norm weights are 1, everything else N(0, 0.02), drawn on `device`
(a GPU draws 7.6B values in well under a second); one shard of ~`shard_bytes` is in memory at a time.
Used by benchmarks/bench_convert_7b.py and scripts/gpu_check_edge.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# DeepSeek-R1-Distill-Qwen-7B's config (random weights; special-token ids of the bundled tokenizer)
QWEN2_7B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 3, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28, "attention_dropout": 0.0,
    "initializer_range": 0.02, "use_cache": True,
}
SHARD_BYTES = 4 * 10**9


def tensor_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Qwen2 checkpoint (untied LM head, q/k/v biases), in the published order."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}"
        shapes += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,)),
                   (f"{p}.self_attn.q_proj.weight", (h, h)), (f"{p}.self_attn.q_proj.bias", (h,)),
                   (f"{p}.self_attn.k_proj.weight", (kv, h)), (f"{p}.self_attn.k_proj.bias", (kv,)),
                   (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.v_proj.bias", (kv,)),
                   (f"{p}.self_attn.o_proj.weight", (h, h)), (f"{p}.mlp.gate_proj.weight", (i, h)),
                   (f"{p}.mlp.up_proj.weight", (i, h)), (f"{p}.mlp.down_proj.weight", (h, i))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_checkpoint(folder: Path, config: dict[str, Any], device: str = "cpu", shard_bytes: int = SHARD_BYTES,
                     seed: int = 0) -> int:
    """`config.json`, `model-0000N.safetensors` and their index in `folder`; returns the weights' bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    names = tensor_shapes(config)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    size = 0
    for name, shape in names:
        if "norm" in name:
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=generator)
        if size + 2 * tensor.numel() > shard_bytes and shard:
            _save(folder, shard, len(set(index.values())) + 1, index, save_file)
            size = 0
        shard[name] = tensor.cpu()
        size += 2 * tensor.numel()
    _save(folder, shard, len(set(index.values())) + 1, index, save_file)
    total = sum(2 * math.prod(shape) for _, shape in names)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": index}, indent=1))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return total


def _save(folder: Path, shard: dict[str, Any], number: int, index: dict[str, str], save_file: Any) -> None:
    name = f"model-{number:05d}.safetensors"
    save_file(shard, str(folder / name), metadata={"format": "pt"})
    index.update({tensor: name for tensor in shard})
    print(f"wrote {name} ({sum(t.numel() * 2 for t in shard.values()) / 1e9:.2f} GB)", flush=True)
    shard.clear()
