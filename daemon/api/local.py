"""Answer a completion request with this node's own engine, streamed (SSE) or whole."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable, Sequence

from aiohttp import web

from .. import headers
from ..config import LimitsSection
from ..inference.engine import Delta, Engine, EngineError, GenerationRequest, SamplingParams, TokenLogprob
from ..inference.tokenizer import TextTokenizer
from ..record import RequestRecord
from .appkeys import NODE
from .chat_output import ChatOutput, new_chat_output, stream_delta, whole_message
from .errors import APIError, bad_request, sse_error_event, to_api_error
from .logprobs import CompletionLogprobs, chat_logprobs
from .responses import DONE, Shape, chunk, full_response, sse, usage, usage_chunk
from .schemas import Body, ChatCompletionRequest, CompletionRequest
from .tools import answer_constraint


def sampling_params(body: Body, prompt_tokens: int, max_context: int, limits: LimitsSection,
                    vocab_size: int | None = None) -> SamplingParams:
    """OpenAI parameters → engine parameters. Without max_tokens, the rest of the context (vLLM),
    capped by `[limits] max_tokens` (a requested value over it was refused before routing).
    `vocab_size`: the serving model's, which `logit_bias` ids must be under."""
    requested = body.requested_max_tokens()
    max_tokens = requested if requested is not None else max(0, max_context - prompt_tokens)
    if limits.max_tokens is not None:
        max_tokens = min(max_tokens, limits.max_tokens)
    bias = body.logit_bias_pairs()
    if bias and vocab_size is not None and bias[-1][0] >= vocab_size:
        raise bad_request(f"Invalid value for 'logit_bias': token id {bias[-1][0]} is not in the model's "
                          f"vocabulary of {vocab_size} tokens.", "logit_bias", "invalid_value")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(0, body.top_k),
        seed=body.seed,
        stop=body.stop_sequences(),
        ignore_eos=body.ignore_eos,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=bias,
        logprobs=body.requested_logprobs(),
    )


async def serve_local(
    request: web.Request,
    engine: Engine,
    body: Body,
    prompt_ids: list[int],
    record: RequestRecord,
    limits: LimitsSection,
) -> web.StreamResponse:
    params = sampling_params(body, len(prompt_ids), engine.info.max_context, limits, engine.tokenizer.vocab_size)
    record.prompt_tokens = len(prompt_ids)
    shape = Shape.new(record.endpoint, record.request_id, body.model)
    output, constraint = None, None
    if isinstance(body, ChatCompletionRequest):  # [model] is restart-only: the node's config is this request's
        output = new_chat_output(body, engine.tokenizer, prompt_ids, request.app[NODE].config.model.reasoning)
        constraint = await answer_constraint(body, engine.tokenizer, output.reasons, output.starts_in_reasoning)
    stream = engine.generate(GenerationRequest(record.request_id, tuple(prompt_ids), params, constraint))
    async with aclosing(stream):
        first = await anext(stream)  # admission errors surface here, before any header is sent
        record.queued_s = first.queued_s
        echo = _echo_text(engine.tokenizer, body, prompt_ids)
        logprobs = _logprobs_format(engine.tokenizer, body, shape)
        if body.stream:
            return await _stream(request, stream, first, shape, body, record, echo, output, logprobs)
        return await _whole(stream, first, shape, record, echo, output, logprobs)


LogprobsFormat = Callable[[Sequence[TokenLogprob]], dict[str, Any]]


def _logprobs_format(tokenizer: TextTokenizer, body: Body, shape: Shape) -> LogprobsFormat | None:
    if body.requested_logprobs() is None:
        return None
    if shape.chat:
        return lambda entries: chat_logprobs(tokenizer, entries)
    return CompletionLogprobs(tokenizer).block


def _echo_text(tokenizer: TextTokenizer, body: Body, prompt_ids: list[int]) -> str:
    if isinstance(body, CompletionRequest) and body.echo:
        return body.prompt if isinstance(body.prompt, str) else tokenizer.decode(prompt_ids)
    return ""


def _response_headers(record: RequestRecord) -> dict[str, str]:
    out = {headers.NODE: record.node, headers.ROUTE: "local", headers.REQUEST_ID: record.request_id}
    if record.version:
        out[headers.VERSION] = record.version
    return out


async def _whole(
    stream: AsyncIterator[Delta], first: Delta, shape: Shape, record: RequestRecord, echo: str,
    output: ChatOutput | None, logprobs: LogprobsFormat | None,
) -> web.Response:
    parts, last = [echo], first
    entries: list[TokenLogprob] = []
    async for delta in _with_first(first, stream):
        record.mark_token()
        parts.append(delta.text)
        entries.extend(delta.logprobs)
        last = delta
    text, finish, message = "".join(parts), last.finish_reason, None
    if output is not None:
        message = whole_message(output, text)
        finish = output.finish_reason(finish)
    record.completion_tokens, record.finish_reason = last.completion_tokens, finish
    body = full_response(shape, text, finish, usage(last.prompt_tokens, last.completion_tokens), message,
                         None if logprobs is None else logprobs(entries))
    return web.json_response(body, headers=_response_headers(record))


async def _stream(
    request: web.Request,
    stream: AsyncIterator[Delta],
    first: Delta,
    shape: Shape,
    body: Body,
    record: RequestRecord,
    echo: str,
    output: ChatOutput | None,
    logprobs: LogprobsFormat | None,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **_response_headers(record),
        }
    )
    await response.prepare(request)
    include_usage = body.include_usage
    last, finish = first, first.finish_reason
    pending: list[TokenLogprob] = []  # entries of tokens whose text no chunk has carried yet
    if shape.chat:
        await response.write(sse(chunk(shape, "", first=True, with_usage_field=include_usage)))
    elif echo:
        await response.write(sse(chunk(shape, echo, with_usage_field=include_usage)))
    try:
        async for delta in _with_first(first, stream):
            record.mark_token()
            last, finish = delta, delta.finish_reason
            pieces = _delta_chunks(shape, delta, include_usage) if output is None else \
                _chat_chunks(shape, output, delta, include_usage)
            if logprobs is not None:
                pending.extend(delta.logprobs)
                if _attach_logprobs(pieces, pending, logprobs, delta.finish_reason is not None):
                    pending = []
            for piece in pieces:
                await response.write(sse(piece))
            if output is not None:
                finish = output.finish_reason(finish)
    except (EngineError, APIError) as exc:  # mid-stream failure: say so, then end the stream properly
        error = to_api_error(exc)
        record.status, record.error = error.status, error.message
        await response.write(sse_error_event(error))
    record.completion_tokens, record.finish_reason = last.completion_tokens, finish
    if include_usage:
        await response.write(sse(usage_chunk(shape, usage(last.prompt_tokens, last.completion_tokens))))
    await response.write(DONE)
    await _end_complete_stream(response)
    return response


async def _end_complete_stream(response: web.StreamResponse) -> None:
    """The client has its whole answer: a hang-up now (the connection error, or aiohttp cancelling
    the handler) loses nothing, so the request still counts as served."""
    try:
        await response.write_eof()
    except ConnectionError:
        pass
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()


def _delta_chunks(shape: Shape, delta: Delta, include_usage: bool) -> list[dict[str, Any]]:
    """Chat sends the last text and the finish reason in separate chunks (as OpenAI does)."""
    reason = delta.finish_reason
    if not delta.text:
        return [chunk(shape, "", reason, with_usage_field=include_usage)] if reason else []
    if shape.chat and reason:
        return [
            chunk(shape, delta.text, None, with_usage_field=include_usage),
            chunk(shape, "", reason, with_usage_field=include_usage),
        ]
    return [chunk(shape, delta.text, reason, with_usage_field=include_usage)]


def _chat_chunks(shape: Shape, output: ChatOutput, delta: Delta, include_usage: bool) -> list[dict[str, Any]]:
    """A chat delta through `output`: reasoning, content and tool calls each in their own chunk, the
    finish reason in a last one."""
    parts = output.push(delta.text)
    if delta.finish_reason is not None:
        parts += output.finish()
    out = [chunk(shape, "", None, with_usage_field=include_usage, delta=stream_delta(p)) for p in parts if p[1]]
    if delta.finish_reason is not None:
        out.append(chunk(shape, "", output.finish_reason(delta.finish_reason), with_usage_field=include_usage))
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


async def _with_first(first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    yield first
    if first.finish_reason is None:
        async for delta in rest:
            yield delta
            if delta.finish_reason is not None:
                return
