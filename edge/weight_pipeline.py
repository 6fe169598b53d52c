"""The graph's linear weights prepared ahead of the builder, several at a time (convert time; no torch).

Most of a conversion is work on one weight that does not depend on the graph: reading it from the
checkpoint, widening bf16 to float32, transposing it into the (in, out) layout and quantizing it into
blocks. numpy's copies release the GIL (and onnxruntime's quantizer already runs on every core), so a
few threads do that work side by side while the builder writes the weights it already has. The builder takes the weights in the
order it writes them (`take` checks it); at most `threads` of them are being prepared or waiting, so
memory grows by about one prepared weight per thread (docs/edge.md, "A 7B conversion"). With one
thread each weight is prepared when the builder takes it, in the builder's thread.

The output does not depend on the thread count: each weight is prepared by the same code, and the
builder writes them in the same order.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

Key = TypeVar("Key", bound=Hashable)
Prepared = TypeVar("Prepared")
# A cap, not a measured optimum (this project's machines have 2 cores): onnxruntime's quantizer already
# uses every core for its part, and each thread holds one more weight in memory (a 7B's LM head takes
# ~3 GB while it is prepared: its bf16 bits, its float32 transpose and its blocks).
MAX_AUTO_THREADS = 4


def auto_threads() -> int:
    """`dsnode convert`'s default: one per core, at most MAX_AUTO_THREADS."""
    return max(1, min(MAX_AUTO_THREADS, os.cpu_count() or 1))


class WeightPipeline(Generic[Key, Prepared]):
    """`prepare(key)` for each of `keys`, in order, up to `threads` ahead of the one `take` returns."""

    def __init__(self, keys: Sequence[Key], prepare: Callable[[Key], Prepared], threads: int) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self._keys, self._prepare, self._threads = list(keys), prepare, threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="dsnode-convert") if threads > 1 else None
        self._pending: deque[tuple[Key, Future[Prepared]]] = deque()
        self._taken = 0
        self._submitted = 0
        self._fill()

    def take(self, key: Key) -> Prepared:
        """The prepared `key`, which must be the next one of `keys`; raises what preparing it raised."""
        if self._taken >= len(self._keys) or self._keys[self._taken] != key:
            expected = self._keys[self._taken] if self._taken < len(self._keys) else "nothing more"
            raise RuntimeError(f"the builder asked for {key!r}; the next prepared weight is {expected!r}")
        self._taken += 1
        if self._pool is None:
            return self._prepare(key)
        _, future = self._pending.popleft()
        try:
            return future.result()
        finally:
            self._fill()

    def close(self) -> None:
        """Cancels what has not started and waits for what has (on success nothing is left)."""
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _fill(self) -> None:
        while self._pool is not None and self._submitted < len(self._keys) and len(self._pending) < self._threads:
            key = self._keys[self._submitted]
            self._pending.append((key, self._pool.submit(self._prepare, key)))
            self._submitted += 1
