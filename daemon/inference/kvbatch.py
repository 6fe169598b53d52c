"""The KV cache of a running batch, shared by the torch and ONNX runners.

Each sequence's cache is a list of per-layer (key, value) arrays shaped (1, heads, length, dim); the
batch stacks them left-padded to a common length, shape (B, heads, T, dim), with a 0/1 attention mask
(B, T) marking the padding. Decode steps only append; the batch is repacked (rows dropped, joined,
leading all-padding columns trimmed) only when its membership changes, so the copy is paid per
join/leave, not per token. Works on numpy arrays and torch tensors alike through `ArrayOps`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

import numpy as np

A = TypeVar("A")
LayerKV = tuple[Any, Any]  # (key, value), time on axis 2


@dataclass(frozen=True)
class ArrayOps(Generic[A]):
    concat: Callable[[list[A], int], A]
    zeros: Callable[[A, tuple[int, ...]], A]  # zeros shaped like `shape`, dtype/device of the array


NUMPY_OPS: ArrayOps[np.ndarray] = ArrayOps(
    concat=lambda arrays, axis: np.concatenate(arrays, axis=axis),
    zeros=lambda like, shape: np.zeros(shape, dtype=like.dtype),
)


@dataclass
class KVBatch:
    ops: ArrayOps[Any]
    rows: list[str] = field(default_factory=list)  # sequence id of each batch row
    lengths: list[int] = field(default_factory=list)  # valid (unpadded) length of each row
    layers: list[LayerKV] = field(default_factory=list)  # (B, h, T, d) each
    pending: dict[str, list[LayerKV]] = field(default_factory=dict)  # prefilled, not yet batched
    released: set[str] = field(default_factory=set)  # rows to drop at the next repack

    # --- per-sequence caches (prefill) -----------------------------------------------------------
    def cache_of(self, seq_id: str) -> list[LayerKV] | None:
        """The unpadded cache of a sequence that is not in the batch yet (None if it has none)."""
        return self.pending.get(seq_id)

    def store(self, seq_id: str, layers: list[LayerKV]) -> None:
        self.pending[seq_id] = layers

    def view_of(self, seq_id: str) -> list[LayerKV] | None:
        """A sequence's unpadded cache, prefilled or in the batch, as views (None if it has none)."""
        if seq_id in self.pending:
            return self.pending[seq_id]
        if seq_id not in self.rows:
            return None
        i = self.rows.index(seq_id)
        start = self.width - self.lengths[i]
        return [(k[i : i + 1, :, start:], v[i : i + 1, :, start:]) for k, v in self.layers]

    def release(self, seq_id: str) -> None:
        """Forget a sequence. A batch row is dropped lazily, at the next `arrange`, so several
        sequences finishing in one step cost one repack; an all-released batch is freed at once."""
        self.pending.pop(seq_id, None)
        if seq_id in self.rows:
            self.released.add(seq_id)
            if self.released >= set(self.rows):
                self.rows, self.lengths, self.layers, self.released = [], [], [], set()

    def clear(self) -> None:
        self.rows, self.lengths, self.layers, self.pending, self.released = [], [], [], {}, set()

    # --- batched decode --------------------------------------------------------------------------
    @property
    def width(self) -> int:
        return int(self.layers[0][0].shape[2]) if self.layers else 0

    def arrange(self, seq_ids: Sequence[str]) -> list[int]:
        """Make the batch hold exactly `seq_ids`; returns, for each of them, its row index."""
        wanted = list(dict.fromkeys(seq_ids))
        changed = set(wanted) != set(self.rows) or any(s in self.pending for s in wanted)
        if changed or self.released:
            kept = [r for r in self.rows if r in wanted and r not in self.released and r not in self.pending]
            self._repack(kept + [s for s in wanted if s not in kept])
        index = {row: i for i, row in enumerate(self.rows)}
        return [index[s] for s in seq_ids]

    def attention_mask(self, extra: int = 1) -> np.ndarray:
        """(B, T + extra) int64: 0 over left padding, 1 over real tokens and the `extra` new ones."""
        width = self.width
        mask = np.ones((len(self.rows), width + extra), dtype=np.int64)
        for i, length in enumerate(self.lengths):
            mask[i, : width - length] = 0
        return mask

    def positions(self) -> np.ndarray:
        """(B, 1) int64: the position of the next token of each row."""
        return np.asarray(self.lengths, dtype=np.int64).reshape(-1, 1)

    def advance(self, layers: list[LayerKV]) -> None:
        """Replace the cache with the model's output after one decode step (one column longer)."""
        self.layers = layers
        self.lengths = [n + 1 for n in self.lengths]

    # --- internals -------------------------------------------------------------------------------
    def _row_cache(self, seq_id: str) -> list[LayerKV]:
        view = self.view_of(seq_id)
        if view is None:
            raise KeyError(f"{seq_id} has no cache")
        self.pending.pop(seq_id, None)
        return view

    def _repack(self, new_rows: list[str]) -> None:
        caches = [self._row_cache(s) for s in new_rows]
        lengths = [int(c[0][0].shape[2]) for c in caches]
        width = max(lengths, default=0)
        num_layers = len(caches[0]) if caches else 0
        layers: list[LayerKV] = []
        for layer in range(num_layers):
            keys = [self._left_pad(c[layer][0], width) for c in caches]
            values = [self._left_pad(c[layer][1], width) for c in caches]
            layers.append((self.ops.concat(keys, 0), self.ops.concat(values, 0)))
        self.rows, self.lengths, self.layers, self.released = new_rows, lengths, layers, set()

    def _left_pad(self, array: Any, width: int) -> Any:
        missing = width - int(array.shape[2])
        if missing == 0:
            return array
        b, h, _, d = array.shape
        return self.ops.concat([self.ops.zeros(array, (b, h, missing, d)), array], 2)
