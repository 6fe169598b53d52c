"""The fast tier's engine: the real `BatchingEngine` over a scriptable model runner (numpy, no torch).

`FakeRunner` stands where a backend's `ModelRunner` does. Its "KV cache" is each sequence's token list;
it checks that the engine feeds positions in order, and returns logits whose argmax is the token a
script asks for, so greedy and sampled decoding both follow the script. It records every call and can
be told to park the worker at its next step, to raise on a prefill or a decode, or to die.

`FakeEngine` is `BatchingEngine` over a `FakeRunner`: the real scheduler, sampling, detokenizer, stop
strings, token budget, queue bound and abort paths run. A test says what to answer (`answer`), holds
generation after the first token (`hold` / `resume`), fails the next prefill (`fail_next_prefill`),
kills the runner (`die`) and gates loading (`load_gate`, `load_error`). No model folder, no config file.

The runner finds a sequence's request by its id: `BatchingEngine` names a sequence `<request_id>#<n>`,
and `FakeEngine.generate` registers each request with the runner before the engine admits it. Request
ids must therefore be unique among the requests in flight (the API's are).
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Literal, Sequence

import numpy as np
from dsnode.config import BatchingSection
from dsnode.inference.batching import BatchingEngine, context_limit
from dsnode.inference.engine import Delta, GenerationRequest, ModelInfo
from dsnode.inference.runner import Loaded, RunnerDied
from dsnode.inference.tokenizer import TextTokenizer

Script = Callable[[GenerationRequest, tuple[int, ...]], int]
"""(the request, the tokens it generated so far) → the id of its next token."""

HoldAt = Literal["decode", "any"]

DEFAULT_REPLY = "Hello from the fake model."
# The scripted token's logit stands this far above all others (0), so even sampling at a high
# temperature picks it: exp(-100) is nothing next to 1.
LOGIT_MARGIN = 100.0


def reply_script(token_ids: Sequence[int], end: int | None) -> Script:
    """Generate `token_ids` in order, then `end` (an end-of-sequence id) for ever; with `end` None the
    reply starts over, so only max_tokens ends it."""
    ids = tuple(token_ids)
    if not ids and end is None:
        raise ValueError("an empty reply needs an end token")

    def next_token(_request: GenerationRequest, generated: tuple[int, ...]) -> int:
        n = len(generated)
        if n < len(ids):
            return ids[n]
        return end if end is not None else ids[n % len(ids)]

    return next_token


def request_id_of(seq_id: str) -> str:
    return seq_id.rpartition("#")[0]


@dataclass(frozen=True)
class RunnerCall:
    kind: Literal["prefill", "decode", "release"]
    seq_ids: tuple[str, ...]
    token_ids: tuple[int, ...] = ()
    start: int = 0  # prefill: the position of token_ids[0]

    def has(self, request_id: str) -> bool:
        return any(request_id_of(s) == request_id for s in self.seq_ids)


@dataclass
class _Fault:
    kind: Literal["prefill", "decode"]
    error: BaseException
    request_id: str | None
    times: int


class FakeRunner:
    """A `ModelRunner` that follows a script. Steered from the event loop, run by the engine's worker."""

    def __init__(self, vocab_size: int, script: Script, *, step_delay_s: float = 0.0) -> None:
        self.vocab_size = vocab_size
        self.script = script  # read at every step: replace it to change the answer mid-test
        self.step_delay_s = step_delay_s
        self.calls: list[RunnerCall] = []
        self.closed = False
        self.peak_kv_tokens = 0  # most tokens all sequences' caches held at once
        self.peak_sequences = 0  # most sequences holding a cache at once
        self.parked = threading.Event()  # set while (and after) a step waited at the hold gate
        self._requests: dict[str, GenerationRequest] = {}
        self._kv: dict[str, list[int]] = {}
        self._faults: list[_Fault] = []
        self._death: str | None = None
        self._lock = threading.Lock()
        self._gate = threading.Event()
        self._gate.set()
        self._hold_at: HoldAt = "decode"

    # --- steering (event loop) ----------------------------------------------------------------
    def expect(self, request: GenerationRequest) -> None:
        """Tell the runner the prompt of a request the engine is about to admit."""
        self._requests[request.request_id] = request

    def hold(self, at: HoldAt = "decode") -> None:
        """Park the next decode (at="any": the next prefill or decode) until `resume()`."""
        self._hold_at = at
        self.parked.clear()
        self._gate.clear()

    def resume(self) -> None:
        self._gate.set()

    def fail_prefill(self, error: BaseException | None = None, *, request_id: str | None = None,
                     times: int = 1) -> None:
        """The next `times` prefills (of `request_id`'s sequence, if given) raise `error`."""
        error = error or RuntimeError("FakeRunner: scripted prefill failure")
        with self._lock:
            self._faults.append(_Fault("prefill", error, request_id, times))

    def fail_decode(self, error: BaseException | None = None, *, times: int = 1) -> None:
        """The next `times` batched decodes raise `error`."""
        error = error or RuntimeError("FakeRunner: scripted decode failure")
        with self._lock:
            self._faults.append(_Fault("decode", error, None, times))

    def die(self, reason: str) -> None:
        """The runner is gone: a parked step and every later prefill or decode raise RunnerDied."""
        self._death = reason
        self.resume()

    # --- what happened ------------------------------------------------------------------------
    def prefills(self, request_id: str | None = None) -> list[RunnerCall]:
        return self._calls("prefill", request_id)

    def decodes(self, request_id: str | None = None) -> list[RunnerCall]:
        return self._calls("decode", request_id)

    def released(self, request_id: str | None = None) -> list[str]:
        return [c.seq_ids[0] for c in self._calls("release", request_id)]

    def index_of(self, call: RunnerCall) -> int:
        """Where `call` stands among all calls: compare two to say which came first."""
        with self._lock:
            return next(i for i, c in enumerate(self.calls) if c is call)

    def cached(self) -> set[str]:
        """Sequences whose cache the runner holds now (not released)."""
        with self._lock:
            return set(self._kv)

    def _calls(self, kind: str, request_id: str | None) -> list[RunnerCall]:
        with self._lock:
            return [c for c in self.calls if c.kind == kind and (request_id is None or c.has(request_id))]

    # --- ModelRunner (worker thread) ----------------------------------------------------------
    def prefill(self, seq_id: str, token_ids: Sequence[int], start: int) -> np.ndarray:
        self._record(RunnerCall("prefill", (seq_id,), tuple(token_ids), start))
        self._step("prefill", (seq_id,))
        with self._lock:
            cache = self._kv.setdefault(seq_id, [])
            if start != len(cache):  # the engine skipped or repeated positions: a cache bug
                raise AssertionError(
                    f"FakeRunner: {seq_id} prefilled at {start}, its cache holds {len(cache)}"
                )
            cache.extend(token_ids)
            self._note_peaks()
        return self._logits(seq_id)  # (V,)

    def decode(self, seq_ids: Sequence[str], token_ids: Sequence[int]) -> np.ndarray:
        self._record(RunnerCall("decode", tuple(seq_ids), tuple(token_ids)))
        self._step("decode", seq_ids)
        with self._lock:
            for seq_id, token in zip(seq_ids, token_ids):
                if seq_id not in self._kv:
                    raise AssertionError(f"FakeRunner: decode of {seq_id}, which has no cache")
                self._kv[seq_id].append(token)
            self._note_peaks()
        return np.stack([self._logits(s) for s in seq_ids])  # (n, V)

    def release(self, seq_id: str) -> None:
        self._record(RunnerCall("release", (seq_id,)))
        with self._lock:
            self._kv.pop(seq_id, None)  # the engine may release a sequence it never fed (aborted early)

    def close(self) -> None:
        self.closed = True
        self.resume()

    def _record(self, call: RunnerCall) -> None:
        with self._lock:
            self.calls.append(call)

    def _step(self, kind: Literal["prefill", "decode"], seq_ids: Sequence[str]) -> None:
        if kind == "decode" or self._hold_at == "any":
            self._wait_at_gate()
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self._death is not None:
            raise RunnerDied(self._death)
        error = self._take_fault(kind, seq_ids)
        if error is not None:
            raise error

    def _wait_at_gate(self) -> None:
        if not self._gate.is_set():
            self.parked.set()
            self._gate.wait()

    def _take_fault(self, kind: str, seq_ids: Sequence[str]) -> BaseException | None:
        requests = {request_id_of(s) for s in seq_ids}
        with self._lock:
            for fault in self._faults:
                if fault.kind == kind and (fault.request_id is None or fault.request_id in requests):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault.error
        return None

    def _note_peaks(self) -> None:
        self.peak_kv_tokens = max(self.peak_kv_tokens, sum(len(c) for c in self._kv.values()))
        self.peak_sequences = max(self.peak_sequences, len(self._kv))

    def _logits(self, seq_id: str) -> np.ndarray:
        request = self._requests.get(request_id_of(seq_id))
        if request is None:
            raise AssertionError(f"FakeRunner: no request registered for {seq_id} (use FakeEngine)")
        with self._lock:
            generated = tuple(self._kv[seq_id][len(request.prompt_ids):])  # () while prefilling the prompt
        logits = np.zeros(self.vocab_size, dtype=np.float32)  # (V,)
        logits[self.script(request, generated)] = LOGIT_MARGIN
        return logits


class FakeEngine(BatchingEngine):
    """`BatchingEngine` over a `FakeRunner`, answering `reply` to every request until told otherwise."""

    backend = "fake"

    def __init__(
        self,
        tokenizer: TextTokenizer,
        *,
        batching: BatchingSection | None = None,
        name: str = "fake-model",
        max_context: int = 4096,
        reply: str = DEFAULT_REPLY,
        step_delay_s: float = 0.0,
        load_gate: asyncio.Event | None = None,
        load_error: str | None = None,
    ) -> None:
        super().__init__(batching or BatchingSection())
        self._text_tokenizer = tokenizer
        self._name = name
        self._max_context = max_context
        self._load_gate = load_gate
        self._load_error = load_error
        self.requests: list[GenerationRequest] = []  # every request generate() was given, in order
        self.aborted: list[str] = []  # request ids whose consumer left before the last delta
        self._encoded: dict[str, tuple[int, ...]] = {}
        script = self._script(reply, eos=True)
        self.runner = FakeRunner(tokenizer.vocab_size, script, step_delay_s=step_delay_s)

    # --- steering -----------------------------------------------------------------------------
    def answer(self, reply: str | Callable[[GenerationRequest], str], *, eos: bool = True) -> None:
        """Answer every request from now on with `reply` (or the text it makes from the request),
        then end-of-sequence; with eos=False the reply repeats until max_tokens ends it."""
        self.runner.script = self._script(reply, eos)

    def hold(self, at: HoldAt = "decode") -> None:
        """Park the worker at its next decode (at="any": its next step) until `resume()`. One worker
        runs every sequence, so nothing generates while it is parked: a request decoding has had its
        first token; a request arriving meanwhile is admitted (waiting or running) but gets none yet."""
        self.runner.hold(at)

    def resume(self) -> None:
        self.runner.resume()

    async def until_held(self, timeout: float = 10.0) -> None:
        """Wait until the worker is parked at the hold gate."""
        if not await asyncio.to_thread(self.runner.parked.wait, timeout):
            raise TimeoutError("the engine's worker never reached the hold gate")

    def fail_next_prefill(
        self, message: str = "scripted prefill failure", request_id: str | None = None
    ) -> None:
        """The next prefill (of `request_id`, if given) raises: that request alone fails."""
        self.runner.fail_prefill(RuntimeError(message), request_id=request_id)

    def die(self, reason: str) -> None:
        """The runner is gone, as a backend's process monitor reports it: not ready for good, every live
        request fails with EngineNotReady("engine died: <reason>"), and `failed` is set (on the loop)."""
        self.runner.die(reason)
        self._die(reason)

    # --- engine -------------------------------------------------------------------------------
    async def load(self) -> None:
        if self._load_gate is not None:
            await self._load_gate.wait()
        await super().load()

    def _load_blocking(self) -> Loaded:
        if self._load_error is not None:
            raise RuntimeError(self._load_error)
        max_context = context_limit(self._max_context, None, self._batching)
        info = ModelInfo(self._name, self.backend, "FakeForCausalLM", "none", max_context, "cpu")
        return Loaded(self.runner, self._text_tokenizer, info)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        self.runner.expect(request)
        finished = False
        async with aclosing(super().generate(request)) as stream:
            try:
                async for delta in stream:
                    finished = delta.finish_reason is not None
                    yield delta
            except (GeneratorExit, asyncio.CancelledError):
                if not finished:
                    self.aborted.append(request.request_id)
                raise

    async def close(self) -> None:
        # Stop the worker before a parked step goes on, so that step is its last: resumed first, the
        # worker could run the held requests on to their end before close() stops it (a race).
        with self._cond:
            self._stopping = True
        self.runner.resume()  # a parked step would keep close() joining the worker for ever
        await super().close()

    def _script(self, reply: str | Callable[[GenerationRequest], str], eos: bool) -> Script:
        text_of = reply if callable(reply) else (lambda _request: reply)
        end = min(self._text_tokenizer.eos_token_ids) if eos else None

        def next_token(request: GenerationRequest, generated: tuple[int, ...]) -> int:
            return reply_script(self._encode(text_of(request)), end)(request, generated)

        return next_token

    def _encode(self, text: str) -> tuple[int, ...]:
        ids = self._encoded.get(text)  # the script asks at every step; encode each reply once
        if ids is None:
            ids = self._encoded[text] = tuple(self._text_tokenizer.encode(text, add_special_tokens=False))
        return ids
