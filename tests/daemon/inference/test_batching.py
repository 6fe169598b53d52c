"""`BatchingEngine` through `FakeEngine`: the real scheduler, sampling, detokenizer and worker thread over a
scripted runner. Ordering comes from the runner's hold gate and recorded calls, never from sleeps; the
timeouts below only turn a hang into a failure."""

from __future__ import annotations

import asyncio
import threading
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable

import pytest
from dsnode.config import BatchingSection
from dsnode.inference.engine import (
    ContextLengthExceeded,
    Delta,
    EngineError,
    EngineNotReady,
    GenerationRequest,
    Health,
    QueueFull,
    SamplingParams,
)
from dsnode.inference.runner import Loaded, RunnerDied

from tests.support.engines import DEFAULT_REPLY, FakeEngine

HANG_GUARD_S = 10.0
PROMPT = (40, 41, 42, 43, 44)
REPLY = "It was the best of times, it was the worst of times."


def request(request_id: str, prompt: tuple[int, ...] = PROMPT, **params: object) -> GenerationRequest:
    sampling = SamplingParams(**{"max_tokens": 64, "temperature": 0.0, **params})  # type: ignore[arg-type]
    return GenerationRequest(request_id, prompt, sampling)


async def collect(stream: AsyncIterator[Delta]) -> tuple[str, list[Delta]]:
    async with asyncio.timeout(HANG_GUARD_S):
        deltas = [delta async for delta in stream]
    return "".join(d.text for d in deltas), deltas


async def first(stream: AsyncIterator[Delta]) -> Delta:
    async with asyncio.timeout(HANG_GUARD_S):
        return await anext(stream)


async def until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(HANG_GUARD_S):
        while not predicate():
            await asyncio.sleep(0.001)


def admit_in_background(engine: FakeEngine, req: GenerationRequest) -> asyncio.Task[tuple[str, list[Delta]]]:
    return asyncio.create_task(collect(engine.generate(req)))


def ids_of(engine: FakeEngine, text: str) -> tuple[int, ...]:
    return tuple(engine.tokenizer.encode(text, add_special_tokens=False))


# --- what a request gets back ---------------------------------------------------------------------
async def test_greedy_output_is_the_script_then_eos_stops(make_engine):
    engine = await make_engine(reply=REPLY)
    text, deltas = await collect(engine.generate(request("r1")))
    eos = min(engine.tokenizer.eos_token_ids)
    assert text == REPLY
    assert [t for d in deltas for t in d.token_ids] == [*ids_of(engine, REPLY), eos]
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].completion_tokens == len(deltas)
    assert engine.runner.prefills("r1")[0].token_ids == PROMPT


async def test_max_tokens_ends_with_length(make_engine):
    engine = await make_engine(reply=REPLY)
    text, deltas = await collect(engine.generate(request("r1", max_tokens=3)))
    assert text == engine.tokenizer.decode(ids_of(engine, REPLY)[:3])
    assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == ("length", 3)


async def test_ignore_eos_generates_past_the_end_of_sequence(make_engine):
    engine = await make_engine(reply="Amen.")
    reply_len = len(ids_of(engine, "Amen."))
    _, deltas = await collect(engine.generate(request("r1", max_tokens=reply_len + 3, ignore_eos=True)))
    assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == ("length", reply_len + 3)


async def test_a_stop_string_cuts_the_text_and_stops(make_engine):
    engine = await make_engine()
    engine.answer(REPLY, eos=False)  # only the stop string can end it with "stop"
    text, deltas = await collect(engine.generate(request("r1", stop=("worst",))))
    assert text == "It was the best of times, it was the "
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].completion_tokens < len(ids_of(engine, REPLY))


async def test_sampling_follows_the_script_too(make_engine):
    engine = await make_engine(reply=REPLY)
    text, _ = await collect(engine.generate(request("r1", temperature=1.5, top_p=0.9, seed=7)))
    assert text == REPLY


# --- admission ------------------------------------------------------------------------------------
async def test_prompt_plus_max_tokens_over_the_context_is_refused_before_the_model_runs(make_engine):
    engine = await make_engine(max_context=64)
    with pytest.raises(ContextLengthExceeded) as refused:
        await first(engine.generate(request("r1", prompt=tuple(range(10, 70)), max_tokens=5)))
    assert (refused.value.prompt_tokens, refused.value.max_tokens, refused.value.limit) == (60, 5, 64)
    assert engine.runner.calls == []


async def test_a_full_queue_is_refused_at_once(make_engine):
    engine = await make_engine(batching=BatchingSection(max_running=1, max_queue=1))
    engine.hold("any")
    running = admit_in_background(engine, request("running"))
    await engine.until_held()
    waiting = admit_in_background(engine, request("waiting"))
    await until(lambda: engine.load_figures().waiting == 1)
    with pytest.raises(QueueFull):
        await first(engine.generate(request("refused")))
    engine.resume()
    assert [(await running)[0], (await waiting)[0]] == [DEFAULT_REPLY, DEFAULT_REPLY]
    assert not any(c.has("refused") for c in engine.runner.calls)


async def test_load_figures_count_waiting_and_running(make_engine):
    engine = await make_engine(batching=BatchingSection(max_running=1))
    engine.hold("decode")
    running = engine.generate(request("a"))
    async with aclosing(running):
        await first(running)
        await engine.until_held()
        others = [admit_in_background(engine, request(r)) for r in ("b", "c")]
        await until(lambda: engine.load_figures().waiting == 2)
        figures = engine.load_figures()
        assert (figures.waiting, figures.running) == (2, 1)
        assert figures.batch_tokens == len(PROMPT) + 1  # the prompt and the first token
        engine.resume()
        await collect(running)
    await asyncio.gather(*others)
    figures = engine.load_figures()
    assert (figures.waiting, figures.running, figures.batch_tokens) == (0, 0, 0)


# --- the running batch ----------------------------------------------------------------------------
async def test_a_request_joins_the_batch_while_others_decode_and_max_running_holds(make_engine):
    engine = await make_engine(batching=BatchingSection(max_running=2))
    replies = {"short": "Amen.", "long": REPLY, "late": "Call me Ishmael.", "last": "Marley was dead."}
    engine.answer(lambda r: replies[r.request_id])
    engine.hold("any")
    tasks = {"short": admit_in_background(engine, request("short"))}
    await engine.until_held()
    for rid in ("long", "late", "last"):
        tasks[rid] = admit_in_background(engine, request(rid))
    await until(lambda: engine.load_figures().waiting == 3)
    engine.resume()
    texts = {rid: (await task)[0] for rid, task in tasks.items()}

    assert texts == replies
    runner = engine.runner
    assert max(len(c.seq_ids) for c in runner.decodes()) == 2
    assert runner.peak_sequences == 2
    # "late" was admitted when "short" finished, while "long" was still decoding: it decoded beside it
    assert any(c.has("late") and c.has("long") for c in runner.decodes())
    assert runner.index_of(runner.prefills("late")[0]) > runner.index_of(runner.decodes("long")[0])


async def test_the_token_budget_holds_and_preempted_requests_still_get_their_script(make_engine):
    batching = BatchingSection(max_batch_tokens=48, max_running=8, prefill_chunk_tokens=8)
    engine = await make_engine(batching=batching)
    engine.answer(REPLY, eos=False)
    prompts = {f"r{i}": tuple(range(100 + i, 110 + i)) for i in range(5)}
    engine.hold("any")
    tasks = {"r0": admit_in_background(engine, request("r0", prompts["r0"], max_tokens=10))}
    await engine.until_held()
    for rid in ("r1", "r2", "r3", "r4"):
        tasks[rid] = admit_in_background(engine, request(rid, prompts[rid], max_tokens=10))
    await until(lambda: engine.load_figures().waiting == 4)
    engine.resume()
    texts = {rid: (await task)[0] for rid, task in tasks.items()}

    expected = engine.tokenizer.decode(ids_of(engine, REPLY)[:10])
    assert set(texts.values()) == {expected}
    runner = engine.runner
    assert runner.peak_kv_tokens <= 48
    assert runner.peak_sequences < 5  # the budget, not max_running, bounded the batch
    recomputed = [rid for rid in prompts if sum(c.start == 0 for c in runner.prefills(rid)) > 1]
    assert recomputed, "no request was preempted: the budget did not bind"


async def test_an_abort_frees_its_slot_and_releases_its_cache(make_engine):
    engine = await make_engine(batching=BatchingSection(max_running=1), max_context=4096)
    engine.answer(REPLY, eos=False)
    engine.hold("decode")
    leaving = engine.generate(request("leaving", max_tokens=1000))
    await first(leaving)
    await engine.until_held()
    waiting = admit_in_background(engine, request("waiting", max_tokens=3))
    await until(lambda: engine.load_figures().waiting == 1)
    await leaving.aclose()
    engine.resume()
    text, _ = await waiting

    runner = engine.runner
    assert engine.aborted == ["leaving"]
    assert text == engine.tokenizer.decode(ids_of(engine, REPLY)[:3])
    assert len(runner.decodes("leaving")) == 1  # the step it was parked in; none after the abort
    release = next(c for c in runner.calls if c.kind == "release" and c.has("leaving"))
    assert runner.index_of(release) < runner.index_of(runner.prefills("waiting")[0])
    # a finished sequence is released just after its last delta is sent
    await until(lambda: runner.cached() == set())


# --- failures -------------------------------------------------------------------------------------
async def test_a_failing_prefill_fails_only_its_own_request(make_engine):
    engine = await make_engine(reply=REPLY)
    engine.hold("decode")
    beside = engine.generate(request("beside"))
    async with aclosing(beside):
        first_delta = await first(beside)
        await engine.until_held()
        engine.fail_next_prefill("the prompt broke the model", request_id="broken")
        broken = admit_in_background(engine, request("broken"))
        await until(lambda: engine.load_figures().waiting == 1)
        engine.resume()
        with pytest.raises(EngineError, match="the prompt broke the model"):
            await broken
        rest, deltas = await collect(beside)
    assert first_delta.text + rest == REPLY and deltas[-1].finish_reason == "stop"
    assert engine.runner.released("broken")
    assert engine.health().ready


async def test_a_failing_decode_fails_that_steps_requests_and_the_engine_goes_on(make_engine):
    engine = await make_engine(reply=REPLY)
    engine.hold("any")
    a = admit_in_background(engine, request("a"))
    await engine.until_held()
    b = admit_in_background(engine, request("b"))
    await until(lambda: engine.load_figures().waiting == 1)
    engine.runner.fail_decode(RuntimeError("a bad batch"))
    engine.resume()
    for task in (a, b):
        with pytest.raises(EngineError, match="a bad batch"):
            await task
    assert engine.health().ready
    assert engine.runner.cached() == set()
    text, _ = await collect(engine.generate(request("c")))
    assert text == REPLY


async def test_a_dead_runner_fails_every_request_and_marks_the_engine_failed(make_engine):
    engine = await make_engine(batching=BatchingSection(max_running=1))
    engine.hold("decode")
    running = engine.generate(request("running"))
    async with aclosing(running):
        await first(running)
        await engine.until_held()
        waiting = admit_in_background(engine, request("waiting"))
        await until(lambda: engine.load_figures().waiting == 1)
        engine.runner.die("rank 1 exited")  # the parked decode raises RunnerDied in the worker
        with pytest.raises(EngineNotReady, match="engine died: rank 1 exited"):
            await collect(running)
    with pytest.raises(EngineNotReady, match="engine died: rank 1 exited"):
        await waiting
    async with asyncio.timeout(HANG_GUARD_S):
        await engine.failed.wait()
    assert engine.health().reason == "engine died: rank 1 exited" and not engine.health().ready
    with pytest.raises(EngineNotReady):
        await first(engine.generate(request("after")))


async def test_die_from_outside_the_worker_fails_requests_and_sets_failed(make_engine):
    engine = await make_engine()
    engine.hold("decode")
    running = engine.generate(request("running"))
    async with aclosing(running):
        await first(running)
        await engine.until_held()
        engine.die("the device was lost")
        assert engine.health() == Health(False, "engine died: the device was lost")
        with pytest.raises(EngineNotReady, match="the device was lost"):
            await collect(running)
    async with asyncio.timeout(HANG_GUARD_S):
        await engine.failed.wait()


async def test_a_runner_died_error_from_a_prefill_also_kills_the_engine(make_engine):
    engine = await make_engine()
    engine.runner.fail_prefill(RunnerDied("NCCL timeout"))
    with pytest.raises(EngineNotReady, match="engine died: NCCL timeout"):
        await collect(engine.generate(request("r1")))
    async with asyncio.timeout(HANG_GUARD_S):
        await engine.failed.wait()


# --- shutdown and loading -------------------------------------------------------------------------
async def test_close_fails_running_and_waiting_requests_and_does_not_hang(fast_tokenizer):
    engine = FakeEngine(fast_tokenizer, batching=BatchingSection(max_running=1))
    await engine.load()
    engine.hold("decode")
    running = engine.generate(request("running"))
    async with aclosing(running):
        await first(running)
        await engine.until_held()
        waiting = admit_in_background(engine, request("waiting"))
        await until(lambda: engine.load_figures().waiting == 1)
        async with asyncio.timeout(HANG_GUARD_S):
            await engine.close()
        with pytest.raises(EngineNotReady, match="the node is shutting down"):
            await collect(running)
    with pytest.raises(EngineNotReady, match="the node is shutting down"):
        await waiting
    assert engine.health().reason == "engine is shutting down"
    assert engine.runner.closed
    assert not engine.failed.is_set()


async def test_loading_waits_for_its_gate(fast_tokenizer):
    gate = asyncio.Event()
    engine = FakeEngine(fast_tokenizer, load_gate=gate)
    loading = asyncio.create_task(engine.load())
    assert engine.health().reason == "model is loading"
    with pytest.raises(EngineNotReady, match="model is loading"):
        await first(engine.generate(request("early")))
    gate.set()
    async with asyncio.timeout(HANG_GUARD_S):
        await loading
    assert engine.health().ready and engine.info.backend == "fake"
    await engine.close()


async def test_a_failed_load_reports_why(fast_tokenizer):
    engine = FakeEngine(fast_tokenizer, load_error="weights are corrupt")
    with pytest.raises(RuntimeError, match="weights are corrupt"):
        await engine.load()
    assert engine.health().reason == "model failed to load: weights are corrupt"
    assert not engine.failed.is_set()
    await engine.close()


# --- a load nobody waits for any more ---------------------------------------------------------------
class _SlowLoad(FakeEngine):
    """Loading blocks in its thread until the test lets it finish, as a real checkpoint load does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started = threading.Event()
        self.finish = threading.Event()

    def _load_blocking(self) -> Loaded:
        self.started.set()
        assert self.finish.wait(HANG_GUARD_S)
        return super()._load_blocking()


async def _until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(HANG_GUARD_S):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_a_cancelled_load_closes_the_runner_it_built(fast_tokenizer):
    engine = _SlowLoad(fast_tokenizer)
    loading = asyncio.create_task(engine.load())
    await asyncio.to_thread(engine.started.wait, HANG_GUARD_S)
    loading.cancel()  # a stop while loading: the server cancels load(); the thread goes on
    with pytest.raises(asyncio.CancelledError):
        await loading
    engine.finish.set()
    await _until(lambda: engine.runner.closed)
    assert not engine.health().ready


async def test_a_load_that_finishes_after_close_closes_its_runner(fast_tokenizer):
    engine = _SlowLoad(fast_tokenizer)
    loading = asyncio.create_task(engine.load())
    await asyncio.to_thread(engine.started.wait, HANG_GUARD_S)
    await engine.close()
    engine.finish.set()
    with pytest.raises(EngineNotReady):
        await loading
    assert engine.runner.closed


# --- a runner with a prompt cache --------------------------------------------------------------------
async def test_a_prefix_the_runner_holds_is_not_fed_and_the_first_delta_says_how_much(make_engine):
    engine = await make_engine(reply=REPLY)
    asked = []

    def reuse_prefix(seq_id, tokens, scope):  # as SlotRunner's: the cache now holds the first 3 tokens
        asked.append((seq_id, tuple(tokens), scope))
        engine.runner._kv[seq_id] = list(tokens[:3])
        return 3

    engine.runner.reuse_prefix = reuse_prefix
    text, deltas = await collect(engine.generate(GenerationRequest("r1", PROMPT, SamplingParams(max_tokens=64),
                                                                   cache_scope="alice")))
    assert text == REPLY and asked == [(asked[0][0], PROMPT, "alice")]
    assert [(c.start, c.token_ids) for c in engine.runner.prefills("r1")] == [(3, PROMPT[3:])]
    assert deltas[0].cached_tokens == 3 and all(d.cached_tokens == 0 for d in deltas[1:])
    _, scored = await collect(engine.generate(request("r2", prompt_logprobs=1)))
    assert len(asked) == 1 and scored[0].cached_tokens == 0  # a scored prompt is fed whole
    assert engine.runner.prefills("r2")[0].start == 0


async def test_a_prompt_cache_that_fails_costs_only_the_reuse(make_engine):
    engine = await make_engine(reply=REPLY)

    def reuse_prefix(seq_id, tokens, scope):
        raise RuntimeError("copy failed")

    engine.runner.reuse_prefix = reuse_prefix
    text, deltas = await collect(engine.generate(request("r1")))
    assert text == REPLY and deltas[0].cached_tokens == 0
    assert engine.runner.prefills("r1")[0].start == 0
    await until(lambda: len(engine.runner.released("r1")) >= 2)  # the worker releases after the last delta
    assert len(engine.runner.released("r1")) == 2  # what the failed reuse took, then the finished sequence
    assert engine.health().ready
