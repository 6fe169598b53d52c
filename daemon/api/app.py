"""The aiohttp application: routes, middlewares, limits, and what it owns while it runs."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import AsyncIterator

from aiohttp import web

from ..metrics import install_metrics
from ..metrics.collectors import StoredResponsesCollector
from ..node import Node
from . import canary, completions, models, probes, tokenize
from .appkeys import NODE
from .auth import AUTH, Auth, auth_middleware
from .errors import Handler, error_middleware
from .openapi import openapi_bytes
from .relay import RELAYS, Relays
from .responses_api import endpoint as responses_api
from .responses_api.store import RESPONSE_STORE, ResponseStore


@web.middleware
async def in_flight_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts requests being served, so a stop can wait for them to finish."""
    node = request.app[NODE]
    node.in_flight += 1
    try:
        return await handler(request)
    finally:
        node.in_flight -= 1


def create_app(node: Node, nccl_result: Path | None = None) -> web.Application:
    """`nccl_result`: the file `dsnode bench nccl --publish` writes, read at every scrape (None: none)."""
    auth = Auth.from_config(node.config)
    auth.installed = auth.enabled  # no [auth] at start: no middleware, nothing on the request path
    app = web.Application(
        middlewares=[in_flight_middleware, error_middleware, *([auth_middleware] if auth.installed else [])],
        client_max_size=node.config.limits.max_body_bytes,
    )
    app[NODE] = node
    app[AUTH] = auth
    app[RELAYS] = Relays()
    app[RESPONSE_STORE] = ResponseStore()  # /v1/responses kept for previous_response_id, in memory
    app.cleanup_ctx.append(_upstreams_running)  # the forwarding pool, the poller and its session
    app.router.add_post("/v1/chat/completions", completions.chat_completions)
    app.router.add_post("/v1/completions", completions.completions)
    app.router.add_post("/v1/responses", completions.responses)
    app.router.add_get("/v1/responses/{response_id}", responses_api.get_response)
    app.router.add_delete("/v1/responses/{response_id}", responses_api.delete_response)
    app.router.add_get("/v1/responses/{response_id}/input_items", responses_api.list_input_items)
    app.router.add_get("/v1/models", models.list_models)
    app.router.add_post("/tokenize", tokenize.tokenize)
    app.router.add_post("/detokenize", tokenize.detokenize)
    app.router.add_get("/v1/models/{model_id:.+}", models.get_model)
    app.router.add_get("/health", probes.health)
    app.router.add_get("/ready", probes.ready)
    app.router.add_get("/cluster", probes.cluster)
    app.router.add_get("/canary", canary.show)
    app.router.add_post("/canary/{action}", canary.decide)
    document = openapi_bytes(bearer=auth.keys is not None, peers=auth.peers is not None)

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    app.router.add_get("/openapi.json", openapi_json)
    metrics = install_metrics(app, node, nccl_result)  # GET /metrics, and an observer counting every request
    metrics.registry.register(StoredResponsesCollector(app[RESPONSE_STORE]))
    return app


async def _upstreams_running(app: web.Application) -> AsyncIterator[None]:
    """The node's upstreams run while the app does: started when it starts, stopped when it stops."""
    node = app[NODE]
    ca_file = node.config.tls.ca_file  # trust for https:// upstreams (None: the system store)
    trust = None if ca_file is None else ssl.create_default_context(cafile=str(ca_file))
    await node.upstreams.start(lambda: node.config.routing, trust, app[AUTH].peer_headers)
    try:
        yield
    finally:
        await node.upstreams.stop()
