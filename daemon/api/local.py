"""Answer a completion request with this node's own engine, streamed (SSE) or whole."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack, aclosing
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from .. import headers
from ..config import LimitsSection
from ..inference.engine import Delta, Engine, EngineError, GenerationRequest, SamplingParams
from ..inference.prompt_cache import BLOCK
from ..inference.tokenizer import TextTokenizer
from ..record import RequestRecord
from .appkeys import NODE
from .chat_output import ChatOutput, new_chat_output
from .choices import Choice, choice_params, first_deltas, merged, new_choices
from .constraint import answer_constraint
from .errors import APIError, bad_request, to_api_error
from .logprobs import vllm_prompt_logprobs
from .render import PASS, Render
from .responses import Shape, chunk, full_response, usage, usage_chunk
from .schemas import Body, ChatCompletionRequest, CompletionRequest


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
    stop_ids = frozenset(body.stop_token_ids or ())
    for param, ids in (("logit_bias", [token for token, _ in bias]), ("stop_token_ids", stop_ids)):
        if vocab_size is not None and ids and max(ids) >= vocab_size:
            raise bad_request(f"Invalid value for '{param}': token id {max(ids)} is not in the model's "
                              f"vocabulary of {vocab_size} tokens.", param, "invalid_value")
    if body.prompt_logprobs is not None and body.stream:
        raise bad_request("Invalid value for 'prompt_logprobs': prompt log-probabilities are not available when "
                          "stream is true (as vLLM).", "prompt_logprobs", "invalid_value")
    if body.min_tokens > max_tokens:
        raise bad_request(f"Invalid value for 'min_tokens': {body.min_tokens} is more than the {max_tokens} "
                          "tokens the answer may have (max_tokens).", "min_tokens", "invalid_value")
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
        min_p=body.min_p,
        min_tokens=body.min_tokens,
        stop_token_ids=stop_ids,
        logprobs=body.requested_logprobs(),
        prompt_logprobs=body.requested_prompt_logprobs(),
    )


async def serve_local(
    request: web.Request,
    engine: Engine,
    body: Body,
    prompts: list[list[int]],
    record: RequestRecord,
    limits: LimitsSection,
    render: Render = PASS,
) -> web.StreamResponse:
    """`prompts`: token ids, one list per prompt (a chat has one). Each prompt gets `n` choices, choice
    `i * n + j` the j-th of prompt i (OpenAI's order). `render`: how the answer reaches the client."""
    tokenizer = engine.tokenizer
    record.prompt_tokens = sum(map(len, prompts))
    endpoint = "chat" if isinstance(body, ChatCompletionRequest) else "completion"
    shape = Shape.new(endpoint, record.request_id, body.model)
    reasoning = request.app[NODE].config.model.reasoning  # [model] is restart-only: the node's is this request's

    def new_output() -> ChatOutput | None:
        if not isinstance(body, ChatCompletionRequest):
            return None
        return new_chat_output(body, tokenizer, prompts[0], reasoning)

    echoes = _echo_texts(tokenizer, body, prompts)
    choices = new_choices(tokenizer, body, shape, new_output, [echo for echo in echoes for _ in range(body.n)])
    output = choices[0].output
    constraint = await answer_constraint(body, tokenizer, output is not None and output.reasons,
                                         output is not None and output.starts_in_reasoning)
    streams, scope = [], cache_scope(record.user, body.cache_salt)
    shared = _shares_prompt(engine, body, prompts)
    for prompt in prompts:
        params = sampling_params(body, len(prompt), engine.info.max_context, limits, tokenizer.vocab_size)
        streams += [engine.generate(GenerationRequest(record.request_id, tuple(prompt), choice_params(params, j),
                                                      constraint, scope, share_prompt=shared and j == 0))
                    for j in range(body.n)]
    async with AsyncExitStack() as stack:
        for stream in streams:
            await stack.enter_async_context(aclosing(stream))
        # admission errors surface here, before any header is sent
        firsts = await _shared_firsts(streams, body.n) if shared else await first_deltas(streams)
        for choice, first in zip(choices, firsts):
            choice.prompt_entries = first.prompt_logprobs
        record.queued_s = firsts[0].queued_s
        # each prompt counted once, as its tokens are: by its choice that found the most in the cache (the
        # first, when the others took the prompt it computed)
        record.cached_tokens = sum(firsts[i].cached_tokens if shared else
                                   max(f.cached_tokens for f in firsts[i:i + body.n])
                                   for i in range(0, len(firsts), body.n))
        async with aclosing(merged(streams, firsts)) as deltas:
            if body.stream:
                return await _stream(request, deltas, shape, body, record, choices, render)
            return await _whole(deltas, shape, record, choices, _prompt_logprobs_of(tokenizer, body), render)


def _shares_prompt(engine: Engine, body: Body, prompts: list[list[int]]) -> bool:
    """`n` choices of a prompt long enough to reuse: the first is prefilled alone and its prompt kept,
    and the others take it from the prompt cache instead of computing it again (not for a prompt being
    scored: each choice's scores are computed whole)."""
    return (body.n > 1 and engine.shares_prompts and body.requested_prompt_logprobs() is None
            and max(map(len, prompts)) > BLOCK)


async def _shared_firsts(streams: list[AsyncIterator[Delta]], n: int) -> list[Delta]:
    """Each prompt's first choice to its first token (its prompt is in the prompt cache then), then the
    others; the first deltas in choice order."""
    leads = await first_deltas(streams[::n])
    rest = iter(await first_deltas([s for i, s in enumerate(streams) if i % n]))
    return [leads[i // n] if i % n == 0 else next(rest) for i in range(len(streams))]


def cache_scope(identity: str | None, salt: str | None) -> str:
    """The prompt cache a request shares: its API key's (one for all when the node has no keys), and
    within it only with requests of the same `cache_salt`. A cached prefix shows in `cached_tokens` and
    in the time to the first token, so another key must not be able to find out what was sent."""
    return json.dumps([identity or "", salt or ""])


def _echo_texts(tokenizer: TextTokenizer, body: Body, prompts: list[list[int]]) -> list[str]:
    """Each prompt's text when a text completion asks for `echo`, else ""."""
    if not (isinstance(body, CompletionRequest) and body.echo):
        return [""] * len(prompts)
    return [given if isinstance(given, str) else tokenizer.decode(ids) for given, ids in zip(body.prompts(), prompts)]


def _response_headers(record: RequestRecord) -> dict[str, str]:
    out = {headers.NODE: record.node, headers.ROUTE: "local", headers.REQUEST_ID: record.request_id}
    if record.version:
        out[headers.VERSION] = record.version
    return out


def _account(record: RequestRecord, choices: list[Choice]) -> dict[str, Any]:
    """The answer's usage (the prompt counted once, as OpenAI does) and the record's figures; the
    record's finish reason is the first choice's."""
    record.completion_tokens = sum(c.completion_tokens for c in choices)
    record.finish_reason = choices[0].finish_reason
    counted = [c.reasoning_tokens for c in choices if c.reasoning_tokens is not None]
    return usage(record.prompt_tokens or 0, record.completion_tokens, record.cached_tokens,
                 sum(counted) if counted else None)


def _prompt_logprobs_of(tokenizer: TextTokenizer, body: Body) -> Callable[[Choice], list[Any]] | None:
    """vLLM's `prompt_logprobs` of a choice's prompt, when the request asks for them."""
    top = body.prompt_logprobs
    if top is None:
        return None
    return lambda choice: vllm_prompt_logprobs(tokenizer, choice.prompt_entries, top)


async def _whole(deltas: AsyncIterator[tuple[int, Delta]], shape: Shape, record: RequestRecord,
                 choices: list[Choice], prompt_logprobs: Callable[[Choice], list[Any]] | None,
                 render: Render) -> web.Response:
    async for index, delta in deltas:
        if index == 0:  # the record's token times are one sequence's (inter-token latency)
            record.mark_token()
        choices[index].take(delta)
    use = _account(record, choices)
    answers = [c.whole(shape) for c in choices]
    if prompt_logprobs is not None and not shape.chat:  # vLLM: on each choice of a completion
        for answer, choice in zip(answers, choices):
            answer["prompt_logprobs"] = prompt_logprobs(choice)
    body = full_response(shape, answers, use)
    if prompt_logprobs is not None and shape.chat:  # and once for a chat's one prompt
        body["prompt_logprobs"] = prompt_logprobs(choices[0])
    return web.json_response(render.whole(body), headers=_response_headers(record))


async def _stream(
    request: web.Request,
    deltas: AsyncIterator[tuple[int, Delta]],
    shape: Shape,
    body: Body,
    record: RequestRecord,
    choices: list[Choice],
    render: Render,
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
    out = render.opening()
    for choice in choices:
        if shape.chat:
            out += render.chunk(chunk(shape, "", first=True, with_usage_field=include_usage, index=choice.index))
        elif choice.echo:
            out += render.chunk(choice.echo_chunk(shape, include_usage))
    await _write(response, out)
    try:
        async for index, delta in deltas:
            if index == 0:
                record.mark_token()
            for piece in choices[index].chunks(shape, delta, include_usage):
                await _write(response, render.chunk(piece))
    except (EngineError, APIError) as exc:  # mid-stream failure: say so, then end the stream properly
        error = to_api_error(exc)
        record.status, record.error = error.status, error.message
        await _write(response, render.failed(error))
    use = _account(record, choices)
    if include_usage:
        await _write(response, render.chunk(usage_chunk(shape, use)))
    await _write(response, render.closing())
    await _end_complete_stream(response)
    return response


async def _write(response: web.StreamResponse, data: bytes) -> None:
    if data:  # a rendered chunk may be nothing (a Responses stream has no event for chat's role chunk)
        await response.write(data)


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
