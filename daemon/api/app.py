"""The aiohttp application: routes, middlewares, limits."""

from __future__ import annotations

from aiohttp import web

from ..metrics import install_metrics
from ..node import Node
from . import forward, openai, ops
from .auth import AUTH, Auth, auth_middleware
from .errors import Handler, error_middleware
from .keys import NODE
from .openapi import openapi_bytes


@web.middleware
async def in_flight_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts requests being served, so a stop can wait for them to finish."""
    node = request.app[NODE]
    node.in_flight += 1
    try:
        return await handler(request)
    finally:
        node.in_flight -= 1


def create_app(node: Node) -> web.Application:
    auth = Auth.from_config(node.config)
    auth.installed = auth.enabled  # no [auth] at start: no middleware, nothing on the request path
    app = web.Application(
        middlewares=[in_flight_middleware, error_middleware, *([auth_middleware] if auth.installed else [])],
        client_max_size=node.config.limits.max_body_bytes,
    )
    app[NODE] = node
    app[AUTH] = auth
    app.cleanup_ctx.append(forward.upstreams_context)  # the client session, forwarding pool, poller
    app.router.add_post("/v1/chat/completions", openai.chat_completions)
    app.router.add_post("/v1/completions", openai.completions)
    app.router.add_get("/v1/models", openai.list_models)
    app.router.add_get("/health", ops.health)
    app.router.add_get("/ready", ops.ready)
    app.router.add_get("/cluster", ops.cluster)
    document = openapi_bytes(bearer=auth.keys is not None, peers=auth.peers is not None)

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    app.router.add_get("/openapi.json", openapi_json)
    install_metrics(app, node)  # GET /metrics, and an observer counting every request
    return app
