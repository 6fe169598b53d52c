"""The capability advertisement a node publishes at `GET /cluster` and its peers poll."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..probe import memory_available_mib

if TYPE_CHECKING:
    from ..node import Node

ADVERT_VERSION = 1


def advertisement(node: "Node") -> dict[str, Any]:
    readiness = node.readiness()
    load = node.engine.load_figures()
    local = node.local_model_json()
    group = _group(node, local)
    if group is not None and group["role"] == "follower":
        local = None  # its ranks serve the leader's model: peers must not route requests here
    return {
        "advert_version": ADVERT_VERSION,
        "name": node.name,
        "role": node.role,
        "version": node.version,
        "url": node.url,
        "started_at": node.started_at,
        "now": time.time(),
        "ready": readiness.ready,
        "reason": readiness.reason,
        "host": {**node.host.as_json(), "memory_available_mib": memory_available_mib()},
        "models": [local] if local is not None else [],
        "load": {
            "waiting": load.waiting,
            "running": load.running,
            "in_flight": node.in_flight,
            "batch_tokens": load.batch_tokens,
            "batch_token_budget": load.batch_token_budget,
            "max_queue": load.max_queue,
            "tokens_per_second": load.tokens_per_second,
        },
        **({"group": group} if group is not None else {}),
    }


def _group(node: "Node", local: dict[str, Any] | None) -> dict[str, Any] | None:
    """`[distributed]`: this host's part in its central group, as the engine describes it once the
    group has formed (`dsnode.central.host_group`), from the config before."""
    settings = getattr(node.config, "distributed", None)
    if settings is None:
        return None
    formed = ((local or {}).get("details") or {}).get("distributed")
    if isinstance(formed, dict):
        return {"model": node.config.model.name, "state": "formed", **formed}
    return {"model": node.config.model.name, "state": "forming",
            "role": "leader" if settings.is_leader else "follower", "hosts": settings.hosts,
            "host_index": settings.host_index, "ranks_per_host": settings.ranks_per_host,
            "rendezvous": settings.leader}
