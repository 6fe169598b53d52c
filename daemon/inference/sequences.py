"""A request while the engine works on it, and how its deltas reach the event loop."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .detokenizer import Detokenizer
from .engine import Delta, GenerationRequest, TokenLogprob
from .grammar import TokenGuide
from .sampling import TokenCounts

THROUGHPUT_WINDOW_S = 10.0


@dataclass
class LiveSequence:
    seq_id: str
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Delta | BaseException]
    detok: Detokenizer
    rng: np.random.Generator
    end_ids: frozenset[int]  # the tokens that end it: end-of-sequence (unless ignore_eos), stop_token_ids
    tokens: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    guide: TokenGuide | None = None  # the request's constraint, compiled on its first step
    counts: TokenCounts | None = None  # for the penalties, from the first step of a request that has one
    queued_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None  # first step that fed it: the end of its queue time
    # a prompt being scored (`prompt_logprobs`): an entry per prompt position, filled as its chunks are
    # fed; None once sent on the first delta (a recomputation after preemption scores nothing again)
    prompt_scores: list[TokenLogprob | None] | None = None
    cached_tokens: int = 0  # of the prompt, taken from the runner's prompt cache when it was admitted

    def send(self, item: Delta | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Sampled(NamedTuple):
    """A step's token for one sequence, with its log-probabilities when the request asked."""

    token: int
    logprob: TokenLogprob | None


def send_all(outgoing: list[tuple[LiveSequence, Delta]]) -> None:
    """A step's deltas, one wake-up of each event loop for all of them. Each `call_soon_threadsafe`
    writes to the loop's wake-up socket, and on a busy core every wake-up costs the worker a thread
    switch (measured ~1 ms per sequence per step on one pinned core); one per step is enough."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[LiveSequence, Delta]]] = {}
    for live, delta in outgoing:
        by_loop.setdefault(live.loop, []).append((live, delta))
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(deliver, items)


def deliver(items: list[tuple[LiveSequence, Delta]]) -> None:
    for live, delta in items:
        live.queue.put_nowait(delta)


class Throughput:
    """Tokens sampled per second over the last `THROUGHPUT_WINDOW_S` (the engine's load figure)."""

    def __init__(self) -> None:
        self._sampled: deque[tuple[float, int]] = deque()

    def count(self, n: int) -> None:
        now = time.monotonic()
        self._sampled.append((now, n))
        while self._sampled and self._sampled[0][0] < now - THROUGHPUT_WINDOW_S:
            self._sampled.popleft()

    def per_second(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._sampled) if t >= now - THROUGHPUT_WINDOW_S]
        return round(sum(n for _, n in recent) / THROUGHPUT_WINDOW_S, 2) if recent else 0.0
