"""`backend = "onnx"`: a model converted by `dsnode convert`, served by ONNX Runtime.

Loading reads the folder's manifest first, checks its format version, every file's size and the
checksums of the graph, tokenizer and configs, then opens the session on the configured providers (CUDA
on a GPU, CPU otherwise) while a second thread checks the weight files' checksums (the bulk of the
bytes: a 7B model's 8.45 GB take ~5 s to hash, about as long as opening the session). The model is
served only once both are done, and a weight file that differs fails the load naming it, as before;
onnxruntime reads weights at the offsets the (already verified) graph names, so a changed byte there
cannot derail it before the check ends. It logs and advertises the provider that actually runs.
Batching, sampling, stop strings and streaming are the shared `BatchingEngine`'s, so the edge answers
exactly as the central engine does.

Imports no torch and no transformers: an edge host has neither.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnxruntime as ort
import structlog
from dsnode.config import BatchingSection, ModelSection
from dsnode.inference.batching import BatchingEngine, context_limit
from dsnode.inference.engine import ModelInfo
from dsnode.inference.prompt_cache import check_host_memory
from dsnode.inference.runner import Loaded
from dsnode.inference.tokenizer import TextTokenizer

from .manifest import (GRAPH_GQA, Manifest, ManifestError, check_sizes, read_manifest, verify_checksums,
                       weight_files)
from .onnx_runner import CUDA, OnnxRunner, RunnerError, open_session
from .slot_runner import SlotRunner

log = structlog.get_logger("dsnode.edge")
HASHED_ALONGSIDE_BYTES = 16 << 20  # weight files this large are hashed while the session opens


class OnnxEngine(BatchingEngine):
    backend = "onnx"

    def __init__(self, model: ModelSection, batching: BatchingSection) -> None:
        super().__init__(batching)
        self._model = model

    def _load_blocking(self) -> Loaded:
        folder = self._model.path
        manifest = read_manifest(folder)
        check_sizes(folder, manifest)
        weights = weight_files(manifest, HASHED_ALONGSIDE_BYTES)
        verify_checksums(folder, manifest, manifest.files.keys() - weights)
        tokenizer = TextTokenizer.from_folder(folder)
        if tokenizer.digest != manifest.tokenizer_sha256:
            raise ManifestError(f"{folder}/tokenizer.json: not the tokenizer the model was converted with")
        device = device_for_target(manifest, self._model.device, ort.get_available_providers())
        with ThreadPoolExecutor(1, thread_name_prefix="dsnode-verify") as pool:
            verified = pool.submit(_timed_checksums, folder, manifest, weights)
            try:
                session = open_session(folder / manifest.onnx_file, device, self._model.threads,
                                       strict_gpu=manifest.target == "cuda")
            except Exception:
                verified.result()  # a weight file that is not the manifest's is the cause to report
                raise
            seconds = verified.result()
        log.info("model_verified", path=str(folder), files=len(manifest.files), weight_files=len(weights),
                 weights_seconds=seconds)
        runner: OnnxRunner | SlotRunner
        if manifest.graph == GRAPH_GQA:
            runner = SlotRunner(session, manifest.context_limit, self._batching.prompt_cache_mb * 2**20)
            if runner.prompts.capacity:  # on the CPU only
                check_host_memory(self._batching.prompt_cache_mb)
            layers = runner.spec.layers
        else:
            runner = OnnxRunner(session)
            layers = runner.io.num_layers
        if layers != manifest.kv.layers:
            raise ManifestError(f"{folder}: the graph has {layers} cache layers, the manifest says {manifest.kv.layers}")
        info = ModelInfo(
            name=self._model.name,
            backend=self.backend,
            architecture=manifest.architecture,
            quantization=manifest.quantization,
            max_context=context_limit(manifest.context_limit, self._model.max_context, self._batching),
            device=runner.provider,
            extra={
                "providers": list(session.get_providers()),
                "onnxruntime": ort.__version__,
                "opset": manifest.opset,
                "model_type": manifest.model_type,
                "model_max_context": manifest.context_limit,
                "format_version": manifest.format_version,
                "graph": manifest.graph,
                "target": manifest.target,
                "weights": manifest.weights,
                "kv_cache": manifest.kv_cache.get("dtype", "float"),
                # a prompt's log-probabilities (echo + logprobs) at prefill speed, or token by token
                "prompt_scoring": "by_position" if getattr(runner, "picks_positions", False) else "by_token",
            },
        )
        if info.extra["prompt_scoring"] == "by_token":
            log.info("model_scores_prompts_token_by_token", path=str(folder),
                     reason="converted before the graph had its last_position input: requests with echo and "
                            "logprobs are scored one token at a time; dsnode convert it again to score at "
                            "prefill speed")
        log.info("model_loaded", model=info.name, backend=info.backend, provider=info.device,
                 providers=info.extra["providers"], quantization=info.quantization,
                 architecture=info.architecture, max_context=info.max_context, threads=self._model.threads)
        return Loaded(runner, tokenizer, info)


def _timed_checksums(folder: Path, manifest: Manifest, names: set[str]) -> float:
    started = time.monotonic()
    verify_checksums(folder, manifest, names)
    return round(time.monotonic() - started, 2)


def device_for_target(manifest: Manifest, device: str, available: list[str]) -> str:
    """The `[model] device` to open the session with, given what the folder was converted for.

    A "cuda" artifact (float16) needs the CUDA provider: refused at start on a host without it, or
    with device = "cpu". A "cpu" artifact (float32: GroupQueryAttention's CUDA kernel takes float16
    only) runs on the CPU provider even on a GPU host with device = "auto" (a logged fallback), and is
    refused with device = "cuda"."""
    if manifest.graph != GRAPH_GQA:
        return device
    if manifest.target == "cuda":
        if device == "cpu" or CUDA not in available:
            raise RunnerError(
                f"this model was converted for target 'cuda' (float16, onnxruntime's CUDA provider), but "
                f"{'model.device = cpu' if device == 'cpu' else 'this onnxruntime has no ' + CUDA}; "
                "convert it again with --target cpu for this host")
        return "cuda"
    if device == "cuda":
        missing = "" if CUDA in available else f" (and this onnxruntime has no {CUDA})"
        raise RunnerError(f"model.device = 'cuda', but this model was converted for target 'cpu' (float32){missing}; "
                          "convert it again with --target cuda for a GPU host")
    if CUDA in available:
        log.warning("model_target_cpu_on_gpu_host", reason="converted with --target cpu: served on the CPU provider")
    return "cpu"
