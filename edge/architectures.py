"""Which Hugging Face model types `dsnode convert` exports, and how. No torch: checked before loading."""

from __future__ import annotations

import json
from pathlib import Path
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


def read_causal_lm_config(folder: Path) -> dict[str, Any]:
    """`folder/config.json`, if it describes a causal language model (`…ForCausalLM`)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UnsupportedModel(f"{folder}: no config.json; not a Hugging Face model folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedModel(f"{path}: unreadable: {exc}") from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(architectures, list) or not any(str(a).endswith("ForCausalLM") for a in architectures):
        raise UnsupportedModel(f"{folder}: not a causal language model (architectures={architectures})")
    return config


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
