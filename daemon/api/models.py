"""`GET /v1/models`: every model reachable through this node, local or via its upstreams, with the
versions the nodes serve of it (`dsnode.versions`); `GET /v1/models/{id}`: one of them (404
`model_not_found` otherwise)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..node import Node
from ..versions import ServedVersion
from .appkeys import NODE
from .errors import model_not_found


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": reachable_models(request.app[NODE])})


async def get_model(request: web.Request) -> web.Response:
    node = request.app[NODE]
    wanted = request.match_info["model_id"]
    models = reachable_models(node)
    for entry in models:
        if entry["id"] == wanted:
            return web.json_response(entry)
    raise model_not_found(wanted, [entry["id"] for entry in models])


def reachable_models(node: Node) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = []
    local = node.local_model_json()
    if local is not None:
        data.append(_entry(local["name"], int(node.started_at), local.get("max_context"), [node.name], True,
                           local["ready"], [(node.served, node.name)]))
    for model in node.upstreams.reachable_models():  # served by healthy upstreams
        if local is not None and model.name == local["name"]:
            entry = data[0]
            entry["max_model_len"] = max(entry["max_model_len"] or 0, model.max_context or 0) or None
            entry["dsnode"]["nodes"] += model.nodes
            entry["dsnode"]["versions"] = _versions([(node.served, node.name), *model.versions])
            continue
        data.append(_entry(model.name, int(node.started_at), model.max_context, list(model.nodes), False, True,
                           list(model.versions)))
    return data


def _entry(name: str, created: int, max_context: int | None, nodes: list[str], local: bool,
           ready: bool, versions: list[tuple[ServedVersion, str]]) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "dsnode",
        "max_model_len": max_context,
        "dsnode": {"nodes": nodes, "local": local, "ready": ready, "versions": _versions(versions)},
    }


def _versions(served: list[tuple[ServedVersion, str]]) -> list[dict[str, Any]]:
    """Each version once, with the nodes that serve it."""
    found: dict[ServedVersion, list[str]] = {}
    for version, node in served:
        found.setdefault(version, []).append(node)
    return [{"version": v.id, "label": v.label, "nodes": nodes} for v, nodes in found.items()]
