"""`BatchingEngine`: the engine contract on top of the pure scheduler and a backend's model runner.

One worker thread owns the model runner: it asks the scheduler for a step, runs it (prefill chunks one
sequence at a time, decodes batched), samples, detokenizes, and hands each request its deltas on the
event loop with `call_soon_threadsafe`. The event loop never waits on the model. The scheduler is
shared with the loop under a lock only for quick bookkeeping (admission, aborts), never for compute.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import threading
import time
from typing import AsyncIterator, Iterable

import numpy as np
import structlog

from ..config import BatchingSection
from .detokenizer import Detokenizer
from .engine import (
    ConstraintFailed,
    ContextLengthExceeded,
    Delta,
    Engine,
    EngineError,
    EngineLoad,
    EngineNotReady,
    FinishReason,
    GenerationRequest,
    Health,
    ModelInfo,
    QueueFull,
    SamplingParams,
    TokenLogprob,
)
from .grammar import GrammarError, GuideError, start_guide
from .prompt_scoring import first_scores, prefill_scoring
from .runner import Loaded, ModelRunner, RunnerDied
from .sampling import TokenCounts, hold_end, new_generator, process_logits, sample_token, token_logprob
from .scheduler import RequestTooLarge, Scheduler, StepPlan, WaitingQueueFull
from .sequences import LiveSequence, Sampled, Throughput, send_all
from .tokenizer import TextTokenizer

log = structlog.get_logger("dsnode.inference.engine")

class BatchingEngine(Engine):
    """Subclasses implement `_load_blocking()` (runs in a thread) and return the runner and facts."""

    def __init__(self, batching: BatchingSection) -> None:
        super().__init__()
        self._batching = batching
        self._scheduler = Scheduler(batching)
        self._cond = threading.Condition()
        self._live: dict[str, LiveSequence] = {}
        self._to_release: list[str] = []
        self._ids = itertools.count()
        self._loaded: Loaded | None = None
        self._built: Loaded | None = None  # loaded in the thread, not handed over to load() yet
        self._abandoned = False  # load() was cancelled
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failure: str | None = None
        self._dead = False
        self._throughput = Throughput()
        self._loop: asyncio.AbstractEventLoop | None = None

    @abc.abstractmethod
    def _load_blocking(self) -> Loaded: ...

    # --- contract -----------------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        return self._require_loaded().info

    @property
    def tokenizer(self) -> TextTokenizer:
        return self._require_loaded().tokenizer

    async def load(self) -> None:
        """Load in a thread. A load that is cancelled (a stop while loading), or that finishes after
        `close()`, closes what it built: nobody will use it, and a runner may hold processes or GPU
        memory."""
        self._loop = asyncio.get_running_loop()
        try:
            loaded = await asyncio.to_thread(self._load_unless_abandoned)
        except asyncio.CancelledError:
            self._abandon_load()
            raise
        except EngineNotReady:
            raise
        except Exception as exc:
            self._failure = f"model failed to load: {exc}"
            raise
        with self._cond:
            self._built = None
            if not self._stopping:
                self._loaded = loaded
        if self._loaded is None:  # close() came while the load finished
            await asyncio.to_thread(loaded.runner.close)
            raise EngineNotReady("engine is shutting down")
        self._thread = threading.Thread(target=self._work, name="dsnode-engine", daemon=True)
        self._thread.start()

    def _load_unless_abandoned(self) -> Loaded:
        loaded = self._load_blocking()
        with self._cond:
            if not (self._stopping or self._abandoned):
                self._built = loaded  # handed over by load(), or closed by _abandon_load
                return loaded
        loaded.runner.close()
        raise EngineNotReady("engine is shutting down")

    def _abandon_load(self) -> None:
        """load() was cancelled: the loader thread carries on; whatever it built is closed, by the
        thread itself if it is not done yet, else here (in a thread of its own: closing may be slow)."""
        with self._cond:
            self._abandoned = True
            built, self._built = self._built, None
        if built is not None:
            threading.Thread(target=built.runner.close, name="dsnode-abandoned-load", daemon=True).start()

    def health(self) -> Health:
        if self._failure:
            return Health(False, self._failure)
        if self._loaded is None:
            return Health(False, "model is loading")
        if self._stopping:
            return Health(False, "engine is shutting down")
        return Health(True)

    @property
    def shares_prompts(self) -> bool:
        runner = self._loaded.runner if self._loaded else None
        prompts = getattr(runner, "prompts", None)
        return hasattr(runner, "keep_prefix") and prompts is not None and prompts.capacity > 0

    def load_figures(self) -> EngineLoad:
        with self._cond:
            waiting, running = self._scheduler.num_waiting, self._scheduler.num_active
            held = self._scheduler.held_tokens
        prompts = getattr(self._loaded.runner, "prompts", None) if self._loaded else None  # a PromptCache
        return EngineLoad(
            waiting, running, held, self._batching.max_batch_tokens, self._throughput.per_second(), self._batching.max_queue,
            prompts.nbytes if prompts is not None else 0,
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        live = self._admit(request)
        finished = False
        try:
            while True:
                item = await live.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._abort(live.seq_id)

    async def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._fail_all(EngineNotReady("the node is shutting down"))
        if self._loaded is not None:
            await asyncio.to_thread(self._loaded.runner.close)

    # --- intake (event loop) ------------------------------------------------------------------
    def _require_loaded(self) -> Loaded:
        if self._loaded is None:
            raise EngineNotReady("model is loading")
        return self._loaded

    def _admit(self, request: GenerationRequest) -> LiveSequence:
        health = self.health()
        if not health.ready:
            raise EngineNotReady(health.reason)
        loaded = self._require_loaded()
        prompt_len, max_tokens = len(request.prompt_ids), request.params.max_tokens
        if prompt_len + max_tokens > loaded.info.max_context or prompt_len == 0:
            raise ContextLengthExceeded(prompt_len, max_tokens, loaded.info.max_context)
        seq_id = f"{request.request_id}#{next(self._ids)}"
        live = LiveSequence(
            seq_id,
            request,
            asyncio.get_running_loop(),
            asyncio.Queue(),
            Detokenizer(loaded.tokenizer, request.params.stop),
            new_generator(request.params),
            end_ids=_end_ids(loaded.tokenizer, request.params),
            tokens=list(request.prompt_ids),
            prompt_scores=None if request.params.prompt_logprobs is None else first_scores(request.prompt_ids),
        )
        with self._cond:
            try:
                self._scheduler.add(seq_id, prompt_len, max_tokens)
            except WaitingQueueFull as exc:
                raise QueueFull(exc.waiting, exc.max_queue) from None
            except RequestTooLarge:
                raise ContextLengthExceeded(prompt_len, max_tokens, loaded.info.max_context) from None
            self._live[seq_id] = live
            self._cond.notify()
        return live

    def _abort(self, seq_id: str) -> None:
        with self._cond:
            self._live.pop(seq_id, None)
            if self._scheduler.abort(seq_id):
                self._to_release.append(seq_id)
            self._cond.notify()

    # --- worker thread ------------------------------------------------------------------------
    def _work(self) -> None:
        runner = self._require_loaded().runner
        while True:
            with self._cond:
                while not self._stopping and not self._failure and not self._scheduler.has_work() \
                        and not self._to_release:
                    self._cond.wait()
                if self._stopping or self._failure:
                    return
                ended, self._to_release = self._to_release, []
            try:  # before scheduling: a prompt cache then holds what they computed for those it admits
                for seq_id in ended:
                    runner.release(seq_id)
            except RunnerDied as exc:
                self._die(str(exc))
                return
            except Exception:
                log.exception("engine_release_failed", seq_ids=ended)
            with self._cond:
                plan = self._scheduler.schedule(lambda seq_id: self._reused_prefix(runner, seq_id))
            try:
                for seq_id in plan.preempted:
                    runner.release(seq_id)
                if plan.empty:
                    continue
                sampled, failed = self._execute(runner, plan)
            except RunnerDied as exc:
                self._die(str(exc))
                return
            except Exception as exc:  # a failed batched decode fails the step's requests, not the node
                log.exception("engine_step_failed", error=str(exc))
                self._fail_sequences(runner, _step_ids(plan), _model_failed(exc))
                continue
            for seq_id, exc in failed.items():  # a failed prefill is its own request's alone
                self._fail_sequences(runner, (seq_id,), _model_failed(exc))
            self._finish_step(runner, plan, sampled)

    def _reused_prefix(self, runner: ModelRunner, seq_id: str) -> int:
        """A sequence is being admitted: how many of its first tokens the runner's prompt cache gives it
        (runners that have one; not for a prompt being scored, whose every position is needed)."""
        live = self._live.get(seq_id)
        reuse = getattr(runner, "reuse_prefix", None)
        if live is None or reuse is None or live.prompt_scores is not None:
            return 0
        try:
            cached = int(reuse(seq_id, live.tokens, live.request.cache_scope))
        except Exception:  # the cache is an optimisation: the prompt is computed as without one
            log.exception("engine_prompt_cache_failed", seq_id=seq_id)
            with contextlib.suppress(Exception):
                runner.release(seq_id)  # whatever it took for the sequence: the prefill starts afresh
            return 0
        if live.completion_tokens == 0:
            live.cached_tokens = cached
        return cached

    def _execute(self, runner: ModelRunner,
                 plan: StepPlan) -> tuple[dict[str, Sampled], dict[str, Exception]]:
        """Run one step: the sampled token of each sequence that got one, and the prefills that
        raised. Prefills run one sequence at a time, so one that raises (a prompt the model cannot
        take) fails only its own request; the batched decode raises for the whole step."""
        sampled: dict[str, Sampled] = {}
        failed: dict[str, Exception] = {}
        for feed in plan.prefill:
            live = self._live.get(feed.seq_id)
            if live is None:
                continue
            if live.scheduled_at is None:
                live.scheduled_at = time.monotonic()
            try:
                logits = self._prefill(runner, live, feed.start, feed.end)
            except RunnerDied:
                raise
            except Exception as exc:
                log.exception("engine_prefill_failed", seq_id=feed.seq_id, error=str(exc))
                failed[feed.seq_id] = exc
                continue
            if feed.sample:
                if live.request.share_prompt and live.completion_tokens == 0:
                    self._keep_prompt(runner, live)
                self._sample(live, logits, sampled, failed)
        decoding = [(f.seq_id, self._live.get(f.seq_id)) for f in plan.decode]
        decoding = [(seq_id, live) for seq_id, live in decoding if live is not None]
        if decoding:
            logits = runner.decode([s for s, _ in decoding], [live.tokens[-1] for _, live in decoding])
            for row, (seq_id, live) in enumerate(decoding):
                self._sample(live, logits[row], sampled, failed)
        return sampled, failed

    @staticmethod
    def _keep_prompt(runner: ModelRunner, live: LiveSequence) -> None:
        """The prompt is prefilled: into the prompt cache now, before its first token goes out (the
        request's other choices are admitted after it, and take it from there)."""
        keep = getattr(runner, "keep_prefix", None)
        if keep is None:
            return
        try:
            keep(live.seq_id)
        except RunnerDied:
            raise
        except Exception:  # an optimisation: the other choices compute the prompt themselves
            log.exception("engine_prompt_keep_failed", seq_id=live.seq_id)

    @staticmethod
    def _prefill(runner: ModelRunner, live: LiveSequence, start: int, end: int) -> np.ndarray:
        scores, top = live.prompt_scores, live.request.params.prompt_logprobs
        if scores is None or top is None:
            return runner.prefill(live.seq_id, live.tokens[start:end], start)
        return prefill_scoring(runner, live.seq_id, live.tokens, start, end, scores, top)

    def _sample(self, live: LiveSequence, logits: np.ndarray, sampled: dict[str, Sampled],
                failed: dict[str, Exception]) -> None:
        """One token for `live` from its logits (V,): the request's processors, then its constraint's
        mask if it has one. A constraint that fails is its own request's failure."""
        params, raw = live.request.params, logits
        try:
            if params.processes_logits:
                if live.counts is None:
                    live.counts = TokenCounts(logits.shape[0], live.request.prompt_ids)
                logits = process_logits(logits, params, live.counts)
            if live.completion_tokens < params.min_tokens:
                logits = hold_end(logits, live.end_ids)
            if live.request.constraint is not None:
                if live.guide is None:
                    live.guide = start_guide(self._require_loaded().tokenizer, live.request.constraint,
                                             params.max_tokens)
                logits = live.guide.mask(logits, params.max_tokens - live.completion_tokens)
        except (GrammarError, GuideError) as exc:
            log.warning("engine_constraint_failed", seq_id=live.seq_id, error=str(exc))
            failed[live.seq_id] = _constraint_failed(live, exc)
            return
        token = sample_token(logits, params, live.rng)
        logprob = None if params.logprobs is None else token_logprob(raw, token, params.logprobs)
        sampled[live.seq_id] = Sampled(token, logprob)

    def _finish_step(self, runner: ModelRunner, plan: StepPlan, sampled: dict[str, Sampled]) -> None:
        outgoing: list[tuple[LiveSequence, Delta]] = []
        ended: set[str] = set()
        broken: dict[str, Exception] = {}
        for seq_id, (token, logprob) in sampled.items():
            live = self._live.get(seq_id)
            if live is None:
                continue
            try:
                delta = self._advance(live, token, logprob)
            except GuideError as exc:  # the mask should make this impossible: fail the request, not the node
                log.error("engine_constraint_broken", seq_id=seq_id, error=str(exc))
                broken[seq_id] = _constraint_failed(live, exc)
                continue
            outgoing.append((live, delta))
            if delta.finish_reason is not None:
                ended.add(seq_id)
        with self._cond:
            self._scheduler.update(plan, finished=ended)
            for seq_id in ended:
                self._live.pop(seq_id, None)
            # released at the top of the next iteration, where a dead runner is handled
            self._to_release.extend(ended)
        self._throughput.count(len(sampled))
        send_all(outgoing)
        for seq_id, exc in broken.items():
            self._fail_sequences(runner, (seq_id,), _model_failed(exc))

    def _advance(self, live: LiveSequence, token: int, logprob: TokenLogprob | None = None) -> Delta:
        params = live.request.params
        live.tokens.append(token)
        live.completion_tokens += 1
        if live.counts is not None:
            live.counts.add(token)
        reason: FinishReason | None = None
        if token in live.end_ids:
            text, reason = live.detok.flush(), "stop"
        else:
            if live.guide is not None:
                live.guide.accept(token)
            text = live.detok.push(token)
            if live.detok.stopped or (live.guide is not None and live.guide.finished):
                text, reason = text + live.detok.flush(), "stop"
            elif live.completion_tokens >= params.max_tokens:
                text, reason = text + live.detok.flush(), "length"
        queued_s: float | None = None
        scored: tuple[TokenLogprob, ...] = ()
        if live.completion_tokens == 1:
            if live.scheduled_at is not None:
                queued_s = live.scheduled_at - live.queued_at
            scored, live.prompt_scores = tuple(e for e in live.prompt_scores or () if e is not None), None
        return Delta(text, (token,), len(live.request.prompt_ids), live.completion_tokens, reason, queued_s,
                     () if logprob is None else (logprob,), scored,
                     live.cached_tokens if live.completion_tokens == 1 else 0)

    def _fail_sequences(self, runner: ModelRunner, ids: Iterable[str], error: EngineError) -> None:
        """End these sequences with `error`: out of the scheduler, their KV cache released."""
        ending = set(ids)
        with self._cond:
            victims = [self._live.pop(s) for s in ending if s in self._live]
            for seq_id in ending:
                self._scheduler.abort(seq_id)
        for seq_id in ending:
            try:
                runner.release(seq_id)
            except Exception:  # the runner's state is suspect; drop what we can
                log.exception("engine_release_failed", seq_id=seq_id)
        for live in victims:
            live.send(error)

    def _die(self, reason: str) -> None:
        """The runner cannot continue: not ready for good, fail every request, set `failed`.
        Thread-safe and idempotent (the worker thread and a backend's process monitor may both
        report the same death); the first reason is kept."""
        with self._cond:
            if self._dead:
                return
            self._dead = True
            self._failure = f"engine died: {reason}"
            self._cond.notify_all()
        log.error("engine_died", reason=reason)
        self._fail_all(EngineNotReady(self._failure))
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self.failed.set)
            except RuntimeError:  # the loop is already closed: nobody is left to tell
                pass

    def _fail_all(self, error: EngineError) -> None:
        with self._cond:
            victims = list(self._live.values())
            self._live.clear()
            for live in victims:
                self._scheduler.abort(live.seq_id)
        for live in victims:
            live.send(error)

def _end_ids(tokenizer: TextTokenizer, params: SamplingParams) -> frozenset[int]:
    """The tokens that end an answer: end-of-sequence (unless `ignore_eos`) and `stop_token_ids`."""
    eos = frozenset() if params.ignore_eos else tokenizer.eos_token_ids
    return eos | params.stop_token_ids


def _step_ids(plan: StepPlan) -> set[str]:
    return {f.seq_id for f in (*plan.prefill, *plan.decode)}


def _model_failed(exc: Exception) -> EngineError:
    if isinstance(exc, ConstraintFailed):
        return exc
    return EngineError(f"the model failed on this request: {exc}")


def _constraint_failed(live: LiveSequence, exc: Exception) -> ConstraintFailed:
    param = live.request.constraint.param if live.request.constraint is not None else "response_format"
    return ConstraintFailed(f"the request's grammar ({param}) failed: {exc}", param)


def context_limit(model_limit: int, configured: int | None, batching: BatchingSection) -> int:
    """The context a node advertises: the model's, lowered by the config and by the batch budget."""
    limits = [model_limit, batching.max_batch_tokens]
    if configured:
        limits.append(configured)
    return min(limits)
