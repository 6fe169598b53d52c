"""`POST /v1/chat/completions`, `POST /v1/completions`: the request path, top to bottom.

    parse → limits on the body → count the prompt (local model only) → limit on the prompt
          → route (a pure decision, `dsnode.cluster.routing`) → `serve_local` or `serve_forwarded`

`[limits]` are checked here and only here, for local and forwarded requests alike.

One `RequestRecord` per request, filled on the way and logged once by `Node.observe`, whatever the
outcome.
"""

from __future__ import annotations

from aiohttp import web

from .. import headers
from ..cluster.routing import LocalModel, Route, RouteRequest, decide
from ..config import LimitsSection
from ..inference.engine import ContextLengthExceeded, EngineNotReady
from ..node import Node
from ..record import RequestRecord, new_request_id
from .appkeys import NODE
from .auth import admit
from .body import read_json
from .errors import APIError, bad_request, client_gone, model_not_found, to_api_error
from .forward import NotForwarded, not_forwarded, serve_forwarded
from .local import serve_local
from .prompt import prompt_token_ids
from .schemas import Body, ChatCompletionRequest, CompletionRequest, parse_body

MAX_REQUEST_ID = 128
MAX_HOPS = 3  # a request that passed through this many nodes is not forwarded again


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "completion")


async def _complete(request: web.Request, endpoint: str) -> web.StreamResponse:
    node = request.app[NODE]
    record = RequestRecord(request_id_of(request), endpoint, node.name, client=request.remote)
    try:
        with admit(request, node.config.limits.max_concurrent_per_key, record):  # identity; 429 per key
            response = await _serve(request, node, endpoint, record)
        record.done(response.status if record.status < 400 else None)
        return response
    except BaseException as exc:
        error = to_api_error(exc) if isinstance(exc, Exception) else client_gone()
        record.done(error.status, error.message)
        raise
    finally:
        node.observe(record)


async def _serve(request: web.Request, node: Node, endpoint: str, record: RequestRecord) -> web.StreamResponse:
    if node.draining:
        raise APIError(503, "The node is shutting down.", type="service_unavailable", code="draining",
                       headers={"Retry-After": "5"})
    config = node.config  # read once: a reload during the request does not change its settings
    raw, body = await _parse(request, endpoint, config.limits, record)
    check_body_limits(body, config.limits)
    prompt_ids = await _local_prompt_ids(node, body)
    check_prompt_limit(body, prompt_ids, config.limits)
    via = via_of(request)
    route = choose_route(node, body, prompt_ids, via)
    record.route = "forwarded" if route.kind == "forward" else "local"
    record.route_reason = route.reason
    if prompt_ids is not None:
        record.prompt_tokens = len(prompt_ids)
    if route.kind == "not_found":
        raise model_not_found(body.model, list({config.model.name, *node.upstreams.known_models()}))
    if route.kind == "loop":
        raise APIError(508, f"The request for `{body.model}` came back to {node.name} through "
                       f"{', '.join(via)}; it is not forwarded again.", type="server_error", code="loop_detected")
    if route.kind == "too_long":
        raise _too_long(body, prompt_ids, route)
    if route.kind == "forward":
        try:
            return await serve_forwarded(request, node, raw, body, record, route, via)
        except NotForwarded as exc:
            if not (route.fallback and prompt_ids is not None):
                return not_forwarded(exc, body, record, route)
            record.route, record.upstream = "local", None
            record.route_reason = f"{route.reason}, but no upstream could take it ({exc.why}): served here"
    if prompt_ids is None:  # the local model is not ready, and no upstream serves it
        raise EngineNotReady(node.engine.health().reason)
    try:
        return await serve_local(request, node.engine, body, prompt_ids, record, config.limits)
    except ContextLengthExceeded as exc:
        raise APIError(400, str(exc), param=_prompt_param(body), code="context_length_exceeded") from None


# --- parse ------------------------------------------------------------------------------------------
def request_id_of(request: web.Request) -> str:
    given = request.headers.get(headers.REQUEST_ID, "")
    if given and len(given) <= MAX_REQUEST_ID and given.isprintable() and " " not in given:
        return given
    return new_request_id()


def via_of(request: web.Request) -> tuple[str, ...]:
    value = request.headers.get(headers.VIA)
    return tuple(n for n in (p.strip() for p in value.split(",")) if n) if value else ()


async def _parse(request: web.Request, endpoint: str, limits: LimitsSection,
                 record: RequestRecord) -> tuple[bytes, Body]:
    raw, data = await read_json(request, limits.body_timeout)
    body = parse_body(ChatCompletionRequest if endpoint == "chat" else CompletionRequest, data)
    record.model, record.stream = body.model, body.stream
    record.user = record.user or body.user  # the API key's name when there is one, never the client's say
    return raw, body


async def _local_prompt_ids(node: Node, body: Body) -> list[int] | None:
    """The prompt's tokens, counted only for the local model when it is ready: a model only
    upstreams serve costs no tokenizing."""
    if node.serves_locally(body.model) and node.engine.health().ready:
        return await prompt_token_ids(node.engine.tokenizer, body)
    return None


# --- route ------------------------------------------------------------------------------------------
def choose_route(node: Node, body: Body, prompt_ids: list[int] | None, via: tuple[str, ...]) -> Route:
    """The pure routing decision, from what this node knows now."""
    health = node.engine.health()
    local = LocalModel(node.config.model.name, node.engine.info.max_context if health.ready else None, health.ready)
    return decide(
        RouteRequest(body.model, None if prompt_ids is None else len(prompt_ids), body.requested_max_tokens()),
        local,
        node.config.routing.long_prompt_tokens,
        node.upstreams.model_limits(),
        may_forward=node.name not in via and len(via) < MAX_HOPS,
    )


def _too_long(body: Body, prompt_ids: list[int] | None, route: Route) -> APIError:
    """No node reachable from here can hold the request: final (400), worded as the engine words it,
    with the largest context limit there is."""
    limit = route.limit or 0
    requested = body.requested_max_tokens()
    if prompt_ids is not None:
        message = str(ContextLengthExceeded(len(prompt_ids), requested or 0, limit))
    else:  # a model only upstreams serve: its prompt was not counted here
        message = (f"This model's maximum context length is {limit} tokens. However, you requested "
                   f"{requested} tokens for the completion alone, and the prompt needs at least one. "
                   "Please reduce max_tokens.")
    return APIError(400, message, param=_prompt_param(body), code="context_length_exceeded")


# --- limits -----------------------------------------------------------------------------------------
def check_body_limits(body: Body, limits: LimitsSection) -> None:
    """Before any work on the request (tokenizing a million messages is work)."""
    if isinstance(body, ChatCompletionRequest) and len(body.messages) > limits.max_messages:
        raise bad_request(f"{len(body.messages)} messages is over this server's limit of {limits.max_messages}.",
                          "messages", "too_many_messages")
    requested = body.requested_max_tokens()
    if limits.max_tokens is not None and requested is not None and requested > limits.max_tokens:
        chat_limit = isinstance(body, ChatCompletionRequest) and body.max_completion_tokens
        param = "max_completion_tokens" if chat_limit else "max_tokens"
        raise bad_request(f"'{param}' is {requested}, over this server's limit of {limits.max_tokens}.", param,
                          "max_tokens_too_large")


def check_prompt_limit(body: Body, prompt_ids: list[int] | None, limits: LimitsSection) -> None:
    """`max_prompt_tokens`, for a prompt counted here (a forwarded-only model's is the upstream's)."""
    limit = limits.max_prompt_tokens
    if prompt_ids is not None and limit is not None and len(prompt_ids) > limit:
        raise bad_request(f"The prompt has {len(prompt_ids)} tokens, over this server's limit of {limit}.",
                          _prompt_param(body), "prompt_too_long")


def _prompt_param(body: Body) -> str:
    return "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
