"""The left-padded batch KV cache: join, leave, reorder, trim."""

from __future__ import annotations

import numpy as np
from dsnode.inference.kvbatch import NUMPY_OPS, KVBatch


def cache(seq: int, length: int, layers: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fake per-sequence cache whose values say (sequence, layer, position)."""
    out = []
    for layer in range(layers):
        pos = np.arange(length, dtype=np.float32).reshape(1, 1, length, 1)
        k = np.broadcast_to(seq * 100 + layer * 10 + pos, (1, 2, length, 3)).copy()
        out.append((k, k + 0.5))
    return out


def row(batch: KVBatch, seq_id: str) -> list[tuple[np.ndarray, np.ndarray]]:
    i = batch.rows.index(seq_id)
    start = batch.width - batch.lengths[i]
    return [(k[i : i + 1, :, start:], v[i : i + 1, :, start:]) for k, v in batch.layers]


def test_join_pads_left_and_masks_padding():
    batch = KVBatch(NUMPY_OPS)
    batch.store("a", cache(1, 3))
    batch.store("b", cache(2, 5))
    assert batch.arrange(["a", "b"]) == [0, 1]
    assert batch.width == 5 and batch.lengths == [3, 5]
    assert batch.attention_mask().tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert batch.positions().tolist() == [[3], [5]]
    assert batch.arrange(["b", "a"]) == [1, 0]  # asking in another order maps rows, no repack
    for (k, v), (k0, v0) in zip(row(batch, "a"), cache(1, 3)):
        assert np.array_equal(k, k0) and np.array_equal(v, v0)
    assert batch.pending == {}


def test_advance_then_leave_trims_all_padding_columns():
    batch = KVBatch(NUMPY_OPS)
    batch.store("a", cache(1, 2))
    batch.store("b", cache(2, 6))
    batch.arrange(["a", "b"])
    grown = [(np.concatenate([k, k[:, :, -1:]], 2), np.concatenate([v, v[:, :, -1:]], 2)) for k, v in batch.layers]
    batch.advance(grown)
    assert batch.lengths == [3, 7] and batch.width == 7
    batch.release("b")
    assert batch.rows == ["a", "b"]  # dropped lazily, at the next arrange
    batch.release("a")
    assert batch.rows == [] and batch.layers == []  # everything released: freed at once


def test_lazy_release_repacks_once_on_next_arrange():
    batch = KVBatch(NUMPY_OPS)
    for seq, length in (("a", 2), ("b", 6), ("c", 4)):
        batch.store(seq, cache(ord(seq), length))
    batch.arrange(["a", "b", "c"])
    batch.release("b")
    assert "b" in batch.rows  # dropped lazily
    assert batch.arrange(["c", "a"]) == [1, 0]
    assert batch.rows == ["a", "c"] and batch.width == 4  # the longest (b) is gone: columns trimmed
    for (k, _), (k0, _) in zip(row(batch, "c"), cache(ord("c"), 4)):
        assert np.array_equal(k, k0)


def test_rejoining_after_preemption_uses_the_fresh_cache():
    batch = KVBatch(NUMPY_OPS)
    batch.store("a", cache(1, 3))
    batch.store("b", cache(2, 3))
    batch.arrange(["a", "b"])
    batch.release("a")  # preempted...
    batch.store("a", cache(7, 4))  # ...and recomputed
    batch.arrange(["a", "b"])
    for (k, _), (k0, _) in zip(row(batch, "a"), cache(7, 4)):
        assert np.array_equal(k, k0)
