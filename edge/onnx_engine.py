"""`backend = "onnx"`: a model converted by `dsnode convert`, served by ONNX Runtime.

Loading reads the folder's manifest first, checks its format version and every file's checksum, then
opens the session on the configured providers (CUDA on a GPU, CPU otherwise) and logs and advertises
the provider that actually runs. Batching, sampling, stop strings and streaming are the shared
`BatchingEngine`'s, so the edge answers exactly as the central engine does.

Imports no torch and no transformers: an edge host has neither.
"""

from __future__ import annotations

import time

import onnxruntime as ort
import structlog
from dsnode.config import BatchingSection, ModelSection
from dsnode.inference.batching import BatchingEngine, Loaded, context_limit
from dsnode.inference.engine import ModelInfo
from dsnode.inference.tokenizer import TextTokenizer

from .manifest import ManifestError, read_manifest, verify_files
from .onnx_runner import OnnxRunner, open_session

log = structlog.get_logger("dsnode.edge")


class OnnxEngine(BatchingEngine):
    backend = "onnx"

    def __init__(self, model: ModelSection, batching: BatchingSection) -> None:
        super().__init__(batching)
        self._model = model

    def _load_blocking(self) -> Loaded:
        folder = self._model.path
        manifest = read_manifest(folder)
        started = time.monotonic()
        verify_files(folder, manifest)
        log.info("model_verified", path=str(folder), files=len(manifest.files),
                 seconds=round(time.monotonic() - started, 2))
        tokenizer = TextTokenizer.from_folder(folder)
        if tokenizer.digest != manifest.tokenizer_sha256:
            raise ManifestError(f"{folder}/tokenizer.json: not the tokenizer the model was converted with")
        session = open_session(folder / manifest.onnx_file, self._model.device, self._model.threads)
        runner = OnnxRunner(session)
        if runner.io.num_layers != manifest.kv.layers:
            raise ManifestError(
                f"{folder}: the graph has {runner.io.num_layers} cache layers, the manifest says {manifest.kv.layers}"
            )
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
            },
        )
        log.info("model_loaded", model=info.name, backend=info.backend, provider=info.device,
                 providers=info.extra["providers"], quantization=info.quantization,
                 architecture=info.architecture, max_context=info.max_context, threads=self._model.threads)
        return Loaded(runner, tokenizer, info)
