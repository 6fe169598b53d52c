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
    }
