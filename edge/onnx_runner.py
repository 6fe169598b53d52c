"""Forward passes of a converted ONNX model on ONNX Runtime, with the KV cache kept between steps.

The graph (written by `dsnode convert`) takes `input_ids` (B, S), `attention_mask` (B, past + S),
`position_ids` (B, S) and `past_key_values.{i}.key/value` (B, heads, past, dim); it returns `logits`
(B, 1, V) for the last position and `present.{i}.key/value` (B, heads, past + S, dim). Prefill runs one
sequence (batch 1, no padding, chunk by chunk); decode runs every running sequence in one call over the
left-padded batch cache of `dsnode.inference.kvbatch` (padding masked by `attention_mask`, positions per row).

Only numpy and onnxruntime here: this is the edge host's run-time path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from dsnode.inference.kvbatch import NUMPY_OPS, KVBatch, LayerKV

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class RunnerError(Exception):
    """The ONNX model or the requested device cannot be used; the message says why."""


def choose_providers(device: str, available: Sequence[str]) -> list[str]:
    """`[model] device` → ONNX Runtime providers, best first. "auto" takes CUDA when this build has it."""
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if device == "cuda":
        raise RunnerError(
            f"model.device = 'cuda' but this onnxruntime has no {CUDA} (available: {', '.join(available)}); "
            "install the GPU build: pip install 'dsnode[edge-gpu]' (never together with onnxruntime)"
        )
    return [CPU]


def open_session(path: Path, device: str = "auto", threads: int | None = None,
                 strict_gpu: bool = False) -> ort.InferenceSession:
    """An inference session on the providers `device` asks for; refuses a CUDA request that fell back.
    `strict_gpu`: the session fails to start if any node would run on the CPU beside the CUDA provider
    (`session.disable_cpu_ep_fallback`), instead of silently copying tensors back and forth per layer."""
    options = ort.SessionOptions()
    if strict_gpu:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.intra_op_num_threads = threads or 0  # 0: one per core
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; which provider runs is logged by the engine
    providers = choose_providers(device, ort.get_available_providers())
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise RunnerError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc
    if device == "cuda" and session.get_providers()[0] != CUDA:
        raise RunnerError(f"model.device = 'cuda' but ONNX Runtime could not start {CUDA} (CUDA/cuDNN libraries?)")
    return session


@dataclass(frozen=True)
class GraphIO:
    """The cache layout of a session's graph, read from its inputs (not from file names or configs)."""

    num_layers: int
    kv_shapes: tuple[tuple[tuple[int, int], tuple[int, int]], ...]  # per layer: key (h, d), value (h, d)
    kv_dtype: type
    output_names: tuple[str, ...]

    @classmethod
    def of(cls, session: ort.InferenceSession) -> GraphIO:
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in inputs]
        if missing or not outputs or outputs[0] != "logits":
            raise RunnerError(f"not a dsnode KV-cache graph (missing inputs {missing}, outputs {outputs[:2]})")
        num_layers = (len(inputs) - 3) // 2
        shapes, dtypes = [], set()
        for i in range(num_layers):
            pair = []
            for kv in ("key", "value"):
                arg = inputs.get(f"past_key_values.{i}.{kv}")
                if arg is None or f"present.{i}.{kv}" not in outputs:
                    raise RunnerError(f"not a dsnode KV-cache graph (no past/present {kv} for layer {i})")
                heads, dim = arg.shape[1], arg.shape[3]
                if not (isinstance(heads, int) and isinstance(dim, int)):
                    raise RunnerError(f"past_key_values.{i}.{kv}: heads/dim must be static, got {arg.shape}")
                pair.append((heads, dim))
                dtypes.add(arg.type)
            shapes.append((pair[0], pair[1]))
        if len(dtypes) != 1 or next(iter(dtypes)) not in _NUMPY_TYPES:
            raise RunnerError(f"unsupported KV cache element types {sorted(dtypes)}")
        present = tuple(f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value"))
        return cls(num_layers, tuple(shapes), _NUMPY_TYPES[dtypes.pop()], ("logits", *present))

    def empty_cache(self) -> list[LayerKV]:
        """A zero-length cache for one sequence, (1, h, 0, d) per layer."""
        return [
            (np.zeros((1, kh, 0, kd), self.kv_dtype), np.zeros((1, vh, 0, vd), self.kv_dtype))
            for (kh, kd), (vh, vd) in self.kv_shapes
        ]


class OnnxRunner:
    """The `ModelRunner` of the edge engine. Called from one thread (the engine's worker)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.io = GraphIO.of(session)
        self.kv = KVBatch(NUMPY_OPS)

    @property
    def provider(self) -> str:
        return str(self.session.get_providers()[0])

    def prefill(self, seq_id: str, token_ids: Sequence[int], start: int) -> np.ndarray:
        past = self.kv.cache_of(seq_id)
        if past is None:
            if start != 0:
                raise RunnerError(f"{seq_id}: prefill from position {start} without a cache")
            past = self.io.empty_cache()
        n = len(token_ids)
        logits, layers = self._forward(
            np.asarray([token_ids], dtype=np.int64),  # (1, n)
            np.ones((1, start + n), dtype=np.int64),  # (1, past + n)
            np.arange(start, start + n, dtype=np.int64).reshape(1, n),  # (1, n)
            past,
        )
        self.kv.store(seq_id, layers)
        last: np.ndarray = logits[0]  # (V,)
        return last

    def decode(self, seq_ids: Sequence[str], token_ids: Sequence[int]) -> np.ndarray:
        rows = self.kv.arrange(seq_ids)
        by_row = np.zeros((len(self.kv.rows), 1), dtype=np.int64)  # (B, 1)
        by_row[rows, 0] = token_ids
        logits, layers = self._forward(by_row, self.kv.attention_mask(), self.kv.positions(), self.kv.layers)
        self.kv.advance(layers)
        ordered: np.ndarray = logits[rows]  # (n, V), in the order asked
        return ordered

    def release(self, seq_id: str) -> None:
        self.kv.release(seq_id)

    def close(self) -> None:
        self.kv.clear()

    def _forward(
        self, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[LayerKV]
    ) -> tuple[np.ndarray, list[LayerKV]]:
        """One session call; returns last-position logits (B, V) as float32 and the grown cache."""
        feed: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
        for i, (key, value) in enumerate(past):
            feed[f"past_key_values.{i}.key"] = key
            feed[f"past_key_values.{i}.value"] = value
        out = self.session.run(self.io.output_names, feed)
        logits = np.asarray(out[0][:, -1], dtype=np.float32)  # (B, V)
        layers = [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.io.num_layers)]
        return logits, layers
