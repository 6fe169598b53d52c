"""`POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`."""

from __future__ import annotations

import json
import uuid

from aiohttp import web

from ..engine import ContextLengthExceeded
from ..node import Node
from . import headers
from .errors import APIError, bad_request, model_not_found, to_api_error
from .keys import NODE
from .local import prompt_token_ids, serve_local
from .record import RequestRecord
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
    return web.json_response({"object": "list", "data": data})


def request_id_of(request: web.Request) -> str:
    given = request.headers.get(headers.REQUEST_ID, "")
    if given and len(given) <= MAX_REQUEST_ID and given.isprintable() and " " not in given:
        return given
    return uuid.uuid4().hex


async def read_json(request: web.Request) -> object:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}", code="invalid_json") from None


async def _complete(request: web.Request, endpoint: str) -> web.StreamResponse:
    node = request.app[NODE]
    record = RequestRecord(request_id_of(request), endpoint, node.name, client=request.remote)
    try:
        response = await _dispatch(request, node, endpoint, record)
        record.done(response.status if record.status < 400 else None)
        return response
    except BaseException as exc:
        error = to_api_error(exc) if isinstance(exc, Exception) else APIError(499, "client went away")
        record.done(error.status, error.message)
        raise
    finally:
        node.observe(record)


async def _dispatch(request: web.Request, node: Node, endpoint: str, record: RequestRecord) -> web.StreamResponse:
    if node.draining:
        raise APIError(503, "The node is shutting down.", type="service_unavailable", code="draining",
                       headers={"Retry-After": "5"})
    body = parse_body(ChatCompletionRequest if endpoint == "chat" else CompletionRequest, await read_json(request))
    record.model, record.stream, record.user = body.model, body.stream, body.user
    config = node.config
    if isinstance(body, ChatCompletionRequest) and len(body.messages) > config.limits.max_messages:
        raise bad_request(
            f"{len(body.messages)} messages is over this server's limit of {config.limits.max_messages}.",
            "messages", "too_many_messages",
        )
    if not node.serves_locally(body.model):
        raise model_not_found(body.model, [config.model.name])
    prompt_ids = await prompt_token_ids(node.engine.tokenizer, body)
    if config.limits.max_prompt_tokens is not None and len(prompt_ids) > config.limits.max_prompt_tokens:
        raise bad_request(
            f"The prompt has {len(prompt_ids)} tokens, over this server's limit of "
            f"{config.limits.max_prompt_tokens}.", "messages" if endpoint == "chat" else "prompt",
            "prompt_too_long",
        )
    record.route, record.route_reason = "local", "model served locally"
    try:
        return await serve_local(request, node.engine, body, prompt_ids, record, config.limits)
    except ContextLengthExceeded as exc:
        raise APIError(400, str(exc), param="messages" if endpoint == "chat" else "prompt",
                       code="context_length_exceeded") from None
