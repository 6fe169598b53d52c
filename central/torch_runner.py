"""Forward passes of a Hugging Face causal LM with a per-sequence KV cache, batched decode.

Shared by the transformers and DeepSpeed engines (DeepSpeed wraps the same module). Prefill runs one
sequence at a time (batch 1, no padding); decode runs every running sequence in one forward over the
left-padded batch cache of `dsnode.inference.kvbatch`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from dsnode.inference.kvbatch import ArrayOps, KVBatch, LayerKV
from transformers import DynamicCache

TORCH_OPS: ArrayOps[torch.Tensor] = ArrayOps(
    concat=lambda arrays, axis: torch.cat(arrays, dim=axis),
    zeros=lambda like, shape: like.new_zeros(shape),
)


class TorchRunner:
    def __init__(self, model: Any, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.config = model.config
        self.kv = KVBatch(TORCH_OPS)

    def prefill(self, seq_id: str, token_ids: Sequence[int], start: int) -> np.ndarray:
        last: np.ndarray = self._prefill(seq_id, token_ids, start, 1)[-1]  # (V,)
        return last

    def prefill_all(self, seq_id: str, token_ids: Sequence[int], start: int) -> np.ndarray:
        """As `prefill`, with the logits of every fed position (n, V): a prompt being scored."""
        return self._prefill(seq_id, token_ids, start, 0)

    @torch.inference_mode()
    def _prefill(self, seq_id: str, token_ids: Sequence[int], start: int, keep: int) -> np.ndarray:
        """`keep`: the last positions whose logits come back (transformers' logits_to_keep; 0: all)."""
        past = self.kv.cache_of(seq_id)
        n = len(token_ids)
        out = self.model(
            input_ids=torch.tensor([list(token_ids)], device=self.device),  # (1, n)
            position_ids=torch.arange(start, start + n, device=self.device).unsqueeze(0),  # (1, n)
            attention_mask=torch.ones((1, start + n), dtype=torch.long, device=self.device),
            cache=self._cache(past),
            use_cache=True,
            logits_to_keep=keep,
        )
        self.kv.store(seq_id, _layers(out.cache))
        rows: np.ndarray = out.logits[0].float().cpu().numpy()  # (keep or n, V)
        return rows

    @torch.inference_mode()
    def decode(self, seq_ids: Sequence[str], token_ids: Sequence[int]) -> np.ndarray:
        rows = self.kv.arrange(seq_ids)
        by_row = [0] * len(self.kv.rows)
        for i, row in enumerate(rows):
            by_row[row] = token_ids[i]
        out = self.model(
            input_ids=torch.tensor(by_row, device=self.device).unsqueeze(1),  # (B, 1)
            position_ids=torch.from_numpy(self.kv.positions()).to(self.device),  # (B, 1)
            attention_mask=torch.from_numpy(self.kv.attention_mask()).to(self.device),  # (B, T+1)
            cache=self._cache(self.kv.layers),
            use_cache=True,
            logits_to_keep=1,
        )
        self.kv.advance(_layers(out.cache))
        logits = out.logits[:, -1].float().cpu().numpy()  # (B, V)
        return logits[rows]

    def release(self, seq_id: str) -> None:
        self.kv.release(seq_id)

    def close(self) -> None:
        self.kv.clear()

    def _cache(self, layers: list[LayerKV] | None) -> DynamicCache:
        if not layers:
            return DynamicCache(config=self.config)
        return DynamicCache(ddp_cache_data=layers, config=self.config)


def _layers(cache: DynamicCache) -> list[LayerKV]:
    return [(layer.keys, layer.values) for layer in cache.layers]
