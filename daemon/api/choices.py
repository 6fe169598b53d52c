"""The choices of one answer (`n` per prompt; a text completion may give several prompts): each its own
generation in the engine's batch, its own chat output (reasoning, tool calls) and log-probabilities,
merged into one response or one stream.

Every choice is a sequence of its own, all admitted together so they batch (or, where the engine shares
prompts, a prompt's first choice first and the others after its first token: `dsnode.api.local`); a
`seed` gives a prompt's j-th choice the seed
`seed + j`, so the same request gives the same choices and no two choices of a prompt share a random
stream. A choice that fails ends the whole answer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable, Sequence

from ..inference.engine import Delta, SamplingParams, TokenLogprob
from ..inference.reasoning import ReasoningCounter, ReasoningSplitter
from ..inference.tokenizer import TextTokenizer
from .chat_output import ChatOutput, stream_delta, whole_message
from .logprobs import CompletionLogprobs, chat_logprobs
from .responses import Shape, choice_body, chunk
from .schemas import Body, CompletionRequest

LogprobsFormat = Callable[[Sequence[TokenLogprob]], dict[str, Any]]


@dataclass
class Choice:
    index: int
    output: ChatOutput | None  # chat: the split into reasoning, content and tool calls
    logprobs: LogprobsFormat | None  # None: not asked for
    echo: str = ""  # a text completion's prompt, when `echo` asks for it
    echoes_scores: bool = False  # the prompt's entries lead the `logprobs` block (`echo` with `logprobs`)
    last: Delta | None = None
    parts: list[str] = field(default_factory=list)  # a whole answer's text
    entries: list[TokenLogprob] = field(default_factory=list)  # a whole answer's log-probabilities
    pending: list[TokenLogprob] = field(default_factory=list)  # a stream's, not yet on a chunk
    prompt_entries: tuple[TokenLogprob, ...] = ()  # the prompt's log-probabilities, when scored
    reasoning: ReasoningCounter | None = None  # a reasoning model's chat answer: its reasoning tokens

    def __post_init__(self) -> None:
        if self.output is not None and self.output.splitter is not None:
            self.reasoning = ReasoningCounter(ReasoningSplitter(in_reasoning=self.output.starts_in_reasoning))

    @property
    def reasoning_tokens(self) -> int | None:
        """None: the model does not reason (the usage then says nothing of it)."""
        return None if self.reasoning is None else self.reasoning.tokens

    @property
    def completion_tokens(self) -> int:
        return self.last.completion_tokens if self.last else 0

    @property
    def finish_reason(self) -> str | None:
        reason = self.last.finish_reason if self.last else None
        return self.output.finish_reason(reason) if self.output is not None else reason

    def take(self, delta: Delta) -> None:
        """A whole answer: keep the delta."""
        self._count(delta)
        self.last = delta
        self.parts.append(delta.text)
        self.entries.extend(delta.logprobs)

    def whole(self, shape: Shape) -> dict[str, Any]:
        text = self.echo + "".join(self.parts)
        message = whole_message(self.output, text) if self.output is not None else None
        echoed = self.prompt_entries if self.echoes_scores else ()
        logprobs = None if self.logprobs is None else self.logprobs([*echoed, *self.entries])
        return choice_body(shape, self.index, text, self.finish_reason, message, logprobs)

    def echo_chunk(self, shape: Shape, include_usage: bool) -> dict[str, Any]:
        """A stream's first chunk of a text completion with `echo`: the prompt, and its log-probabilities
        when asked (vLLM's order)."""
        piece = chunk(shape, self.echo, with_usage_field=include_usage, index=self.index)
        if self.logprobs is not None and self.echoes_scores:
            piece["choices"][0]["logprobs"] = self.logprobs(self.prompt_entries)
        return piece

    def chunks(self, shape: Shape, delta: Delta, include_usage: bool) -> list[dict[str, Any]]:
        """A stream: the chunks this delta makes, its log-probabilities on the first that carries text."""
        self._count(delta)
        self.last = delta
        pieces = _delta_chunks(shape, delta, include_usage, self.index) if self.output is None else \
            _chat_chunks(shape, self.output, delta, include_usage, self.index)
        if self.logprobs is not None:
            self.pending.extend(delta.logprobs)
            if _attach_logprobs(pieces, self.pending, self.logprobs, delta.finish_reason is not None):
                self.pending = []
        return pieces


    def _count(self, delta: Delta) -> None:
        if self.reasoning is not None:
            self.reasoning.push(delta.text, delta.completion_tokens)


def new_choices(tokenizer: TextTokenizer, body: Body, shape: Shape, new_output: Callable[[], ChatOutput | None],
                echoes: list[str]) -> list[Choice]:
    """One choice per entry of `echoes` (prompts x n of them, each with its prompt's echo)."""
    echoes_scores = isinstance(body, CompletionRequest) and body.echoes_scores()
    return [Choice(i, new_output(), _logprobs_format(tokenizer, body, shape), echo, echoes_scores)
            for i, echo in enumerate(echoes)]


def _logprobs_format(tokenizer: TextTokenizer, body: Body, shape: Shape) -> LogprobsFormat | None:
    if body.requested_logprobs() is None:
        return None
    as_ids = body.return_tokens_as_token_ids
    if shape.chat:
        return lambda entries: chat_logprobs(tokenizer, entries, as_ids)
    return CompletionLogprobs(tokenizer, as_ids=as_ids, top=body.requested_logprobs()).block


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    if index == 0 or params.seed is None:
        return params
    return replace(params, seed=params.seed + index)


async def first_deltas(streams: list[AsyncIterator[Delta]]) -> list[Delta]:
    """Every choice's first delta: all admitted at once (so they batch), and the first admission error
    raised once all have answered (so none is left running while the caller closes them)."""
    if len(streams) == 1:
        return [await anext(streams[0])]
    firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
    for first in firsts:
        if isinstance(first, BaseException):
            raise first
    return [f for f in firsts if isinstance(f, Delta)]


async def merged(streams: list[AsyncIterator[Delta]], firsts: list[Delta]) -> AsyncIterator[tuple[int, Delta]]:
    """(choice index, delta) as the choices produce them, until every one has finished. One choice
    is read directly; several by a task each, cancelled when this iterator is closed."""
    if len(streams) == 1:
        async for delta in _with_first(firsts[0], streams[0]):
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for delta in _with_first(firsts[index], streams[index]):
                queue.put_nowait((index, delta))
        except Exception as exc:  # the engine's error for this choice: the answer's
            queue.put_nowait((index, exc))
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _with_first(first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    yield first
    if first.finish_reason is None:
        async for delta in rest:
            yield delta
            if delta.finish_reason is not None:
                return


def _delta_chunks(shape: Shape, delta: Delta, include_usage: bool, index: int) -> list[dict[str, Any]]:
    """Chat sends the last text and the finish reason in separate chunks (as OpenAI does)."""
    reason = delta.finish_reason
    if not delta.text:
        return [chunk(shape, "", reason, with_usage_field=include_usage, index=index)] if reason else []
    if shape.chat and reason:
        return [
            chunk(shape, delta.text, None, with_usage_field=include_usage, index=index),
            chunk(shape, "", reason, with_usage_field=include_usage, index=index),
        ]
    return [chunk(shape, delta.text, reason, with_usage_field=include_usage, index=index)]


def _chat_chunks(shape: Shape, output: ChatOutput, delta: Delta, include_usage: bool,
                 index: int) -> list[dict[str, Any]]:
    """A chat delta through `output`: reasoning, content and tool calls each in their own chunk, the
    finish reason in a last one."""
    parts = output.push(delta.text)
    if delta.finish_reason is not None:
        parts += output.finish()
    out = [chunk(shape, "", None, with_usage_field=include_usage, delta=stream_delta(p), index=index)
           for p in parts if p[1]]
    if delta.finish_reason is not None:
        out.append(chunk(shape, "", output.finish_reason(delta.finish_reason), with_usage_field=include_usage,
                         index=index))
    return out


def _attach_logprobs(pieces: list[dict[str, Any]], pending: list[TokenLogprob], logprobs: LogprobsFormat,
                     finishing: bool) -> bool:
    """Put the pending entries on the first chunk that carries text (any chunk, on the last delta)."""
    for piece in pieces:
        choice = piece["choices"][0]
        carries = choice.get("text") or any(v for k, v in choice.get("delta", {}).items() if k != "role")
        if carries or finishing:
            choice["logprobs"] = logprobs(pending)
            return True
    return False
