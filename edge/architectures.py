"""Which Hugging Face model types `dsnode convert` exports, and how. No torch: checked before loading."""

from __future__ import annotations

from typing import Any

# model_type → the experts implementation that exports (None: a dense model). DeepSeek-V3's routed
# experts export only as "batched_mm": eager bakes the traced routing into the graph, grouped_mm fails.
SUPPORTED: dict[str, str | None] = {
    "llama": None,
    "qwen2": None,
    "qwen3": None,
    "mistral": None,
    "deepseek_v3": "batched_mm",
}


class UnsupportedModel(Exception):
    """Not a model `dsnode convert` can export; the message says why."""


def check_supported(hf_config: dict[str, Any]) -> str | None:
    """The experts implementation to load the model with; raises UnsupportedModel with the choices."""
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED:
        architectures = ", ".join(hf_config.get("architectures") or []) or "?"
        raise UnsupportedModel(
            f"unsupported architecture {architectures} (model_type {model_type!r}); "
            f"dsnode convert supports model types: {', '.join(sorted(SUPPORTED))}"
        )
    return SUPPORTED[model_type]
