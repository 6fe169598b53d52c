"""A Hugging Face model folder's `config.json`, read one way for the edge converter and the central
engines (and `dsnode plan`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ModelFolderError(Exception):
    """A model folder that cannot be used; the message names the folder or file and why."""


def read_hf_config(folder: Path) -> dict[str, Any]:
    """`folder/config.json`, if it describes a causal language model (`…ForCausalLM`)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFolderError(f"{folder}: no config.json; not a Hugging Face model folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{path}: unreadable: {exc}") from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(architectures, list) or not any(str(a).endswith("ForCausalLM") for a in architectures):
        raise ModelFolderError(f"{folder}: not a causal language model (architectures={architectures})")
    return config
