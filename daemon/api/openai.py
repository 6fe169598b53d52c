"""`POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from .. import headers
from ..inference.engine import ContextLengthExceeded, EngineNotReady
from ..node import Node
from ..record import RequestRecord, new_request_id
from .auth import admit
from .errors import APIError, bad_request, client_gone, model_not_found, to_api_error
from .forward import choose_route, serve_forwarded, via_of
from .keys import NODE
from .local import prompt_token_ids, serve_local
from .schemas import ChatCompletionRequest, CompletionRequest, parse_body

MAX_REQUEST_ID = 128


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "completion")


async def list_models(request: web.Request) -> web.Response:
    node = request.app[NODE]
    data = []
    local = node.local_model_json()
    if local is not None:
        data.append(
            {
                "id": local["name"],
                "object": "model",
                "created": int(node.started_at),
                "owned_by": "dsnode",
                "max_model_len": local.get("max_context"),
                "dsnode": {"nodes": [node.name], "local": True, "ready": local["ready"]},
            }
        )
    for model in node.upstreams.reachable_models():  # served by healthy upstreams
        if local is not None and model.name == local["name"]:
            entry = data[0]
            entry["max_model_len"] = max(entry["max_model_len"] or 0, model.max_context or 0) or None
            entry["dsnode"]["nodes"] += model.nodes
            continue
        data.append(
            {
                "id": model.name,
                "object": "model",
                "created": int(node.started_at),
                "owned_by": "dsnode",
                "max_model_len": model.max_context,
                "dsnode": {"nodes": list(model.nodes), "local": False, "ready": True},
            }
        )
    return web.json_response({"object": "list", "data": data})


def request_id_of(request: web.Request) -> str:
    given = request.headers.get(headers.REQUEST_ID, "")
    if given and len(given) <= MAX_REQUEST_ID and given.isprintable() and " " not in given:
        return given
    return new_request_id()


async def read_json(request: web.Request, timeout: float) -> tuple[bytes, object]:
    """The body as received (forwarding passes these bytes on) and parsed. A body still arriving
    after `timeout` seconds (a client trickling it) is refused with 408."""
    if request.content.is_eof():  # all here already (the usual case): no timer to arm
        raw = await request.read()
    else:
        try:
            async with asyncio.timeout(timeout):
                raw = await request.read()
        except TimeoutError:
            raise APIError(408, f"The request body did not arrive within {timeout:g}s.",
                           code="body_timeout") from None
    try:
        return raw, json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}", code="invalid_json") from None


async def _complete(request: web.Request, endpoint: str) -> web.StreamResponse:
    node = request.app[NODE]
    record = RequestRecord(request_id_of(request), endpoint, node.name, client=request.remote)
    try:
        with admit(request, node.config.limits.max_concurrent_per_key, record):  # identity; 429 per key
            response = await _dispatch(request, node, endpoint, record)
        record.done(response.status if record.status < 400 else None)
        return response
    except BaseException as exc:
        error = to_api_error(exc) if isinstance(exc, Exception) else client_gone()
        record.done(error.status, error.message)
        raise
    finally:
        node.observe(record)


async def _dispatch(request: web.Request, node: Node, endpoint: str, record: RequestRecord) -> web.StreamResponse:
    if node.draining:
        raise APIError(503, "The node is shutting down.", type="service_unavailable", code="draining",
                       headers={"Retry-After": "5"})
    config = node.config
    raw, data = await read_json(request, config.limits.body_timeout)
    body = parse_body(ChatCompletionRequest if endpoint == "chat" else CompletionRequest, data)
    record.model, record.stream = body.model, body.stream
    record.user = record.user or body.user  # the API key's name when there is one, never the client's say
    if isinstance(body, ChatCompletionRequest) and len(body.messages) > config.limits.max_messages:
        raise bad_request(
            f"{len(body.messages)} messages is over this server's limit of {config.limits.max_messages}.",
            "messages", "too_many_messages",
        )
    prompt_ids = None  # counted only for a local model: a forwarded-only model costs no tokenizing
    if node.serves_locally(body.model) and node.engine.health().ready:
        prompt_ids = await prompt_token_ids(node.engine.tokenizer, body)
    limit = config.limits.max_prompt_tokens
    if prompt_ids is not None and limit is not None and len(prompt_ids) > limit:
        raise bad_request(
            f"The prompt has {len(prompt_ids)} tokens, over this server's limit of "
            f"{config.limits.max_prompt_tokens}.", "messages" if endpoint == "chat" else "prompt",
            "prompt_too_long",
        )
    via = via_of(request)
    route = choose_route(node, body, None if prompt_ids is None else len(prompt_ids), via)
    record.route = "forwarded" if route.kind == "forward" else "local"
    record.route_reason = route.reason
    if prompt_ids is not None:
        record.prompt_tokens = len(prompt_ids)
    if route.kind == "forward":
        _check_max_tokens(body, config.limits.max_tokens)  # this node's limits hold on its forwards too
        return await serve_forwarded(request, node, raw, body, record, route, via)
    if route.kind == "not_found":
        raise model_not_found(body.model, list({config.model.name, *node.upstreams.known_models()}))
    if route.kind == "loop":
        raise APIError(508, f"The request for `{body.model}` came back to {node.name} through "
                       f"{', '.join(via)}; it is not forwarded again.", type="server_error", code="loop_detected")
    if prompt_ids is None:  # the local model is not ready, and no upstream serves it
        raise EngineNotReady(node.engine.health().reason)
    try:
        return await serve_local(request, node.engine, body, prompt_ids, record, config.limits)
    except ContextLengthExceeded as exc:
        raise APIError(400, str(exc), param="messages" if endpoint == "chat" else "prompt",
                       code="context_length_exceeded") from None


def _check_max_tokens(body: ChatCompletionRequest | CompletionRequest, limit: int | None) -> None:
    """`[limits] max_tokens` for a forwarded request (a local one is checked by `sampling_params`)."""
    requested = body.requested_max_tokens()
    if limit is None or requested is None or requested <= limit:
        return
    chat_limit = isinstance(body, ChatCompletionRequest) and body.max_completion_tokens
    param = "max_completion_tokens" if chat_limit else "max_tokens"
    raise bad_request(f"'{param}' is {requested}, over this server's limit of {limit}.", param,
                      "max_tokens_too_large")
