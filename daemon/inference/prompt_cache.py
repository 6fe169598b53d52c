"""A host-memory prompt cache: the KV cache of finished sequences, kept so that a later prompt that
begins with the same tokens skips prefilling them (llama.cpp's `--cache-ram`; vLLM's prefix caching).

Pure bookkeeping (no model, no threads): entries are token ids with an opaque payload (a runner's copy
of their KV cache) and its size. A lookup finds the entry sharing the longest prefix with a prompt,
counted in whole blocks of `BLOCK` tokens (as vLLM counts cached tokens: a prompt's first few tokens,
a chat template's opening, are in almost every entry and say nothing). The store holds at most
`capacity` bytes, evicting the least recently used; an entry that is a prefix of a newer one is
dropped (a conversation's next turn holds all of the previous one). Every entry belongs to a scope
(the API key and `cache_salt` of the request that computed it): a lookup sees its own scope's only.

`PrefixReuse` is a runner's side of it: a runner's payload is a list of `Segment`s, the host copies a
sequence took its prefix from (shared with the entry they came from) and a copy of what it computed
after them, so keeping a conversation's next turn copies only that turn. No model and no threads here;
`check_host_memory` is the one look at the host (its memory, at start).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import psutil
import structlog

from ..sizing import DoesNotFit, prompt_cache_verdict

log = structlog.get_logger("dsnode.inference")

BLOCK = 16  # tokens: the unit a prefix is reused in
Payload = TypeVar("Payload")


@dataclass(frozen=True)
class Entry(Generic[Payload]):
    tokens: np.ndarray  # int64, the token ids whose KV the payload holds, position 0 on
    payload: Payload
    nbytes: int
    scope: str = ""


@dataclass(frozen=True)
class Hit(Generic[Payload]):
    entry: Entry[Payload]
    reused: int  # tokens of the entry the prompt may take: a multiple of BLOCK, below the prompt's length


class PromptCache(Generic[Payload]):
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[int, Entry[Payload]] = OrderedDict()  # least recently used first
        self._keys = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: Sequence[int], scope: str = "") -> Hit[Payload] | None:
        """The entry of `scope` sharing the most whole blocks with `prompt`, leaving at least its last
        token to be fed (the model's logits for it are needed). Marks it recently used."""
        ids = np.asarray(prompt, np.int64)
        most = (len(ids) - 1) // BLOCK * BLOCK
        best: tuple[int, int] | None = None
        for key, entry in self._in(scope):
            shared = min(common_prefix(entry.tokens, ids), most) // BLOCK * BLOCK
            if shared and (best is None or shared > best[1]):
                best = (key, shared)
        if best is None:
            return None
        self._entries.move_to_end(best[0])
        return Hit(self._entries[best[0]], best[1])

    def wants(self, tokens: Sequence[int], nbytes: int, scope: str = "") -> bool:
        """Whether these tokens, their KV `nbytes` large, would be kept: not when too short or too large,
        nor when an entry of the scope holds them already (it counts as used)."""
        return self._held_within(np.asarray(tokens, np.int64), nbytes, scope) is not None

    def add(self, tokens: Sequence[int], nbytes: int, scope: str, make: Callable[[], Payload]) -> bool:
        """Keep an entry, its payload made by `make` only if it is kept (a copy of a KV cache is not
        cheap); dropping the entries of its scope it holds all of, then the least recently used of any
        scope while over capacity. False if it is not kept (see `wants`)."""
        ids = np.asarray(tokens, np.int64)
        held = self._held_within(ids, nbytes, scope)
        if held is None:
            return False
        payload = make()
        for key in held:
            self._drop(key)
        while self.nbytes + nbytes > self.capacity:
            self._drop(next(iter(self._entries)))
        self._entries[self._keys] = Entry(ids, payload, nbytes, scope)
        self._keys += 1
        self.nbytes += nbytes
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _held_within(self, ids: np.ndarray, nbytes: int, scope: str) -> list[int] | None:
        """One pass over the scope's entries: None if `ids` are not to be kept (see `wants`), else the
        keys of the entries they hold all of."""
        if len(ids) < BLOCK or not 0 < nbytes <= self.capacity:
            return None
        held = []
        for key, entry in self._in(scope):
            shared = common_prefix(entry.tokens, ids)
            if shared == len(ids):
                self._entries.move_to_end(key)
                return None
            if shared == len(entry.tokens):
                held.append(key)
        return held

    def _in(self, scope: str) -> Iterator[tuple[int, Entry[Payload]]]:
        return ((key, entry) for key, entry in self._entries.items() if entry.scope == scope)

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading elements two 1-d arrays share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


Part = TypeVar("Part")


@dataclass(frozen=True)
class Segment(Generic[Part]):
    """A runner's host copy of positions start..end of a sequence's KV cache (`part` may hold more
    positions past `end`: an entry that took only some of an older one's positions shares its copy)."""

    start: int
    end: int
    part: Part


Segments = tuple[Segment[Part], ...]


def truncated(segments: Segments[Part], positions: int) -> Segments[Part]:
    """The segments that hold positions 0..positions, the last one cut there."""
    return tuple(Segment(s.start, min(s.end, positions), s.part) for s in segments if s.start < positions)


class PrefixReuse(Generic[Part]):
    """A runner's side of its prompt cache: the scope each admitted sequence is in, the entries given to
    sequences and not copied in yet, and what each took. The runner makes the copies (its cache's
    layout and device are its own); an entry is the segments its sequence took from an older entry
    plus a copy of what it computed after them, so keeping a conversation's next turn copies only the
    turn, not the whole conversation again."""

    def __init__(self, capacity: int) -> None:
        self.cache: PromptCache[Segments[Part]] = PromptCache(capacity)
        self.scope_of: dict[str, str] = {}  # told at admission: what it computes is kept under it
        self.pending: dict[str, tuple[Entry[Segments[Part]], int]] = {}  # given a prefix, not copied in yet
        self.took: dict[str, Segments[Part]] = {}  # the segments a sequence's first positions came from

    def lookup(self, seq_id: str, token_ids: Sequence[int], scope: str, has_cache: bool) -> int:
        """A sequence of `scope` is being admitted: how many of its first tokens the cache holds for that
        scope (0 if none). A lookup only (the engine asks while it holds its scheduling lock); the runner
        copies the entry in at the start of the next step (`take_pending`)."""
        if not self.cache.capacity or has_cache or seq_id in self.pending:
            return 0
        self.scope_of[seq_id] = scope
        hit = self.cache.lookup(token_ids, scope)
        if hit is None:
            return 0
        self.pending[seq_id] = (hit.entry, hit.reused)
        return int(hit.reused)

    def keeps(self, seq_id: str) -> str | None:
        """A running sequence is to be kept now (its prompt, for other choices): its scope, or None if
        it was never looked up or its prefix is not copied in yet."""
        return None if seq_id in self.pending else self.scope_of.get(seq_id)

    def take_pending(self) -> list[tuple[str, list[int], Segments[Part]]]:
        """The sequences given a prefix since the last step: their first tokens and the segments that
        hold them (to copy into their caches)."""
        taken = []
        for seq_id, (entry, n) in self.pending.items():
            self.took[seq_id] = truncated(entry.payload, n)
            taken.append((seq_id, entry.tokens[:n].tolist(), self.took[seq_id]))
        self.pending.clear()
        return taken

    def offer(self, seq_id: str, tokens: list[int], scope: str | None, token_bytes: int,
              copy: Callable[[int, int], Part]) -> None:
        """Keep what a sequence holds (its `tokens`, `token_bytes` each) if the cache wants it: the
        segments it took, and `copy(start, end)` of the positions it computed after them. What it kept
        then counts as taken, so a later offer of the same sequence copies only what came after."""
        if scope is None or not tokens:
            return
        took = self.took.get(seq_id, ())
        start = took[-1].end if took else 0

        def make() -> Segments[Part]:
            made = took + ((Segment(start, len(tokens), copy(start, len(tokens))),) if len(tokens) > start else ())
            self.took[seq_id] = made
            return made

        self.cache.add(tokens, len(tokens) * token_bytes, scope, make)

    def released(self, seq_id: str, tokens: list[int], token_bytes: int, copy: Callable[[int, int], Part]) -> None:
        """A sequence is released: what it holds is offered (`offer`) unless it was never looked up (whose
        would it be?) or was dropped before its prefix was copied in (it holds nothing); then forgotten."""
        scope = self.scope_of.pop(seq_id, None)
        try:
            if self.pending.pop(seq_id, None) is None:
                self.offer(seq_id, tokens, scope, token_bytes, copy)
        finally:
            self.took.pop(seq_id, None)

    def clear(self) -> None:
        self.cache.clear()
        self.scope_of.clear()
        self.pending.clear()
        self.took.clear()


def check_host_memory(prompt_cache_mb: int, ranks_here: int = 1) -> None:
    """At start: `prompt_cache_mb` of host memory for each of this host's ranks (or the one engine), on
    top of the model. Over 70% of the host's memory is refused (DoesNotFit: `dsnode serve` exits 78,
    which systemd does not retry), over 40% warned of (`dsnode.sizing.prompt_cache_verdict`)."""
    verdict, why = prompt_cache_verdict(prompt_cache_mb, ranks_here, psutil.virtual_memory().total)
    if verdict == "refuse":
        raise DoesNotFit(why)
    if verdict == "warn":
        log.warning("prompt_cache_large", reason=why)
