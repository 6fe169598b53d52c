"""The decoder shape the GQA graph builder needs, read from config.json (no torch).

Only the dense Llama family is built directly (llama, qwen2, mistral, qwen3: RMSNorm, rotary
positions, grouped-query attention, SiLU-gated MLP; qwen3's per-head q/k norms). Anything else (MoE,
MLA, sliding windows, rope scalings the builder does not compute) raises `NotBuildable`, and `dsnode
convert` takes the traced-export path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

BUILDABLE = ("llama", "qwen2", "mistral", "qwen3")
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


class NotBuildable(Exception):
    """The GQA builder cannot express this model; the message says why (the export path may)."""


@dataclass(frozen=True)
class Rope:
    """Rotary positions: the base `theta` and how the frequencies are scaled, as transformers'
    `modeling_rope_utils` computes them. "default": not at all; "linear": all divided by `factor`;
    "llama3" (Llama 3.1+, DeepSeek-R1-Distill-Llama): wavelengths longer than original /
    low_freq_factor divided by `factor`, shorter than original / high_freq_factor kept, those between
    interpolated; "yarn" (Qwen2.5's long-context configs): interpolated by `factor` below a ramp of
    dimensions set by beta_fast / beta_slow, and cos and sin scaled by `attention_factor`."""

    theta: float
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0  # cos and sin are multiplied by it (yarn)

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """(head_dim / 2,) float64."""
        inv = 1.0 / self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        if self.type == "linear":
            return inv / self.factor
        if self.type == "llama3":
            return self._llama3(inv)
        if self.type == "yarn":
            return self._yarn(inv, head_dim)
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

    def _yarn(self, inv: np.ndarray, head_dim: int) -> np.ndarray:
        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(self.original_max_positions / (rotations * 2 * math.pi)) / (
                2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / ((high - low) or 0.001), 0, 1)
        extrapolated = 1 - ramp  # 1: the frequency kept, 0: divided by factor
        return inv / self.factor * (1 - extrapolated) + inv * extrapolated


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
    qk_norm: bool = False  # qwen3: each q and k head RMS-normalised before the rotary embedding

    @property
    def qkv_width(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def rotary_caches(self) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin (max_positions, head_dim / 2) float32, as GroupQueryAttention's do_rotary reads them."""
        positions = np.arange(self.max_positions, dtype=np.float64)
        angles = np.outer(positions, self.rope.inv_freq(self.head_dim))  # (P, d/2)
        scale = self.rope.attention_factor
        return (scale * np.cos(angles)).astype(np.float32), (scale * np.sin(angles)).astype(np.float32)


def model_shape(hf_config: dict[str, Any]) -> ModelShape:
    model_type = str(hf_config.get("model_type"))
    if model_type not in BUILDABLE:
        raise NotBuildable(f"model_type {model_type!r} (the GQA builder covers {', '.join(BUILDABLE)})")
    rope = _rope(hf_config)
    if hf_config.get("hidden_act", "silu") != "silu":
        raise NotBuildable(f"hidden_act {hf_config.get('hidden_act')!r} (the GQA builder builds SiLU MLPs)")
    if model_type == "mistral" and hf_config.get("sliding_window"):
        raise NotBuildable("sliding-window attention")
    if hf_config.get("use_sliding_window") or "sliding_attention" in (hf_config.get("layer_types") or ()):
        raise NotBuildable("sliding-window attention (use_sliding_window)")
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
        qk_norm=model_type == "qwen3",
    )


def _rope(hf_config: dict[str, Any]) -> Rope:
    """From transformers 5's `rope_parameters` or 4's `rope_theta`/`rope_scaling`, with transformers'
    defaults (`original_max_position_embeddings`: the config's own, else `max_position_embeddings`)."""
    params = {**(hf_config.get("rope_scaling") or {}), **(hf_config.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type") or params.get("type") or "default")
    if rope_type not in _ROPE_TYPES:
        raise NotBuildable(f"rope_type {rope_type!r} (the GQA builder computes {', '.join(_ROPE_TYPES)})")
    if float(params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))) != 1.0:
        raise NotBuildable("partial rotary embeddings (the GQA builder rotates whole heads)")
    original = int(hf_config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or hf_config.get("max_position_embeddings") or 2048)
    if rope_type == "linear":
        return Rope(theta, rope_type, factor=float(params.get("factor") or 1.0))
    if rope_type == "llama3":
        missing = [key for key in _LLAMA3_KEYS if params.get(key) is None]
        if missing:
            raise NotBuildable(f"rope_type 'llama3' without {', '.join(missing)}")
        return Rope(theta, rope_type, float(params["factor"]), float(params["low_freq_factor"]),
                    float(params["high_freq_factor"]), original)
    if rope_type == "yarn":
        return _yarn(params, theta, original, hf_config)
    return Rope(theta)


def _yarn(params: dict[str, Any], theta: float, original: int, hf_config: dict[str, Any]) -> Rope:
    factor = params.get("factor")
    factor = float(factor) if factor is not None else float(hf_config["max_position_embeddings"]) / original
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                     if mscale and mscale_all_dim else _yarn_mscale(factor))
    return Rope(theta, "yarn", factor, original_max_positions=original,
                beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                truncate=bool(params.get("truncate", True)), attention_factor=float(attention))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
