"""Operator endpoints: `/health` (liveness), `/ready` (readiness), `/cluster` (the advertisement)."""

from __future__ import annotations

from dataclasses import asdict

from aiohttp import web

from .advert import advertisement
from .appkeys import NODE
from .canary import splits_state


async def health(request: web.Request) -> web.Response:
    """Liveness: the process is serving HTTP."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: the local model is loaded and the node accepts work."""
    node = request.app[NODE]
    state = node.readiness()
    if state.ready:
        return web.json_response({"status": "ready", "node": node.name, "model": node.config.model.name})
    return web.json_response(
        {"status": "not_ready", "node": node.name, "reason": state.reason},
        status=503,
        headers={"Retry-After": "5"},
    )


async def cluster(request: web.Request) -> web.Response:
    """The advertisement, the peers as the balancer sees them, and this node's splits."""
    node = request.app[NODE]
    peers = [asdict(state) for state in node.upstream_states()]
    return web.json_response({"node": advertisement(node), "peers": peers, "splits": splits_state(node)})
