"""`POST /v1/chat/completions`, `POST /v1/completions`: the request path, top to bottom.

    parse → limits on the body → count the prompt (local model only) → limit on the prompt
          → the versions to try (a split, `dsnode.api.versioning`) → for each, until one answers:
            route (a pure decision, `dsnode.cluster.routing`) → `serve_local` or `serve_forwarded`

A version of a split that fails before the request's first token hands the request to the next
version (the baseline first); each attempt's outcome goes to the canary rule.

`[limits]` are checked here and only here, for local and forwarded requests alike.

One `RequestRecord` per request, filled on the way and logged once by `Node.observe`, whatever the
outcome.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import web

from .. import headers
from ..cluster.routing import LocalModel, Route, RouteRequest, decide
from ..config import LimitsSection
from ..debug import INJECTED
from ..inference.engine import ContextLengthExceeded, EngineError, EngineNotReady, QueueFull
from ..node import Node, Serving
from ..record import RequestRecord, new_request_id
from .appkeys import NODE
from .auth import admit
from .body import read_json
from .errors import APIError, bad_request, client_gone, model_not_found, to_api_error
from .forward import NotForwarded, not_forwarded, serve_forwarded
from .local import serve_local
from .prompt import prompt_token_ids
from .render import PASS, Render
from .responses_api.endpoint import CHAT_PATH, translate
from .responses_api.request import as_responses_error
from .schemas import Body, ChatCompletionRequest, CompletionRequest, parse_body
from .versioning import BROKEN, TryNextVersion, VersionPlan, failed, local_serves, note_outcome, plan_versions

Prompts = list[list[int]]  # token ids, one list per prompt (a chat has one)
MAX_REQUEST_ID = 128
MAX_HOPS = 3  # a request that passed through this many nodes is not forwarded again


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "completion")


async def responses(request: web.Request) -> web.StreamResponse:
    """OpenAI's Responses API: served as the chat request it stands for (`dsnode.api.responses_api`)."""
    return await _complete(request, "responses")


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
        if endpoint == "responses":  # the Responses API's names for the chat request's parameters
            as_responses_error(error)
        record.done(error.status, error.message)
        if record.version and isinstance(exc, (APIError, EngineError)):  # the version that failed says so
            error.headers[headers.VERSION] = record.version
            if error is not exc:
                raise error from exc
        raise
    finally:
        node.observe(record)


async def _serve(request: web.Request, node: Node, endpoint: str, record: RequestRecord) -> web.StreamResponse:
    if node.draining:
        raise APIError(503, "The node is shutting down.", type="service_unavailable", code="draining",
                       headers={"Retry-After": "5"})
    config = node.config  # read once: a reload during the request does not change its settings
    parsed = await _parse(request, endpoint, config.limits, record)
    body = parsed.body
    check_body_limits(body, config.limits)
    with node.serving() as serving:  # the engine and version in service now, for the whole request
        prompts = await _local_prompts(serving, body)
        check_prompt_limit(body, prompts, config.limits)
        if prompts is not None:
            record.prompt_tokens = sum(map(len, prompts))
        via = via_of(request)
        attempt = _Attempt(request, node, serving, config.limits, parsed, prompts, record, via,
                           plan_versions(node, request, body, via, record))
        for version in attempt.plan.attempts[:-1]:
            try:
                return await attempt.serve(version, last=False)
            except TryNextVersion as exc:
                record.route_reason = f"version {exc.version} failed before the first token ({exc.why}): tried next"
        return await attempt.serve(attempt.plan.attempts[-1], last=True)


class _Attempt:
    """Serving one request with one version (of a split), or with any (no split)."""

    def __init__(self, request: web.Request, node: Node, serving: Serving, limits: LimitsSection, parsed: Parsed,
                 prompts: Prompts | None, record: RequestRecord, via: tuple[str, ...], plan: VersionPlan) -> None:
        self.request, self.node, self.serving, self.limits, self.parsed = request, node, serving, limits, parsed
        self.body, self.prompts, self.record, self.via, self.plan = parsed.body, prompts, record, via, plan

    async def serve(self, version: str | None, last: bool) -> web.StreamResponse:
        node, body, record = self.node, self.body, self.record
        here = local_serves(self.serving, body.model, version)
        prompts = self.prompts if here else None
        route = choose_route(node, self.serving, body, prompts, self.via, version, here)
        record.route = "forwarded" if route.kind == "forward" else "local"
        record.route_reason = f"{record.route_reason}; {route.reason}" if record.route_reason else route.reason
        if route.kind == "not_found":
            raise model_not_found(body.model, list({node.config.model.name, *node.upstreams.known_models()}))
        if route.kind == "loop":
            raise APIError(508, f"The request for `{body.model}` came back to {node.name} through "
                           f"{', '.join(self.via)}; it is not forwarded again.", type="server_error",
                           code="loop_detected")
        if route.kind == "too_long":
            raise _too_long(body, prompts, route)
        if route.kind == "forward":
            served = await self._forward(route, version, last)
            if served is not None:
                return served
        if prompts is None:  # the local model is not ready, and no upstream serves it
            raise EngineNotReady(self.serving.engine.health().reason)
        return await self._here(prompts, version, last)

    async def _forward(self, route: Route, version: str | None, last: bool) -> web.StreamResponse | None:
        """The upstream's answer; None: serve it here (the fallback)."""
        record, started = self.record, time.monotonic()
        try:
            parsed = self.parsed
            response = await serve_forwarded(self.request, self.node, parsed.raw, self.body, record, route, self.via,
                                             version, parsed.path, parsed.render)
        except NotForwarded as exc:
            broken = exc.refused is not None and exc.refused.status in BROKEN
            if broken:  # an upstream of this version answered 5xx; unreachable or busy ones are no verdict
                note_outcome(self.node, self.plan, version, record, started, True)
            if not last:
                raise TryNextVersion(str(version), exc.why) from None
            if not (route.fallback and self.prompts is not None):
                return not_forwarded(exc, self.body, record, route)
            record.route, record.upstream = "local", None
            record.route_reason = f"{route.reason}, but no upstream could take it ({exc.why}): served here"
            return None
        except APIError as exc:
            if exc.status in BROKEN:
                note_outcome(self.node, self.plan, version, record, started, True)
            raise
        note_outcome(self.node, self.plan, version, record, started, failed(record))
        return response

    async def _here(self, prompts: Prompts, version: str | None, last: bool) -> web.StreamResponse:
        node, record, serving = self.node, self.record, self.serving
        record.version, started = serving.version.id, time.monotonic()
        try:
            if node.faults.next_fails(node.config.debug.inject_errors):
                raise EngineError(INJECTED)
            response = await serve_local(self.request, serving.engine, self.body, prompts, record, self.limits,
                                         self.parsed.render)
        except ContextLengthExceeded as exc:
            raise APIError(400, str(exc), param=_prompt_param(self.body), code="context_length_exceeded") from None
        except (EngineNotReady, QueueFull) as exc:  # not ready or busy: no verdict on the version
            if last:
                raise
            record.version = None
            raise TryNextVersion(str(version), str(exc)) from None
        except EngineError as exc:  # before the first token (later ones end the stream inside serve_local)
            note_outcome(node, self.plan, version, record, started, True)
            if last:
                raise
            record.version = None
            raise TryNextVersion(str(version), str(exc)) from None
        note_outcome(node, self.plan, version, record, started, failed(record))
        return response


# --- parse ------------------------------------------------------------------------------------------
def request_id_of(request: web.Request) -> str:
    given = request.headers.get(headers.REQUEST_ID, "")
    if given and len(given) <= MAX_REQUEST_ID and given.isprintable() and " " not in given:
        return given
    return new_request_id()


def via_of(request: web.Request) -> tuple[str, ...]:
    value = request.headers.get(headers.VIA)
    return tuple(n for n in (p.strip() for p in value.split(",")) if n) if value else ()


@dataclass(frozen=True)
class Parsed:
    raw: bytes  # what an upstream is sent: the client's bytes, or the chat request a Responses one stands for
    body: Body
    path: str  # where an upstream is asked
    render: Render  # how the answer (chat's or completions' shape) reaches the client


async def _parse(request: web.Request, endpoint: str, limits: LimitsSection, record: RequestRecord) -> Parsed:
    raw, data = await read_json(request, limits.body_timeout)
    if endpoint == "responses":
        translated = translate(request, data)
        parsed = Parsed(translated.raw, translated.body, CHAT_PATH, translated.render)
    else:
        body = parse_body(ChatCompletionRequest if endpoint == "chat" else CompletionRequest, data)
        parsed = Parsed(raw, body, request.raw_path, PASS)
    record.model, record.stream = parsed.body.model, parsed.body.stream
    record.user = record.user or parsed.body.user  # the API key's name when there is one, never the client's say
    return parsed


async def _local_prompts(serving: Serving, body: Body) -> Prompts | None:
    """The prompts' tokens (one list per prompt), counted only for the local model when it is ready:
    a model only upstreams serve costs no tokenizing."""
    if serving.model == body.model and serving.engine.health().ready:
        return await prompt_token_ids(serving.engine.tokenizer, body)
    return None


# --- route ------------------------------------------------------------------------------------------
def choose_route(node: Node, serving: Serving, body: Body, prompts: Prompts | None, via: tuple[str, ...],
                 version: str | None = None, here: bool = True) -> Route:
    """The pure routing decision, from what this node knows now (several prompts: by the longest).
    With a version (a split), only the nodes that serve it count: the local model when `here`, the
    upstreams that advertise it."""
    ready = here and serving.engine.health().ready
    local = LocalModel(serving.model if here else "", serving.engine.info.max_context if ready else None, ready)
    return decide(
        RouteRequest(body.model, longest(prompts), body.requested_max_tokens()),
        local,
        node.config.routing.long_prompt_tokens,
        node.upstreams.model_limits(body.model, version),
        may_forward=node.name not in via and len(via) < MAX_HOPS,
        stay=_token_ids_stay(node, serving, body, ready) if here else None,
    )


def _token_ids_stay(node: Node, serving: Serving, body: Body, ready: bool) -> str | None:
    """Why a request with token ids for the local model stays here: an upstream serving the model uses
    another tokenizer, or does not say which (its ids would name other tokens there), or the local
    model is loading and which tokenizer is not known yet (the engine's 503 follows). None: it may go."""
    if body.model != serving.model or not body.carries_token_ids():
        return None
    theirs = node.upstreams.tokenizers_of(body.model)
    if not theirs:
        return None
    if not ready:
        return "its token ids are this node's tokenizer's, not known while the model loads"
    if theirs == {serving.engine.tokenizer.digest}:
        return None
    return "its token ids are this node's tokenizer's; an upstream serving the model uses another or does not say"


def _too_long(body: Body, prompts: Prompts | None, route: Route) -> APIError:
    """No node reachable from here can hold the request: final (400), worded as the engine words it,
    with the largest context limit there is."""
    limit = route.limit or 0
    requested = body.requested_max_tokens()
    if prompts is not None:
        message = str(ContextLengthExceeded(longest(prompts) or 0, requested or 0, limit))
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


def check_prompt_limit(body: Body, prompts: Prompts | None, limits: LimitsSection) -> None:
    """`max_prompt_tokens`, for each prompt counted here (a forwarded-only model's is the upstream's)."""
    limit, tokens = limits.max_prompt_tokens, longest(prompts)
    if tokens is not None and limit is not None and tokens > limit:
        raise bad_request(f"The prompt has {tokens} tokens, over this server's limit of {limit}.",
                          _prompt_param(body), "prompt_too_long")


def longest(prompts: Prompts | None) -> int | None:
    return None if prompts is None else max(map(len, prompts))


def _prompt_param(body: Body) -> str:
    return "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
