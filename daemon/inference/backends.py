"""Which engine serves a backend name. Imports are lazy: an edge host has no torch to import."""

from __future__ import annotations

import importlib

from ..config import Config
from .engine import Engine

# backend → (module, class, the extra that installs it)
ENGINES = {
    "transformers": ("dsnode.central.transformers_engine", "TransformersEngine", "central"),
    "deepspeed": ("dsnode.central.deepspeed_engine", "DeepSpeedEngine", "central"),
    "onnx": ("dsnode.edge.onnx_engine", "OnnxEngine", "edge"),
}


class BackendUnavailable(Exception):
    pass


def build_engine(config: Config) -> Engine:
    module_name, class_name, extra = ENGINES[config.model.backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(
            f"backend {config.model.backend!r} is not installed here ({exc}); "
            f"install it with: pip install 'dsnode[{extra}]'"
        ) from exc
    engine_class = getattr(module, class_name)
    # an engine that needs more than [model] and [batching] (the deepspeed one: [distributed],
    # the cluster secret) builds itself from the whole config
    from_config = getattr(engine_class, "from_config", None)
    engine: Engine = from_config(config) if from_config else engine_class(config.model, config.batching)
    return engine
