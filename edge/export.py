"""Hugging Face causal LM → ONNX graph with KV-cache inputs and outputs. Convert time only (torch).

The graph's interface is the one `edge/onnx_runner.py` drives: `input_ids`, `attention_mask` (over past
and new tokens, 0 on left padding), `position_ids`, `past_key_values.{i}.key/value` in; last-position
`logits` and `present.{i}.key/value` out. A small wrapper rebuilds a transformers `DynamicCache` from the
flat past tensors inside the traced forward, so the model's own attention code is what gets exported
(TorchScript exporter, `dynamic_axes`: the recipe that matched torch to 1e-5 on this stack).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.utils import logging as hf_logging

from .architectures import UnsupportedModel, check_supported
from .manifest import KVLayout

OPSET = 18


def load_source(folder: Path, hf_config: dict[str, Any], dtype: Any = torch.float32) -> Any:
    """The source model on the CPU (float32 unless asked), with the attention and experts code that exports."""
    experts = check_supported(hf_config)
    kwargs: dict[str, Any] = {"experts_implementation": experts} if experts else {}
    hf_logging.disable_progress_bar()  # the converter shows its own progress
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, attn_implementation="sdpa", low_cpu_mem_usage=True, **kwargs
    ).eval()
    sliding = [type(layer).__name__ for layer in DynamicCache(config=model.config).layers]
    if any(kind != "DynamicLayer" for kind in sliding):
        raise UnsupportedModel(
            f"{folder}: sliding-window attention layers ({sorted(set(sliding))}) are not supported: "
            "the edge cache keeps every position"
        )
    return model


def cache_layout(model: Any) -> KVLayout:
    """Per-layer (heads, dim) of the cache, read from a real forward (MLA caches differ from GQA)."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[1, 2]]), use_cache=True)
    layers = [(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in out.cache.layers]
    if not layers or any(len(k) != 4 or len(v) != 4 for k, v in layers):
        raise UnsupportedModel(f"unexpected cache shapes {layers[:1]}")
    keys = {(k[1], k[3]) for k, _ in layers}
    values = {(v[1], v[3]) for _, v in layers}
    if len(keys) != 1 or len(values) != 1:
        raise UnsupportedModel(f"layers with different cache shapes are not supported ({keys}, {values})")
    return KVLayout(len(layers), keys.pop(), values.pop())


class KVWrapper(torch.nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) → (logits, *present), flat tensors."""

    def __init__(self, model: Any, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> tuple[Any, ...]:
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,  # prefill needs only the last position: skips (S-1)×V of the LM head
        )
        present: list[Any] = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs, outputs = ["input_ids", "attention_mask", "position_ids"], ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def _dynamic_axes(num_layers: int) -> dict[str, dict[int, str]]:
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch"},
    }
    for i in range(num_layers):
        for kv in ("key", "value"):
            axes[f"past_key_values.{i}.{kv}"] = {0: "batch", 2: "past"}
            axes[f"present.{i}.{kv}"] = {0: "batch", 2: "total"}
    return axes


def _example_inputs(vocab_size: int, layout: KVLayout) -> tuple[Any, ...]:
    """A traced step that exercises every path the runner uses: a past, several new tokens, and a
    left-padded row (so the padding mask is part of the graph, not folded away as all-ones)."""
    batch, new, past = 2, 3, 5  # (B, S), past length P
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (batch, new), generator=generator)  # (B, S)
    mask = torch.ones(batch, past + new, dtype=torch.int64)  # (B, P+S)
    mask[1, :2] = 0
    positions = torch.arange(past, past + new).repeat(batch, 1)  # (B, S)
    positions[1] -= 2
    (kh, kd), (vh, vd) = layout.key, layout.value
    cache: list[Any] = []
    for _ in range(layout.layers):
        cache += [torch.randn(batch, kh, past, kd, generator=generator),  # (B, h, P, d)
                  torch.randn(batch, vh, past, vd, generator=generator)]
    return (input_ids, mask, positions, *cache)


def export_onnx(model: Any, path: Path, layout: KVLayout, opset: int = OPSET) -> None:
    """Trace `model` with its KV cache into `path` (weights beside it as external data if > 2 GB)."""
    inputs, outputs = io_names(layout.layers)
    wrapper = KVWrapper(model, layout.layers).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about Python branches taken while tracing
        torch.onnx.export(
            wrapper,
            _example_inputs(model.config.vocab_size, layout),
            str(path),
            dynamo=False,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=_dynamic_axes(layout.layers),
            opset_version=opset,
            do_constant_folding=True,
        )
