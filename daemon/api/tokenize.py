"""`POST /tokenize`, `POST /detokenize`: vLLM's tokenizer endpoints, answered with the tokenizer of the
model that would serve the text.

- A model this node serves (or no `model`: this node's): its own tokenizer and chat template. A chat's
  `messages` and `tools` are rendered as the chat path renders them (`template_messages`), so `count` is
  what a chat completion's `usage.prompt_tokens` will say for them. `max_model_len` is this node's
  context limit for the model.
- A model only upstreams serve: forwarded to one of them, as a completion is (the balancer, failover to
  the next upstream, peer credentials); `X-DSNode-Node` names the node whose tokenizer answered.
- An edge and a central serving one name may use different tokenizers (a distill beside the full model):
  the edge counts with its own, since it serves the short prompts.

Not counted in the request metrics (they are about generation); each request is logged as one
`request` record like a completion's.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from aiohttp import web
from pydantic import Field, field_validator

from .. import headers
from ..cluster.routing import Route
from ..inference.engine import EngineNotReady
from ..inference.tokenizer import TextTokenizer
from ..node import Node, Serving, log_request
from ..record import RequestRecord
from .appkeys import NODE
from .auth import admit
from .body import read_json
from .completions import MAX_HOPS, request_id_of, via_of
from .errors import APIError, bad_request, client_gone, model_not_found, to_api_error
from .forward import NotForwarded, not_forwarded, serve_forwarded
from .prompt import TOKENIZE_IN_THREAD_CHARS
from .schemas import (
    INTEGRAL,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ToolSpecIn,
    _Nullable,
    parse_body,
)
from .tools import template_messages


class TokenizeCompletionRequest(_Nullable):
    """vLLM's completion form: a text."""

    model: str | None = Field(default=None, min_length=1)
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Nullable):
    """vLLM's chat form: messages (and tools) as a chat completion takes them."""

    model: str | None = Field(default=None, min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolSpecIn] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = Field(default=False, json_schema_extra={"const": False})
    add_special_tokens: bool = False
    return_token_strs: bool = False

    @field_validator("continue_final_message")
    @classmethod
    def _not_continued(cls, value: bool) -> bool:
        if value:
            raise ValueError("continuing the final message is not supported (the chat path does not take it)")
        return value


class DetokenizeRequest(_Nullable):
    model: str | None = Field(default=None, min_length=1)
    tokens: list[Annotated[int, Field(ge=0), INTEGRAL]]


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


async def tokenize(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "tokenize")


async def detokenize(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "detokenize")


async def _answer(request: web.Request, endpoint: str) -> web.StreamResponse:
    node = request.app[NODE]
    record = RequestRecord(request_id_of(request), endpoint, node.name, client=request.remote)
    try:
        with admit(request, node.config.limits.max_concurrent_per_key, record):
            response = await _serve(request, node, endpoint, record)
        record.done(response.status)
        return response
    except BaseException as exc:
        error = to_api_error(exc) if isinstance(exc, Exception) else client_gone()
        record.done(error.status, error.message)
        raise
    finally:
        log_request(record)


async def _serve(request: web.Request, node: Node, endpoint: str, record: RequestRecord) -> web.StreamResponse:
    limits = node.config.limits
    raw, data = await read_json(request, limits.body_timeout)
    parsed = parse_request(endpoint, data)
    if isinstance(parsed, TokenizeChatRequest) and len(parsed.messages) > limits.max_messages:
        raise bad_request(f"{len(parsed.messages)} messages is over this server's limit of {limits.max_messages}.",
                          "messages", "too_many_messages")
    with node.serving() as serving:
        model = parsed.model or serving.model
        record.model = model
        if model == serving.model:
            record.route = "local"
            return _local_answer(await _local(serving, parsed), record)
        if model not in node.upstreams.known_models():
            raise model_not_found(model, list({serving.model, *node.upstreams.known_models()}))
        return await _forward(request, node, raw, model, record)


def parse_request(endpoint: str, data: Any) -> TokenizeRequest | DetokenizeRequest:
    """`endpoint`'s body ("tokenize": the chat form when it has `messages`, else the text form); 400 naming
    the parameter otherwise."""
    form: type[TokenizeCompletionRequest | TokenizeChatRequest | DetokenizeRequest] = DetokenizeRequest
    if endpoint == "tokenize":
        chat = isinstance(data, dict) and "messages" in data
        form = TokenizeChatRequest if chat else TokenizeCompletionRequest
    parsed: TokenizeRequest | DetokenizeRequest = parse_body(form, data)
    return parsed


async def _local(serving: Serving, parsed: TokenizeRequest | DetokenizeRequest) -> dict[str, Any]:
    health = serving.engine.health()
    if not health.ready:
        raise EngineNotReady(health.reason)
    tokenizer = serving.engine.tokenizer
    if isinstance(parsed, DetokenizeRequest):
        ids = _checked(tokenizer, parsed.tokens)
        if len(ids) > TOKENIZE_IN_THREAD_CHARS // 4:  # about as much text
            return {"prompt": await asyncio.to_thread(tokenizer.decode, ids, False)}
        return {"prompt": tokenizer.decode(ids, skip_special_tokens=False)}
    if _chars(parsed) > TOKENIZE_IN_THREAD_CHARS:
        ids = await asyncio.to_thread(_token_ids, tokenizer, parsed, serving.model)
    else:
        ids = _token_ids(tokenizer, parsed, serving.model)
    pieces = [tokenizer.tokenizer.id_to_token(i) for i in ids] if parsed.return_token_strs else None
    return {"count": len(ids), "max_model_len": serving.engine.info.max_context, "tokens": ids, "token_strs": pieces}


def _token_ids(tokenizer: TextTokenizer, parsed: TokenizeRequest, model: str) -> list[int]:
    if isinstance(parsed, TokenizeCompletionRequest):
        return tokenizer.encode(parsed.prompt, add_special_tokens=parsed.add_special_tokens)
    chat = ChatCompletionRequest.model_construct(model=model, messages=parsed.messages, tools=parsed.tools)
    messages, tools = template_messages(chat, tokenizer)
    text = tokenizer.render_chat(messages, add_generation_prompt=parsed.add_generation_prompt, tools=tools)
    return tokenizer.encode(text, add_special_tokens=parsed.add_special_tokens)


def _chars(parsed: TokenizeRequest) -> int:
    if isinstance(parsed, TokenizeCompletionRequest):
        return len(parsed.prompt)
    return sum(len(m.text()) for m in parsed.messages)


def _checked(tokenizer: TextTokenizer, ids: list[int]) -> list[int]:
    for index, token in enumerate(ids):
        if token >= tokenizer.vocab_size:
            raise bad_request(f"Token id {token} is outside the vocabulary ({tokenizer.vocab_size}).",
                              f"tokens[{index}]")
    return ids


def _local_answer(payload: dict[str, Any], record: RequestRecord) -> web.Response:
    return web.json_response(payload, headers={headers.NODE: record.node, headers.ROUTE: "local",
                                               headers.REQUEST_ID: record.request_id})


async def _forward(request: web.Request, node: Node, raw: bytes, model: str,
                   record: RequestRecord) -> web.StreamResponse:
    """To an upstream serving `model`, as a completion goes (its tokenizer is the one that counts)."""
    via = via_of(request)
    if node.name in via or len(via) >= MAX_HOPS:
        raise APIError(508, f"The request for `{model}` came back to {node.name} through {', '.join(via)}; "
                       "it is not forwarded again.", type="server_error", code="loop_detected")
    record.route = "forwarded"
    route = Route("forward", "the model is served by upstreams only")
    body = CompletionRequest.model_construct(model=model, prompt=" ", stream=False)  # what forwarding reads
    try:
        return await serve_forwarded(request, node, raw, body, record, route, via)
    except NotForwarded as exc:
        return not_forwarded(exc, body, record, route)
