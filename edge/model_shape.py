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
_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class NotBuildable(Exception):
    """The GQA builder cannot express this model; the message says why (the export path may)."""


@dataclass(frozen=True)
class Rope:
    """Rotary positions: the base `theta` and how the frequencies are scaled. "default": not at all;
    "linear": all divided by `factor`; "llama3" (Llama 3.1+, DeepSeek-R1-Distill-Llama): wavelengths
    longer than original / low_freq_factor divided by `factor`, shorter than original /
    high_freq_factor kept, those between interpolated (transformers' `_compute_llama3_parameters`)."""

    theta: float
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """(head_dim / 2,) float64."""
        inv = 1.0 / self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        if self.type == "linear":
            return inv / self.factor
        if self.type == "llama3":
            return self._llama3(inv)
        return inv

    def _llama3(self, inv: np.ndarray) -> np.ndarray:
        wavelength = 2 * np.pi / inv
        long_waves = self.original_max_positions / self.low_freq_factor
        short_waves = self.original_max_positions / self.high_freq_factor
        scaled = np.where(wavelength > long_waves, inv / self.factor, inv)
        smooth = (self.original_max_positions / wavelength - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        between = (wavelength >= short_waves) & (wavelength <= long_waves)
        return np.where(between, (1 - smooth) * scaled / self.factor + smooth * scaled, scaled)


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
    rope: Rope
    max_positions: int
    tied_embeddings: bool
    qkv_bias: bool

    @property
    def qkv_width(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def rotary_caches(self) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin (max_positions, head_dim / 2) float32, as GroupQueryAttention's do_rotary reads them."""
        positions = np.arange(self.max_positions, dtype=np.float64)
        angles = np.outer(positions, self.rope.inv_freq(self.head_dim))  # (P, d/2)
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def model_shape(hf_config: dict[str, Any]) -> ModelShape:
    model_type = str(hf_config.get("model_type"))
    if model_type not in BUILDABLE:
        raise NotBuildable(f"model_type {model_type!r} (the GQA builder covers {', '.join(BUILDABLE)})")
    rope = _rope(hf_config)
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
        rope=rope,
        max_positions=int(hf_config.get("max_position_embeddings") or 2048),
        tied_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(hf_config.get("attention_bias", False)),
    )


def _rope(hf_config: dict[str, Any]) -> Rope:
    """From transformers 5's `rope_parameters` or 4's `rope_theta`/`rope_scaling`."""
    params = {**(hf_config.get("rope_scaling") or {}), **(hf_config.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type") or params.get("type") or "default")
    if rope_type not in _ROPE_TYPES:
        raise NotBuildable(f"rope_type {rope_type!r} (the GQA builder computes {', '.join(_ROPE_TYPES)})")
    if float(params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))) != 1.0:
        raise NotBuildable("partial rotary embeddings (the GQA builder rotates whole heads)")
    if rope_type == "linear":
        return Rope(theta, rope_type, factor=float(params.get("factor") or 1.0))
    if rope_type == "llama3":
        missing = [key for key in _LLAMA3_KEYS if params.get(key) is None]
        if missing:
            raise NotBuildable(f"rope_type 'llama3' without {', '.join(missing)}")
        return Rope(theta, rope_type, float(params["factor"]), float(params["low_freq_factor"]),
                    float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
    return Rope(theta)
