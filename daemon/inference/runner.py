"""What a backend provides under `BatchingEngine`: a model runner (forward passes with a per-sequence
KV cache, called from the engine's one worker thread) and, once loaded, its tokenizer and facts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from .engine import EngineError, ModelInfo
from .tokenizer import TextTokenizer


class ModelRunner(Protocol):
    """What a backend provides: forward passes with a per-sequence KV cache. Called from one thread."""

    def prefill(self, seq_id: str, token_ids: Sequence[int], start: int) -> np.ndarray:
        """Feed tokens at positions start.. of `seq_id`; returns the last position's logits (V,)."""
        ...

    def decode(self, seq_ids: Sequence[str], token_ids: Sequence[int]) -> np.ndarray:
        """Feed one token to each sequence, batched; returns logits (n, V) in the order given."""
        ...

    def release(self, seq_id: str) -> None: ...

    def close(self) -> None: ...


class RunnerDied(EngineError):
    """The runner cannot continue (a tensor-parallel rank died, the device was lost)."""


@dataclass(frozen=True)
class Loaded:
    runner: ModelRunner
    tokenizer: TextTokenizer
    info: ModelInfo
