"""Forward passes of a Hugging Face causal LM with a per-sequence KV cache, batched decode.

Shared by the transformers and DeepSpeed engines (DeepSpeed wraps the same module). Prefill runs one
sequence at a time (batch 1, no padding); decode runs every running sequence in one forward over the
left-padded batch cache of `dsnode.inference.kvbatch`.

With a prompt cache (`prompt_cache_bytes`, the transformers engine's `[batching] prompt_cache_mb`): a
released sequence's cache is copied to host memory with the tokens it holds, and a sequence being
admitted takes the longest prefix it shares (`reuse_prefix`, as the edge's `SlotRunner`). Each rank of
the deepspeed engine keeps its own shard's (`tp_worker` checks that the ranks agree).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from dsnode.inference.kvbatch import ArrayOps, KVBatch, LayerKV
from dsnode.inference.prompt_cache import PrefixReuse, PromptCache, Segments
from transformers import DynamicCache

TORCH_OPS: ArrayOps[torch.Tensor] = ArrayOps(
    concat=lambda arrays, axis: torch.cat(arrays, dim=axis),
    zeros=lambda like, shape: like.new_zeros(shape),
)


class TorchRunner:
    def __init__(self, model: Any, device: torch.device, prompt_cache_bytes: int = 0) -> None:
        self.model = model
        self.device = device
        self.config = model.config
        self.kv = KVBatch(TORCH_OPS)
        self.fed: dict[str, list[int]] = {}  # the token ids in each sequence's cache
        self.reuse: PrefixReuse[list[LayerKV]] = PrefixReuse(prompt_cache_bytes)  # host tensors

    @property
    def prompts(self) -> PromptCache[Segments[list[LayerKV]]]:
        return self.reuse.cache

    def prefill(self, seq_id: str, token_ids: Sequence[int], start: int) -> np.ndarray:
        last: np.ndarray = self._prefill(seq_id, token_ids, start, 1)[-1]  # (V,)
        return last

    def prefill_all(self, seq_id: str, token_ids: Sequence[int], start: int) -> np.ndarray:
        """As `prefill`, with the logits of every fed position (n, V): a prompt being scored."""
        return self._prefill(seq_id, token_ids, start, 0)

    def reuse_prefix(self, seq_id: str, token_ids: Sequence[int], scope: str = "") -> int:
        """A sequence of `scope` is being admitted: how many of its first tokens the prompt cache holds
        for that scope (0 if none); the copy to the device is made at the start of the next step."""
        return int(self.reuse.lookup(seq_id, token_ids, scope, seq_id in self.fed))

    def _take_reused(self) -> None:
        for seq_id, tokens, segments in self.reuse.take_pending():
            layers = zip(*(segment.part for segment in segments))  # per layer: its (K, V) of each segment
            self.kv.store(seq_id, [_joined(parts, [s.end - s.start for s in segments], self.device)
                                   for parts in layers])
            self.fed[seq_id] = tokens

    @torch.inference_mode()
    def _prefill(self, seq_id: str, token_ids: Sequence[int], start: int, keep: int) -> np.ndarray:
        """`keep`: the last positions whose logits come back (transformers' logits_to_keep; 0: all)."""
        self._take_reused()
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
        self.fed[seq_id] = (self.fed.get(seq_id, []) if start else []) + list(token_ids)
        rows: np.ndarray = out.logits[0].float().cpu().numpy()  # (keep or n, V)
        return rows

    @torch.inference_mode()
    def decode(self, seq_ids: Sequence[str], token_ids: Sequence[int]) -> np.ndarray:
        self._take_reused()
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
        for seq_id, token in zip(seq_ids, token_ids):
            self.fed[seq_id].append(token)
        logits = out.logits[:, -1].float().cpu().numpy()  # (B, V)
        return logits[rows]

    def release(self, seq_id: str) -> None:
        """Forget a sequence; the prompt cache keeps a host copy of what it computed, if it wants it."""
        tokens = self.fed.pop(seq_id, [])
        try:
            layers = self._held(seq_id, tokens)
            self.reuse.released(seq_id, tokens if layers else [], _token_bytes(layers),
                                lambda start, end: _host_copy(layers, start, end))
        finally:  # a copy that fails (host memory) must not keep the sequence in the batch
            self.kv.release(seq_id)

    def keep_prefix(self, seq_id: str) -> None:
        """Offer what a running sequence has computed to the prompt cache now (a prompt just prefilled,
        for its other choices); the sequence goes on."""
        tokens = list(self.fed.get(seq_id, []))
        layers = self._held(seq_id, tokens)
        if layers:
            self.reuse.offer(seq_id, tokens, self.reuse.keeps(seq_id), _token_bytes(layers),
                             lambda start, end: _host_copy(layers, start, end))

    def _held(self, seq_id: str, tokens: list[int]) -> list[LayerKV]:
        """The sequence's cache on the device, if it holds exactly its tokens (else a step failed)."""
        layers = self.kv.view_of(seq_id)
        return layers if layers and int(layers[0][0].shape[2]) == len(tokens) else []

    def close(self) -> None:
        self.kv.clear()
        self.fed.clear()
        self.reuse.clear()

    def _cache(self, layers: list[LayerKV] | None) -> DynamicCache:
        if not layers:
            return DynamicCache(config=self.config)
        return DynamicCache(ddp_cache_data=layers, config=self.config)


def _token_bytes(layers: list[LayerKV]) -> int:
    return sum(k[:, :, :1].nbytes + v[:, :, :1].nbytes for k, v in layers)


def _host_copy(layers: list[LayerKV], start: int, end: int) -> list[LayerKV]:
    """Positions start..end of every layer, copied to host memory."""
    return [(k[:, :, start:end].to("cpu", copy=True), v[:, :, start:end].to("cpu", copy=True)) for k, v in layers]


def _joined(parts: tuple[LayerKV, ...], lengths: list[int], device: torch.device) -> LayerKV:
    """One layer's (K, V) on the device from the segments' host copies, each cut to its length."""
    keys = [k[:, :, :n] for (k, _), n in zip(parts, lengths)]
    values = [v[:, :, :n] for (_, v), n in zip(parts, lengths)]
    if len(parts) == 1:
        return keys[0].to(device, copy=True), values[0].to(device, copy=True)
    return torch.cat(keys, dim=2).to(device), torch.cat(values, dim=2).to(device)


def _layers(cache: DynamicCache) -> list[LayerKV]:
    return [(layer.keys, layer.values) for layer in cache.layers]
