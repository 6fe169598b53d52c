"""`backend = "transformers"`: a Hugging Face causal LM (dense or MoE) on one device, plain PyTorch.

The central role's engine on hosts without DeepSpeed or GPUs (development, tests), and the base the
DeepSpeed engine builds on.
"""

from __future__ import annotations

from typing import Any

import structlog
from dsnode.config import BatchingSection, ModelSection
from dsnode.hfconfig import ModelFolderError, read_hf_config
from dsnode.inference.batching import BatchingEngine, context_limit
from dsnode.inference.engine import ModelInfo
from dsnode.inference.runner import Loaded
from dsnode.inference.tokenizer import TextTokenizer
from dsnode.probe import probe_gpus

from .preflight import check_fits
from .quantization import fix_cpu_nf4_layers, quantization_config

log = structlog.get_logger("dsnode.central")


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


def load_hf_model(model: ModelSection, device: Any, dtype: Any) -> Any:
    """The checkpoint on `device` in `dtype`, quantized by bitsandbytes as it loads if configured."""
    from transformers import AutoModelForCausalLM

    quant = quantization_config(model.quantization, dtype, device.type)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device})
    hf = AutoModelForCausalLM.from_pretrained(str(model.path), **kwargs)
    if quant is None:
        hf = hf.to(device)
    elif model.quantization == "nf4" and device.type == "cpu":
        fix_cpu_nf4_layers(hf)
    return hf.eval()


def describe_model(
    section: ModelSection,
    hf_config: dict[str, Any],
    backend: str,
    batching: BatchingSection,
    device: str,
    tensor_parallel: int = 1,
    extra: dict[str, object] | None = None,
) -> ModelInfo:
    """The `ModelInfo` a central engine advertises; the context limit is the model's own
    (`max_position_embeddings`) unless `[model] max_context` or the batch budget lowers it."""
    model_limit = int(hf_config.get("max_position_embeddings") or 2048)
    return ModelInfo(
        name=section.name,
        backend=backend,
        architecture=hf_config["architectures"][0],
        quantization=section.quantization,
        max_context=context_limit(model_limit, section.max_context, batching),
        device=device,
        tensor_parallel=tensor_parallel,
        extra={"model_type": hf_config.get("model_type"), "model_max_context": model_limit, **(extra or {})},
    )


class TransformersEngine(BatchingEngine):
    backend = "transformers"

    def __init__(self, model: ModelSection, batching: BatchingSection) -> None:
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
        gpus = [g for g in probe_gpus() if g.index == (device.index or 0)] if device.type == "cuda" else []
        check_fits(self._model, hf_config, self._batching, 1, device.type, gpus, require_supported=False)
        tokenizer = TextTokenizer.from_folder(self._model.path)
        hf = load_hf_model(self._model, device, dtype)
        info = describe_model(
            self._model, hf_config, self.backend, self._batching, str(device),
            extra={"dtype": str(dtype).removeprefix("torch."), "weights_bytes": hf.get_memory_footprint()},
        )
        log.info("model_loaded", model=info.name, backend=info.backend, device=info.device,
                 architecture=info.architecture, max_context=info.max_context, quantization=info.quantization)
        return Loaded(TorchRunner(hf, device, self._batching.prompt_cache_mb * 2**20), tokenizer, info)
