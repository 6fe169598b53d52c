"""Continuous batching under a token budget, as pure logic (no I/O, no model, no threads).

Each step the engine asks `schedule()` what to run, runs it, and reports back with `update()`.

- A sequence's tokens are its prompt plus what it generated so far; `computed` of them are in the
  model's KV cache. Running a sequence feeds `tokens[computed:]` (its whole prompt in chunks at first,
  then one token per step) and samples one new token once nothing is left to feed.
- **Budget**: the active sequences together never hold more than `max_batch_tokens` tokens (a
  sequence holds every token it knows of: its prompt, even the part not prefilled yet, plus what it
  generated). A sequence is admitted only if the batch still has room for it and for one more token
  per active sequence; decoding that would overflow the budget preempts (below).
- **Admission** is first-come first-served: a long prompt at the head of the queue is never overtaken
  by shorter ones, so it cannot starve. New sequences join between decode steps.
- **Prefill** is chunked (`prefill_chunk_tokens` per step) so a long prompt doesn't stall decoding.
- **Preemption**: when decoding would overflow the budget, the most recently admitted sequence goes
  back to the head of the queue and is recomputed later (its streamed tokens are kept).
- **Cached prefixes**: `schedule(cached=...)` asks, for each sequence it admits, how many of its first
  tokens the model's cache already holds (a prompt cache); those are not fed again. At least the last
  token is always fed: its logits give the next token. Held tokens count them all the same.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from ..config import BatchingSection


class SchedulerError(Exception):
    pass


class WaitingQueueFull(SchedulerError):
    def __init__(self, waiting: int, max_queue: int) -> None:
        super().__init__(f"{waiting} requests waiting (max_queue={max_queue})")
        self.waiting = waiting
        self.max_queue = max_queue


class RequestTooLarge(SchedulerError):
    pass


class Phase(Enum):
    WAITING = "waiting"
    ACTIVE = "active"


@dataclass
class Sequence:
    seq_id: str
    prompt_len: int
    max_tokens: int
    arrival: int
    generated: int = 0
    computed: int = 0
    phase: Phase = Phase.WAITING
    admitted_at: int = -1

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.generated

    @property
    def to_feed(self) -> int:
        return self.num_tokens - self.computed


@dataclass(frozen=True)
class Feed:
    """Feed tokens[start:end] of sequence `seq_id`; if `sample`, sample one token from the last logits."""

    seq_id: str
    start: int
    end: int
    sample: bool

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class StepPlan:
    prefill: tuple[Feed, ...] = ()  # chunks of prompts (maybe several steps for one sequence)
    decode: tuple[Feed, ...] = ()  # one token each, batched together
    preempted: tuple[str, ...] = ()  # drop their KV cache; they will be recomputed
    held_tokens: int = 0  # tokens the active set holds once this step is done

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


@dataclass
class Scheduler:
    config: BatchingSection
    _waiting: deque[Sequence] = field(default_factory=deque)
    _active: dict[str, Sequence] = field(default_factory=dict)
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    # --- intake -------------------------------------------------------------------------------
    def add(self, seq_id: str, prompt_len: int, max_tokens: int) -> None:
        if seq_id in self._active or any(s.seq_id == seq_id for s in self._waiting):
            raise SchedulerError(f"duplicate sequence id {seq_id!r}")
        if prompt_len < 1 or max_tokens < 1:
            raise RequestTooLarge("a sequence needs at least one prompt token and one token to generate")
        if prompt_len + max_tokens > self.config.max_batch_tokens:
            raise RequestTooLarge(
                f"prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds "
                f"max_batch_tokens ({self.config.max_batch_tokens})"
            )
        if len(self._waiting) >= self._free_slots + self.config.max_queue:
            raise WaitingQueueFull(self.queued, self.config.max_queue)
        self._waiting.append(Sequence(seq_id, prompt_len, max_tokens, arrival=next(self._counter)))

    def abort(self, seq_id: str) -> bool:
        """Forget a sequence; returns True if it was active (its KV cache must be released)."""
        if self._active.pop(seq_id, None) is not None:
            return True
        for seq in self._waiting:
            if seq.seq_id == seq_id:
                self._waiting.remove(seq)
                return False
        return False

    # --- stepping -----------------------------------------------------------------------------
    def schedule(self, cached: Callable[[str], int] | None = None) -> StepPlan:
        """Plan one step. Invariant: held tokens + one per active sequence <= max_batch_tokens, so
        the step (which adds at most one token per sequence) never exceeds the budget. `cached(seq_id)`:
        how many leading tokens of a sequence being admitted are in the cache already (see above)."""
        preempted = self._preempt_to_fit()
        self._admit(cached)
        decoding = [s for s in self._active.values() if s.to_feed == 1 and s.computed > 0]
        prefill = self._plan_prefill(exclude={s.seq_id for s in decoding})
        decode = tuple(Feed(s.seq_id, s.computed, s.num_tokens, sample=True) for s in decoding)
        grows = sum(f.sample for f in (*prefill, *decode))
        return StepPlan(prefill, decode, tuple(preempted), self.held_tokens + grows)

    def update(self, plan: StepPlan, finished: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Record that `plan` ran. Returns the ids that sampled a token this step.

        `finished` are sequences the engine ended this step (EOS or a stop string); sequences that
        reached `max_tokens` are ended here. Both leave the active set.
        """
        sampled: list[str] = []
        for feed in (*plan.prefill, *plan.decode):
            seq = self._active.get(feed.seq_id)
            if seq is None or seq.computed != feed.start:
                continue  # aborted or preempted while the step ran
            seq.computed = feed.end
            if seq.computed == seq.num_tokens:
                seq.generated += 1
                sampled.append(seq.seq_id)
        for seq_id in sampled:
            seq = self._active[seq_id]
            if seq_id in finished or seq.generated >= seq.max_tokens:
                del self._active[seq_id]
        return sampled

    # --- views --------------------------------------------------------------------------------
    @property
    def held_tokens(self) -> int:
        return sum(s.num_tokens for s in self._active.values())

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def queued(self) -> int:
        """Waiting sequences that the next step cannot admit for lack of a free running slot: what
        `max_queue` bounds. A request arriving while a step runs waits for the step boundary, but not
        for a slot, so it does not count against the queue while `max_running` has room."""
        return max(0, len(self._waiting) - self._free_slots)

    @property
    def _free_slots(self) -> int:
        return max(0, self.config.max_running - len(self._active))

    @property
    def num_active(self) -> int:
        return len(self._active)

    def has_work(self) -> bool:
        return bool(self._waiting or self._active)

    def sequence(self, seq_id: str) -> Sequence | None:
        return self._active.get(seq_id) or next((s for s in self._waiting if s.seq_id == seq_id), None)

    def generated(self, seq_id: str) -> int:
        seq = self.sequence(seq_id)
        return seq.generated if seq else 0

    # --- internals ----------------------------------------------------------------------------
    def _preempt_to_fit(self) -> list[str]:
        preempted: list[str] = []
        budget = self.config.max_batch_tokens
        while self.held_tokens + len(self._active) > budget and len(self._active) > 1:
            victim = max(self._active.values(), key=lambda s: s.admitted_at)
            del self._active[victim.seq_id]
            victim.computed = 0
            victim.phase = Phase.WAITING
            self._requeue_by_arrival(victim)
            preempted.append(victim.seq_id)
        return preempted

    def _requeue_by_arrival(self, seq: Sequence) -> None:
        index = next((i for i, s in enumerate(self._waiting) if s.arrival > seq.arrival), len(self._waiting))
        self._waiting.insert(index, seq)

    def _admit(self, cached: Callable[[str], int] | None) -> None:
        while self._waiting and len(self._active) < self.config.max_running:
            head = self._waiting[0]
            after = self.held_tokens + len(self._active) + head.num_tokens + 1
            if after > self.config.max_batch_tokens:
                break  # strict FCFS: nobody overtakes the head
            self._waiting.popleft()
            head.phase = Phase.ACTIVE
            head.admitted_at = next(self._counter)
            self._active[head.seq_id] = head
            if cached is not None:
                head.computed = max(0, min(cached(head.seq_id), head.num_tokens - 1))

    def _plan_prefill(self, exclude: set[str]) -> tuple[Feed, ...]:
        room = self.config.prefill_chunk_tokens
        feeds: list[Feed] = []
        for seq in sorted(self._active.values(), key=lambda s: s.arrival):
            if room == 0:
                break
            if seq.seq_id in exclude or seq.to_feed == 0:
                continue
            if seq.computed > 0 and seq.to_feed == 1:
                continue  # a decode, not a prefill (handled by the batched decode next step)
            take = min(seq.to_feed, room)
            end = seq.computed + take
            feeds.append(Feed(seq.seq_id, seq.computed, end, sample=end == seq.num_tokens))
            room -= take
        return tuple(feeds)
