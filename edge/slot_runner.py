"""`SlotRunner`: the `ModelRunner` for graphs built by `edge/graph_builder.py` (GroupQueryAttention).

The KV cache is one buffer per layer and per K/V, shaped (slots, kv_heads, length, head_dim), kept on
the session's device for the life of the runner and handed to onnxruntime by pointer (I/O binding) as
both the past input and the present output: GroupQueryAttention writes each step's new positions into
it in place. Nothing of the cache crosses into numpy on a step, and no step copies it.

- Each running sequence owns a slot (a row), taken at its first prefill and given back at release.
  Slots are handed out lowest first, so the running batch is the prefix [0, highest used + 1).
- Prefill runs one sequence (batch 1) against a view of its slot alone; a later chunk continues
  where the previous one stopped (GroupQueryAttention reads the slot's earlier positions).
- Decode runs the prefix in one call: row r's `seqlens_k` is its own length, so rows of any length
  decode together with no padding; a row of the prefix with no token in the step (a free slot, or a
  sequence between prefill chunks or joining while the others decode) computes one throw-away position
  where it overwrites nothing cached: 0 for a free slot, a live sequence's own length otherwise.
- The buffer grows by one copy when a sequence needs more: slots doubled; length to what is needed
  plus a quarter (at least 1.5x, in steps of 64, at most the context limit), so a prompt's prefill
  leaves room for its answer and decoding a typical answer copies nothing. A copy per growth, not per
  token. Sequences joining and leaving never move data.
- A decode step writes its inputs into arrays bound once per batch size, and its logits into one
  bound output: the per-token work outside the session call is filling those and picking the rows.
- **The prompt cache** (CPU only; `[batching] prompt_cache_mb`): when a sequence is released, its
  slot's cache goes to a host-memory `PromptCache` with the tokens it holds: the host copies it took
  its prefix from, and a copy of the positions it computed after them. A sequence the engine
  admits asks it (`reuse_prefix`) for the longest prefix it shares, in whole blocks; that copy is put
  back into the new sequence's slot before its first step, and prefilling starts after it. On a GPU the
  cache is not kept (the buffers are device memory, and a prefill there is fast).

Only numpy and onnxruntime here: this is the edge host's run-time path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from dsnode.inference.prompt_cache import PrefixReuse, PromptCache, Segments

from .manifest import LOGIT_POSITIONS
from .onnx_runner import CUDA, RunnerError

_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}  # int8: --kv-cache int8
_LAST = np.array(-1, np.int64)  # `last_position`: each row's last position only
INITIAL_SLOTS = 4
INITIAL_LENGTH = 256
LENGTH_STEP = 64


def grown_length(needed: int, current: int, limit: int) -> int:
    """The cache length to grow to when `needed` positions do not fit in `current` (pure)."""
    wanted = max(needed + needed // 4, current + current // 2)
    return min(limit, -(-wanted // LENGTH_STEP) * LENGTH_STEP)


@dataclass(frozen=True)
class CacheSpec:
    """The cache layout read from the graph's inputs (not from file names or configs)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: type

    @classmethod
    def of(cls, session: ort.InferenceSession) -> CacheSpec:
        inputs = {i.name: i for i in session.get_inputs()}
        missing = [n for n in ("input_ids", "seqlens_k", "total_sequence_length") if n not in inputs]
        if missing or "past_key_values.0.key" not in inputs:
            raise RunnerError(f"not a dsnode GQA graph (missing inputs {missing or ['past_key_values.0.key']})")
        layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
        first = inputs["past_key_values.0.key"]
        heads, dim = first.shape[1], first.shape[3]
        if not (isinstance(heads, int) and isinstance(dim, int)) or first.type not in _TYPES:
            raise RunnerError(f"past_key_values.0.key: unexpected {first.type} {first.shape}")
        return cls(layers, heads, dim, _TYPES[first.type])


class CacheBuffers:
    """Per layer, K and V buffers (slots, kv_heads, length, head_dim) on one device."""

    def __init__(self, spec: CacheSpec, device: str, slots: int, length: int) -> None:
        self.spec, self.device = spec, device
        self.slots, self.length = slots, length
        self.arrays: list[np.ndarray] = []  # on the CPU: the memory of `values`, in layer order, K then V
        self.values = [self._allocate(np.zeros(self._shape(slots, length), spec.dtype)) for _ in range(2 * spec.layers)]

    def _shape(self, slots: int, length: int) -> tuple[int, int, int, int]:
        return slots, self.spec.kv_heads, length, self.spec.head_dim

    def _allocate(self, array: np.ndarray) -> ort.OrtValue:
        """On the CPU the OrtValue wraps `array` (no copy; it keeps the array alive), on a GPU it is a copy."""
        if self.device == "cpu":
            self.arrays.append(array)
        return ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def token_bytes(self) -> int:
        """Bytes of one position of one slot, all layers, K and V."""
        return 2 * self.spec.layers * self.spec.kv_heads * self.spec.head_dim * np.dtype(self.spec.dtype).itemsize

    def copy_out(self, slot: int, start: int, end: int) -> list[np.ndarray]:
        """A host copy of a slot's positions start..end, per layer K and V (CPU buffers only)."""
        return [array[slot, :, start:end].copy() for array in self.arrays]

    def copy_in(self, slot: int, segments: Segments[list[np.ndarray]]) -> None:
        """Host copies into a slot, each segment at its positions."""
        for segment in segments:
            n = segment.end - segment.start
            for array, part in zip(self.arrays, segment.part):
                array[slot, :, segment.start:segment.end] = part[:, :n]

    @property
    def slot_bytes(self) -> int:
        return self.spec.kv_heads * self.length * self.spec.head_dim * np.dtype(self.spec.dtype).itemsize

    def pointer(self, index: int, slot: int) -> int:
        return int(self.values[index].data_ptr()) + slot * self.slot_bytes

    def grow(self, slots: int, length: int) -> None:
        """Reallocate larger and copy what is there (through the host: growth is rare, steps are not)."""
        grown, self.arrays = [], []
        for value in self.values:
            old = value.numpy()  # (slots, h, length, d)
            new = np.zeros(self._shape(slots, length), self.spec.dtype)
            new[: old.shape[0], :, : old.shape[2]] = old
            grown.append(self._allocate(new))
        self.values, self.slots, self.length = grown, slots, length


@dataclass
class DecodeStep:
    """A decode binding for one batch size over one set of cache buffers, with the host arrays its
    inputs and logits are bound to (the session reads and writes them in place)."""

    binding: ort.IOBinding
    batch: int
    buffers: int  # id() of the cache buffers it points into
    ids: np.ndarray  # (B, 1) int64
    seqlens: np.ndarray  # (B,) int32: tokens cached before this step
    total: np.ndarray  # () int32: the longest row's length after this step
    logits: np.ndarray  # (B, V) float32


class SlotRunner:
    """The `ModelRunner` of GQA graphs. Called from one thread (the engine's worker)."""

    def __init__(self, session: ort.InferenceSession, max_length: int, prompt_cache_bytes: int = 0) -> None:
        self.session = session
        self.spec = CacheSpec.of(session)
        self.device = "cuda" if session.get_providers()[0] == CUDA else "cpu"
        self.max_length = max_length
        self.vocab = int(session.get_outputs()[0].shape[1])
        # graphs converted before the input existed return the last position only
        self.picks_positions = LOGIT_POSITIONS in {i.name for i in session.get_inputs()}
        self.cache = CacheBuffers(self.spec, self.device, INITIAL_SLOTS, min(INITIAL_LENGTH, max_length))
        self.slot_of: dict[str, int] = {}
        self.fed: dict[str, list[int]] = {}  # the ids of the tokens in each sequence's cache, in order
        self.reuse: PrefixReuse[list[np.ndarray]] = PrefixReuse(prompt_cache_bytes if self.device == "cpu" else 0)
        self._decode_binding: DecodeStep | None = None

    @property
    def prompts(self) -> PromptCache[Segments[list[np.ndarray]]]:
        return self.reuse.cache

    @property
    def provider(self) -> str:
        return str(self.session.get_providers()[0])

    def prefill(self, seq_id: str, token_ids: Sequence[int], start: int) -> np.ndarray:
        row: np.ndarray = self._prefill(seq_id, token_ids, start, None)[0]  # (V,)
        return row

    def prefill_all(self, seq_id: str, token_ids: Sequence[int], start: int) -> np.ndarray:
        """As `prefill`, with the logits of every fed position (n, V): a prompt being scored. An older
        graph, which returns the last position only, is fed one token at a time."""
        if self.picks_positions:
            return self._prefill(seq_id, token_ids, start, np.arange(len(token_ids), dtype=np.int64))
        return np.stack([self.prefill(seq_id, [token], start + i) for i, token in enumerate(token_ids)])

    def reuse_prefix(self, seq_id: str, token_ids: Sequence[int], scope: str = "") -> int:
        """A sequence of `scope` is being admitted: how many of its first tokens the prompt cache holds
        for that scope (0 if none). It takes a slot and the entry's copy at the start of the next step,
        whatever that step feeds."""
        return int(self.reuse.lookup(seq_id, token_ids, scope, seq_id in self.slot_of))

    def _copy_reused(self) -> None:
        """Sequences given a prefix since the last step take their slots, and the prefix goes in."""
        for seq_id, tokens, segments in self.reuse.take_pending():
            slot = self.slot_of[seq_id] = self._free_slot()
            self.fed[seq_id] = tokens
            self._ensure_length(len(tokens))
            self.cache.copy_in(slot, segments)

    def _prefill(self, seq_id: str, token_ids: Sequence[int], start: int,
                 positions: np.ndarray | None) -> np.ndarray:
        self._copy_reused()
        if seq_id not in self.slot_of:
            if start != 0:
                raise RunnerError(f"{seq_id}: prefill from position {start} without a cache")
            self.slot_of[seq_id] = self._free_slot()
            self.fed[seq_id] = []
        elif len(self.fed[seq_id]) != start:
            raise RunnerError(f"{seq_id}: prefill from {start}, but {len(self.fed[seq_id])} tokens are cached")
        total = start + len(token_ids)
        self._ensure_length(total)
        binding = self.session.io_binding()
        self._bind_cache(binding, self.slot_of[seq_id], 1)
        if self.picks_positions:
            binding.bind_cpu_input(LOGIT_POSITIONS, _LAST if positions is None else positions)
        logits = self._run(binding, np.asarray([token_ids], np.int64), np.asarray([total - 1], np.int32),
                           1 if positions is None else len(positions))
        self.fed[seq_id].extend(token_ids)
        return logits  # (1 or len(positions), V)

    def decode(self, seq_ids: Sequence[str], token_ids: Sequence[int]) -> np.ndarray:
        self._copy_reused()
        rows = [self.slot_of[s] for s in seq_ids]
        batch = max(self.slot_of.values()) + 1  # the running prefix of slots
        in_order = len(rows) == batch and rows == list(range(batch))  # the common case: no gaps, no reordering
        positions = self._step_positions(batch, seq_ids)
        self._ensure_length(int(positions.max()) + 1)
        step = self._decode_step(batch)
        if in_order:
            step.ids[:, 0] = token_ids
        else:
            step.ids.fill(0)  # rows not in this step read token 0 (and are thrown away)
            step.ids[rows, 0] = token_ids
        step.seqlens[:] = positions
        step.total[...] = int(positions.max()) + 1
        self.session.run_with_iobinding(step.binding)
        for seq_id, token in zip(seq_ids, token_ids):
            self.fed[seq_id].append(token)
        # (n, V) in the order asked: a copy, the bound buffer is written again by the next step
        ordered: np.ndarray = step.logits.copy() if in_order else step.logits[rows]
        return ordered

    def release(self, seq_id: str) -> None:
        """The sequence is done (or dropped): its slot is free, and what its cache holds goes to the
        prompt cache if that wants it. Only positions a step completed are kept: a failed step has
        not counted the positions it may have written."""
        slot = self.slot_of.pop(seq_id, -1)  # -1: it never had one (dropped before its first step)
        tokens = self.fed.pop(seq_id, []) if slot >= 0 else []
        self.reuse.released(seq_id, tokens, self.cache.token_bytes(),
                            lambda start, end: self.cache.copy_out(slot, start, end))

    def keep_prefix(self, seq_id: str) -> None:
        """Offer what a running sequence has computed to the prompt cache now (a prompt just prefilled,
        for its other choices); the sequence goes on."""
        slot = self.slot_of.get(seq_id)
        if slot is not None:
            self.reuse.offer(seq_id, list(self.fed.get(seq_id, [])), self.reuse.keeps(seq_id),
                             self.cache.token_bytes(), lambda start, end: self.cache.copy_out(slot, start, end))

    def close(self) -> None:
        self.slot_of.clear()
        self.fed.clear()
        self.reuse.clear()
        self._decode_binding = None

    # --- internals -------------------------------------------------------------------------------
    def _step_positions(self, batch: int, seq_ids: Sequence[str]) -> np.ndarray:
        """Where each row of the prefix writes this step: a decoding sequence at its length; a row with no
        token in the step computes a throw-away position that must not land on anything cached — a free
        slot at 0, a live sequence left out of the step (between prefill chunks, or prefilled in the step
        the others decode in) at its own length, which its next step overwrites."""
        positions = np.zeros(batch, np.int32)
        for seq_id, slot in self.slot_of.items():
            positions[slot] = len(self.fed[seq_id])
        if len(seq_ids) < len(self.slot_of):  # a left-out row cannot write past the context limit
            left_out = [self.slot_of[s] for s in self.slot_of.keys() - set(seq_ids)]
            positions[left_out] = np.minimum(positions[left_out], self.max_length - 1)
        return positions

    def _free_slot(self) -> int:
        used = set(self.slot_of.values())
        slot = next(i for i in range(len(used) + 1) if i not in used)
        if slot >= self.cache.slots:
            self._grow(self.cache.slots * 2, self.cache.length)
        return slot

    def _ensure_length(self, needed: int) -> None:
        if needed > self.max_length:
            raise RunnerError(f"{needed} tokens exceed the model's context limit of {self.max_length}")
        if needed > self.cache.length:
            self._grow(self.cache.slots, grown_length(needed, self.cache.length, self.max_length))

    def _grow(self, slots: int, length: int) -> None:
        self.cache.grow(slots, length)
        self._decode_binding = None  # its pointers are stale

    def _bind_cache(self, binding: ort.IOBinding, slot: int, batch: int) -> None:
        """past and present of every layer → the same memory: `batch` slots from `slot` on."""
        shape = [batch, self.spec.kv_heads, self.cache.length, self.spec.head_dim]
        for layer in range(self.spec.layers):
            for j, kv in enumerate(("key", "value")):
                pointer = self.cache.pointer(2 * layer + j, slot)
                binding.bind_input(f"past_key_values.{layer}.{kv}", self.device, 0, self.spec.dtype, shape, pointer)
                binding.bind_output(f"present.{layer}.{kv}", self.device, 0, self.spec.dtype, shape, pointer)

    def _decode_step(self, batch: int) -> DecodeStep:
        """The decode binding and its input and output arrays, made again only when the batch prefix
        or the cache buffers change."""
        key = id(self.cache.values[0])
        step = self._decode_binding
        if step is None or (step.batch, step.buffers) != (batch, key):
            binding = self.session.io_binding()
            self._bind_cache(binding, 0, batch)
            step = DecodeStep(binding, batch, key, np.zeros((batch, 1), np.int64), np.zeros(batch, np.int32),
                              np.zeros((), np.int32), np.empty((batch, self.vocab), np.float32))
            inputs = [("input_ids", step.ids), ("seqlens_k", step.seqlens), ("total_sequence_length", step.total)]
            for name, array in inputs + ([(LOGIT_POSITIONS, _LAST)] if self.picks_positions else []):
                binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            binding.bind_output("logits", "cpu", 0, np.float32, list(step.logits.shape), step.logits.ctypes.data)
            self._decode_binding = step
        return step

    def _run(self, binding: ort.IOBinding, ids: np.ndarray, seqlens: np.ndarray, rows: int) -> np.ndarray:
        """One session call; returns logits (B x rows, V) float32 on the host."""
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("seqlens_k", seqlens)
        binding.bind_cpu_input("total_sequence_length", np.asarray(int(seqlens.max()) + 1, np.int32))
        logits = np.empty((len(ids) * rows, self.vocab), np.float32)  # written by the session
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits
