"""`GET /canary` and `POST /canary/{promote,rollback,reset}`: this node's splits, and an operator's
decisions about them (`dsnode canary`, docs/versions.md).

    POST /canary/promote   {"model": "deepseek-r1", "version": "2026-12"}   the version gets 100%
    POST /canary/rollback  {"model": "deepseek-r1", "version": "2026-12"}   its share goes to the baseline
    POST /canary/reset     {"model": "deepseek-r1"}                         the configured shares again

`version` may be left out when the split has one canary. A decision changes where this node sends
requests: with a cluster secret (`[auth] cluster_secret_file`) it needs the cluster credential
(`dsnode canary --secret-file`); without one, it is taken only from this host (loopback).
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any

import structlog
from aiohttp import web

from ..cluster.splits import cluster_problems
from ..node import Node
from ..versions import ServedVersion
from .appkeys import NODE
from .auth import AUTH, PEER
from .body import read_json
from .errors import APIError, bad_request
from .versioning import log_decision

log = structlog.get_logger("dsnode.canary")

ACTIONS = ("promote", "rollback", "reset")
BODY_TIMEOUT_S = 10.0


def served_versions(node: Node, also: tuple[str, ServedVersion] | None = None) -> dict[str, list[ServedVersion]]:
    """model → the versions served by this node (and `also`: a model and version it is about to
    serve) and by the upstreams that advertised (healthy now or not)."""
    served = node.upstreams.served_versions()
    for entry in ((node.config.model.name, node.served), also):
        if entry is not None:
            local = served.setdefault(entry[0], [])
            if entry[1] not in local:
                local.append(entry[1])
    return served


def splits_state(node: Node) -> list[dict[str, Any]]:
    """Each split: shares configured and in force, each version's window, decisions, and what the
    cluster as this node sees it does not serve."""
    state = node.splits.state(time.monotonic())
    problems = cluster_problems(node.config.routing.split, served_versions(node))
    for entry in state:
        entry["problems"] = [f"{key}: {why}" for model, key, why in problems if model == entry["model"]]
    return state


async def show(request: web.Request) -> web.Response:
    return web.json_response({"node": request.app[NODE].name, "splits": splits_state(request.app[NODE])})


async def decide(request: web.Request) -> web.Response:
    node = request.app[NODE]
    action = request.match_info["action"]
    if action not in ACTIONS:
        raise APIError(404, f"No such canary action `{action}` (actions: {', '.join(ACTIONS)}).", code="not_found")
    _check_operator(request)
    model, version = await _read_target(request)
    split = node.splits.split_of(model)  # SplitError → 409 (dsnode.api.errors)
    if action == "reset":
        split.reset()
        log.info("canary_reset", model=model)
        return web.json_response({"decision": None, "split": split.state(time.monotonic())})
    if action == "promote":
        decision = split.promote(version, time.time())
    else:
        decision = split.roll_back(version, time.time(), time.monotonic())
    log_decision(decision)
    return web.json_response({"decision": decision.as_json(), "split": split.state(time.monotonic())})


def _check_operator(request: web.Request) -> None:
    if request.app[AUTH].peers is not None:
        if request.get(PEER) is None:
            raise APIError(403, "A canary decision needs the cluster credential (dsnode canary --secret-file).",
                           type="permission_error", code="operator_only")
        return
    if not _loopback(request.remote):
        raise APIError(403, "A canary decision is taken only from this node's own host (no cluster secret "
                       "is configured to prove an operator elsewhere).", type="permission_error", code="operator_only")


def _loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


async def _read_target(request: web.Request) -> tuple[str, str | None]:
    _, data = await read_json(request, BODY_TIMEOUT_S)
    if not isinstance(data, dict) or not isinstance(data.get("model"), str):
        raise bad_request("The body must be a JSON object with a `model` (and a `version`).", "model")
    version = data.get("version")
    if version is not None and not isinstance(version, str):
        raise bad_request("`version` must be a string.", "version")
    return data["model"], version
