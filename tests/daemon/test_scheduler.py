"""The continuous-batching scheduler as pure logic: admission, budget, starvation, preemption,
cancellation, queue bounds. A small simulated model checks every plan it is given."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from dsnode.config import BatchingSection
from dsnode.inference.scheduler import (
    Feed,
    RequestTooLarge,
    Scheduler,
    SchedulerError,
    StepPlan,
    WaitingQueueFull,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@dataclass
class Model:
    """Stands in for the runner: tracks each sequence's KV length and checks every feed against it."""

    scheduler: Scheduler
    kv: dict[str, int] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)  # seq → tokens generated when it left
    steps: int = 0
    cached: Callable[[str], int] | None = None  # a prompt cache, asked at admission

    def step(self, eos: frozenset[str] = frozenset()) -> StepPlan:
        plan = self.scheduler.schedule(self.cached)
        self.check(plan)
        for seq_id in plan.preempted:
            self.kv.pop(seq_id, None)
        for feed in (*plan.prefill, *plan.decode):
            assert self.kv.get(feed.seq_id, 0) == feed.start, f"{feed} does not continue the cache"
            self.kv[feed.seq_id] = feed.end
        before = {s: self.scheduler.generated(s) for s in self.kv}
        sampled = self.scheduler.update(plan, finished=frozenset(eos))
        for seq_id in sampled:
            if self.scheduler.sequence(seq_id) is None:
                self.finished[seq_id] = before[seq_id] + 1
                self.kv.pop(seq_id)
        self.steps += 1
        return plan

    def check(self, plan: StepPlan) -> None:
        s, config = self.scheduler, self.scheduler.config
        assert plan.held_tokens <= config.max_batch_tokens
        assert s.held_tokens + s.num_active <= config.max_batch_tokens
        assert s.num_active <= config.max_running
        assert sum(f.length for f in plan.prefill) <= config.prefill_chunk_tokens
        assert all(f.length == 1 and f.sample for f in plan.decode)
        ids = [f.seq_id for f in (*plan.prefill, *plan.decode)]
        assert len(ids) == len(set(ids)), "a sequence fed twice in one step"
        active = [s.sequence(i) for i in ids]
        assert all(seq is not None and seq.to_feed >= f.length for seq, f in zip(active, (*plan.prefill, *plan.decode)))
        # first come, first served: everything running arrived before everything waiting
        running = [q.arrival for q in s._active.values()]
        waiting = [q.arrival for q in s._waiting]
        assert waiting == sorted(waiting)
        if running and waiting:
            assert max(running) < min(waiting)

    def drain(self, limit: int = 10_000) -> None:
        while self.scheduler.has_work():
            self.step()
            assert self.steps < limit, "the scheduler stopped making progress"


def scheduler(**kwargs: int) -> Scheduler:
    return Scheduler(BatchingSection(**kwargs))


def ids(feeds: tuple[Feed, ...]) -> list[str]:
    return [f.seq_id for f in feeds]


# --- admission -------------------------------------------------------------------------------------
def test_admits_in_arrival_order_and_prefills_before_decoding():
    s = scheduler()
    for name in "abc":
        s.add(name, prompt_len=4, max_tokens=3)
    plan = s.schedule()
    assert ids(plan.prefill) == ["a", "b", "c"] and plan.decode == ()
    assert all(f.start == 0 and f.end == 4 and f.sample for f in plan.prefill)
    s.update(plan)
    plan = s.schedule()
    assert plan.prefill == () and ids(plan.decode) == ["a", "b", "c"]
    assert [(f.start, f.end) for f in plan.decode] == [(4, 5)] * 3


def test_new_requests_join_between_decode_steps():
    s = scheduler()
    model = Model(s)
    s.add("a", 3, 10)
    model.step()
    model.step()
    s.add("b", 5, 10)
    plan = model.step()
    assert ids(plan.decode) == ["a"] and ids(plan.prefill) == ["b"]
    plan = model.step()
    assert ids(plan.decode) == ["a", "b"]


def test_max_running_caps_the_batch():
    s = scheduler(max_running=2)
    for name in "abc":
        s.add(name, 2, 2)
    plan = s.schedule()
    assert ids(plan.prefill) == ["a", "b"] and s.num_waiting == 1


def test_finished_sequences_leave_and_free_room():
    s = scheduler(max_running=1)
    model = Model(s)
    s.add("a", 2, 5)
    s.add("b", 2, 5)
    model.step()
    model.step(eos=frozenset({"a"}))  # the engine saw EOS (or a stop string) for a
    assert model.finished == {"a": 2}
    plan = model.step()
    assert ids(plan.prefill) == ["b"]


def test_max_tokens_ends_a_sequence_in_the_scheduler():
    s = scheduler()
    model = Model(s)
    s.add("a", 3, 4)
    model.drain()
    assert model.finished == {"a": 4} and s.held_tokens == 0


def test_chunked_prefill_keeps_decoding_others():
    s = scheduler(prefill_chunk_tokens=4)
    model = Model(s)
    s.add("short", 2, 20)
    model.step()
    s.add("long", 10, 2)
    plans = [model.step() for _ in range(3)]
    assert [[(f.start, f.end, f.sample) for f in p.prefill] for p in plans] == [
        [(0, 4, False)], [(4, 8, False)], [(8, 10, True)]
    ]
    assert all(ids(p.decode) == ["short"] for p in plans)  # no stall while the long prompt fills


# --- budget ----------------------------------------------------------------------------------------
def test_admission_waits_for_room_in_the_budget():
    s = scheduler(max_batch_tokens=20)
    model = Model(s)
    s.add("a", 10, 5)
    s.add("b", 8, 5)  # 10 + 8 + one token each = 20: fits exactly
    s.add("c", 1, 1)
    plan = model.step()
    assert ids(plan.prefill) == ["a", "b"] and s.num_waiting == 1


def test_request_larger_than_the_budget_is_refused_at_once():
    s = scheduler(max_batch_tokens=100)
    with pytest.raises(RequestTooLarge, match=r"prompt \(90\) \+ max_tokens \(11\) exceeds max_batch_tokens \(100\)"):
        s.add("a", 90, 11)
    s.add("b", 90, 10)  # exactly the budget is fine
    with pytest.raises(RequestTooLarge):
        s.add("c", 0, 5)
    with pytest.raises(RequestTooLarge):
        s.add("d", 5, 0)


def test_duplicate_ids_are_refused():
    s = scheduler()
    s.add("a", 1, 1)
    with pytest.raises(SchedulerError, match="duplicate"):
        s.add("a", 1, 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=st.integers(8, 64),
    max_running=st.integers(1, 6),
    chunk=st.integers(1, 16),
    data=st.data(),
)
def test_random_workloads_never_exceed_the_budget_and_all_finish(budget, max_running, chunk, data):
    s = scheduler(max_batch_tokens=budget, max_running=max_running, prefill_chunk_tokens=chunk, max_queue=1000)
    model = Model(s)
    wanted: dict[str, int] = {}
    aborted: set[str] = set()
    eos_ended: set[str] = set()
    for step in range(data.draw(st.integers(1, 25), label="steps with arrivals")):
        for i in range(data.draw(st.integers(0, 3), label="arrivals")):
            prompt = data.draw(st.integers(1, budget - 1), label="prompt")
            max_tokens = data.draw(st.integers(1, budget - prompt), label="max_tokens")
            seq_id = f"{step}.{i}"
            s.add(seq_id, prompt, max_tokens)
            wanted[seq_id] = max_tokens
        known = sorted(set(wanted) - set(model.finished) - aborted)
        if known and data.draw(st.integers(0, 9), label="abort?") == 0:
            victim = data.draw(st.sampled_from(known), label="victim")
            if s.abort(victim):
                model.kv.pop(victim, None)  # the engine releases an active sequence's cache
            aborted.add(victim)
        eos = frozenset(x for x in known if x not in aborted and data.draw(st.integers(0, 19), label="eos?") == 0)
        model.step(eos=eos)
        eos_ended |= eos & set(model.finished)
    model.drain()
    assert set(model.finished) | aborted == set(wanted)  # nobody starves, nobody is lost
    for seq_id, generated in model.finished.items():
        assert generated == wanted[seq_id] or seq_id in eos_ended
        assert generated <= wanted[seq_id]
    assert s.held_tokens == 0 and s.num_waiting == 0


# --- starvation ------------------------------------------------------------------------------------
def test_a_long_prompt_is_not_overtaken_by_a_stream_of_short_ones():
    s = scheduler(max_batch_tokens=100)
    model = Model(s)
    for i in range(3):
        s.add(f"short{i}", 10, 20)
    model.step()
    s.add("long", 80, 10)  # cannot fit until the shorts finish
    admitted_after_long: list[str] = []
    for i in range(60):
        s.add(f"late{i}", 2, 2)  # would fit, but arrived after the long prompt
        plan = model.step()
        admitted_after_long += [f.seq_id for f in plan.prefill if f.start == 0]
        if "long" in admitted_after_long:
            break
    assert "long" in admitted_after_long
    assert admitted_after_long[0] == "long"  # no late arrival went first


# --- preemption ------------------------------------------------------------------------------------
def test_growth_over_the_budget_preempts_the_newest_and_recomputes_it_later():
    s = scheduler(max_batch_tokens=24)
    model = Model(s)
    s.add("old", 6, 10)
    s.add("new", 6, 10)
    plans = [model.step() for _ in range(8)]
    preempted = [p.preempted for p in plans if p.preempted]
    assert preempted == [("new",)]  # the most recently admitted goes, once
    generated_before = s.generated("new")
    assert generated_before > 0 and s.sequence("new").computed == 0
    model.drain()
    # recomputed from scratch (prompt + the tokens it had streamed), then finished its max_tokens
    assert model.finished == {"old": 10, "new": 10}


def test_a_preempted_sequence_goes_back_to_the_head_of_the_queue():
    s = scheduler(max_batch_tokens=30, max_running=2)
    model = Model(s)
    s.add("a", 8, 12)
    s.add("b", 8, 12)
    s.add("c", 2, 2)
    while not any(p for p in [model.step().preempted]):
        pass
    assert [q.seq_id for q in s._waiting] == ["b", "c"]


# --- cached prefixes -------------------------------------------------------------------------------
def test_a_cached_prefix_is_not_fed_again_and_the_last_token_always_is():
    s = scheduler(prefill_chunk_tokens=4)
    for name, prompt in (("part", 10), ("whole", 6), ("none", 3)):
        s.add(name, prompt, 2)
    asked: list[str] = []

    def cached(seq_id: str) -> int:
        asked.append(seq_id)
        return {"part": 7, "whole": 6, "none": 0}[seq_id]  # "whole": the prompt's every token is cached

    plan = s.schedule(cached)
    assert asked == ["part", "whole", "none"]  # asked once each, as they are admitted
    assert [(f.seq_id, f.start, f.end, f.sample) for f in plan.prefill] == [
        ("part", 7, 10, True), ("none", 0, 1, False)]  # the chunk's room: 3 + 1
    assert [(f.seq_id, f.start, f.end) for f in plan.decode] == [("whole", 5, 6)]  # one token left: a decode
    assert s.held_tokens == 10 + 6 + 3  # the budget counts cached tokens all the same
    s.update(plan)
    assert s.schedule(cached).prefill[0] == Feed("none", 1, 3, True) and asked == ["part", "whole", "none"]


def test_a_preempted_sequence_is_asked_again_when_it_comes_back():
    s = scheduler(max_batch_tokens=24)
    model = Model(s)
    s.add("old", 6, 10)
    s.add("new", 6, 10)
    kept: dict[str, int] = {}  # what a prompt cache holds of each sequence

    def cached(seq_id: str) -> int:
        model.kv[seq_id] = kept.get(seq_id, 0)  # the runner takes it into the sequence's cache
        return model.kv[seq_id]

    model.cached = cached
    plans, held = [], {}
    while s.has_work():
        held = dict(model.kv)
        plans.append(model.step())
        if plans[-1].preempted:
            kept["new"] = held["new"]  # its cache when it was dropped
    after = plans[next(i for i, p in enumerate(plans) if p.preempted) + 1:]
    again = next(f for p in after for f in (*p.prefill, *p.decode) if f.seq_id == "new")
    assert again.start == kept["new"] > 6  # not from 0: its prompt and its answer but the last token
    assert any(again in p.decode for p in after)  # one token to feed: it decodes with the others
    assert model.finished == {"old": 10, "new": 10}


# --- cancellation ----------------------------------------------------------------------------------
def test_abort_removes_active_and_waiting_sequences():
    s = scheduler(max_running=1)
    s.add("a", 2, 5)
    s.add("b", 2, 5)
    s.update(s.schedule())
    assert s.abort("a") is True  # active: its cache must be released
    assert s.abort("b") is False  # waiting: nothing to release
    assert s.abort("nobody") is False
    assert not s.has_work() and s.held_tokens == 0


def test_a_sequence_aborted_while_its_step_runs_is_dropped_at_update():
    s = scheduler()
    s.add("a", 2, 5)
    s.add("b", 2, 5)
    plan = s.schedule()
    s.abort("a")  # the client went away while the step ran
    assert s.update(plan) == ["b"]
    assert ids(s.schedule().decode) == ["b"]


def test_cancelled_sequence_frees_its_budget_for_the_next():
    s = scheduler(max_batch_tokens=20)
    model = Model(s)
    s.add("a", 15, 4)
    s.add("b", 15, 4)
    model.step()
    assert s.num_waiting == 1
    s.abort("a")
    model.kv.pop("a")
    plan = model.step()
    assert ids(plan.prefill) == ["b"]


# --- queue bound -----------------------------------------------------------------------------------
def test_queue_full_beyond_free_slots_plus_max_queue():
    s = scheduler(max_running=2, max_queue=1)
    s.add("a", 1, 5)
    s.add("b", 1, 5)  # both have a running slot waiting for them at the next step
    s.add("c", 1, 5)  # queued
    with pytest.raises(WaitingQueueFull) as full:
        s.add("d", 1, 5)
    assert (full.value.waiting, full.value.max_queue) == (1, 1)
    s.update(s.schedule())  # a and b run: c waits for a slot, the queue stays full
    with pytest.raises(WaitingQueueFull):
        s.add("d", 1, 5)
    s.abort("c")
    s.add("d", 1, 5)


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="max_batch_tokens"):
        BatchingSection(max_batch_tokens=0)
    with pytest.raises(ValueError, match="max_queue"):
        BatchingSection(max_queue=0)  # a queue of none: every request over max_running refused is no config
