"""`backend = "transformers"`: a Hugging Face causal LM (dense or MoE) on one device, plain PyTorch.

The central role's engine on hosts without DeepSpeed or GPUs (development, tests), and the base the
DeepSpeed engine builds on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import structlog

from dsnode.batching import BatchingEngine, Loaded, context_limit
from dsnode.config import ModelSection
from dsnode.engine import ModelInfo
from dsnode.scheduler import SchedulerConfig
from dsnode.tokenizer import TextTokenizer

log = structlog.get_logger("dsnode.central")


class ModelFolderError(Exception):
    pass


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFolderError(f"{folder}: no config.json; not a Hugging Face model folder") from None
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{path}: invalid JSON: {exc}") from None
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForCausalLM") for a in architectures):
        raise ModelFolderError(f"{folder}: not a causal language model (architectures={architectures})")
    return config


def pick_device(wanted: str) -> Any:
    import torch

    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelFolderError("model.device = 'cuda' but no CUDA device is available")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def pick_dtype(wanted: str, device: Any) -> Any:
    import torch

    if wanted != "auto":
        return getattr(torch, wanted)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(kind: str, compute_dtype: Any) -> Any:
    """bitsandbytes via transformers: "int8" (LLM.int8) or "nf4" (4-bit NormalFloat)."""
    if kind == "none":
        return None
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
    )


def load_hf_model(model: ModelSection, device: Any, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    quant = quantization_config(model.quantization, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device})
    hf = AutoModelForCausalLM.from_pretrained(str(model.path), **kwargs)
    if quant is None:
        hf = hf.to(device)
    return hf.eval()


class TransformersEngine(BatchingEngine):
    backend = "transformers"

    def __init__(self, model: ModelSection, batching: SchedulerConfig) -> None:
        super().__init__(batching)
        self._model = model

    def _load_blocking(self) -> Loaded:
        import torch

        from .torch_runner import TorchRunner

        hf_config = read_hf_config(self._model.path)
        if self._model.threads:
            torch.set_num_threads(self._model.threads)
        device = pick_device(self._model.device)
        dtype = pick_dtype(self._model.dtype, device)
        tokenizer = TextTokenizer.from_folder(self._model.path)
        hf = load_hf_model(self._model, device, dtype)
        info = ModelInfo(
            name=self._model.name,
            backend=self.backend,
            architecture=hf_config["architectures"][0],
            quantization=self._model.quantization,
            max_context=context_limit(
                int(hf_config.get("max_position_embeddings") or 2048), self._model.max_context, self._batching
            ),
            device=str(device),
            extra={"dtype": str(dtype).removeprefix("torch."), "model_type": hf_config.get("model_type")},
        )
        log.info("model_loaded", model=info.name, backend=info.backend, device=info.device,
                 architecture=info.architecture, max_context=info.max_context)
        return Loaded(TorchRunner(hf, device), tokenizer, info)
