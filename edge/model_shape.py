"""The decoder shape the GQA graph builder needs, read from config.json (no torch).

Only the dense Llama family is built directly (llama, qwen2, mistral: RMSNorm, rotary positions,
grouped-query attention, SiLU-gated MLP). Anything else (MoE, MLA, per-head q/k norms, rope scalings the
builder does not compute) raises `NotBuildable`, and `dsnode convert` takes the traced-export path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

BUILDABLE = ("llama", "qwen2", "mistral")
_ROPE_TYPES = ("default", "linear")


class NotBuildable(Exception):
    """The GQA builder cannot express this model; the message says why (the export path may)."""


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    rope_theta: float
    rope_factor: float  # "linear" scaling divides positions by it; 1.0 for "default"
    max_positions: int
    tied_embeddings: bool
    qkv_bias: bool

    @property
    def qkv_width(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def rotary_caches(self) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin (max_positions, head_dim / 2) float32, as GroupQueryAttention's do_rotary reads them."""
        inv_freq = 1.0 / self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        positions = np.arange(self.max_positions, dtype=np.float64) / self.rope_factor
        angles = np.outer(positions, inv_freq)  # (P, d/2)
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def model_shape(hf_config: dict[str, Any]) -> ModelShape:
    model_type = str(hf_config.get("model_type"))
    if model_type not in BUILDABLE:
        raise NotBuildable(f"model_type {model_type!r} (the GQA builder covers {', '.join(BUILDABLE)})")
    theta, rope_type, factor = _rope(hf_config)
    if rope_type not in _ROPE_TYPES:
        raise NotBuildable(f"rope_type {rope_type!r} (the GQA builder computes {', '.join(_ROPE_TYPES)})")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise NotBuildable(f"hidden_act {hf_config.get('hidden_act')!r} (the GQA builder builds SiLU MLPs)")
    if model_type == "mistral" and hf_config.get("sliding_window"):
        raise NotBuildable("sliding-window attention")
    heads = int(hf_config["num_attention_heads"])
    hidden = int(hf_config["hidden_size"])
    return ModelShape(
        model_type=model_type,
        hidden=hidden,
        layers=int(hf_config["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(hf_config.get("num_key_value_heads") or heads),
        head_dim=int(hf_config.get("head_dim") or hidden // heads),
        intermediate=int(hf_config["intermediate_size"]),
        vocab=int(hf_config["vocab_size"]),
        rms_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_factor=factor,
        max_positions=int(hf_config.get("max_position_embeddings") or 2048),
        tied_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(hf_config.get("attention_bias", False)),
    )


def _rope(hf_config: dict[str, Any]) -> tuple[float, str, float]:
    """(theta, type, linear factor) from transformers 5's `rope_parameters` or 4's `rope_theta`/`rope_scaling`."""
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default")
    factor = float(params.get("factor") or scaling.get("factor") or 1.0) if rope_type == "linear" else 1.0
    return theta, rope_type, factor
