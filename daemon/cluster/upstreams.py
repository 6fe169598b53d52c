"""This node's upstreams as one object: the balancer's state (pure), plus the connection pool and the
wake-up the poller listens to (both set up by the app's cleanup context, `dsnode.api.forward`).

`Node` owns one `Upstreams`; `NodeServer` registers `reload` as a reloader, so a SIGHUP that changes
`[routing]` swaps the upstream list for new requests while requests in flight keep their peer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from .balancer import Balancer
from .state import UpstreamState

if TYPE_CHECKING:
    from ..config import Config, RoutingSection
    from .pool import Pool

log = structlog.get_logger("dsnode.cluster")


@dataclass(frozen=True)
class ReachableModel:
    name: str
    max_context: int | None  # the largest context limit among the peers serving it
    nodes: tuple[str, ...]


class Upstreams:
    def __init__(self, routing: "RoutingSection") -> None:
        self.balancer = Balancer(routing)
        self.pool: Pool | None = None  # set while the app runs
        self.changed = asyncio.Event()  # set on reload: the poller polls the new list at once

    def reload(self, old: "Config", new: "Config") -> None:
        """A `NodeServer` reloader: apply a new `[routing]` (never raises; the file is valid by now)."""
        if old.routing == new.routing:
            return
        self.balancer.configure(new.routing)
        self.changed.set()
        log.info("upstreams_reloaded", upstreams={u.url: u.weight for u in new.routing.upstream})

    def states(self) -> list[UpstreamState]:
        return self.balancer.states(time.monotonic())

    def known_models(self) -> frozenset[str]:
        return self.balancer.known_models()

    def reachable_models(self) -> list[ReachableModel]:
        """Models that healthy upstreams serve now, for `/v1/models`."""
        now = time.monotonic()
        found: dict[str, tuple[int | None, list[str]]] = {}
        for peer in self.balancer.peers:
            if not peer.healthy(now):
                continue
            for name, limit in peer.models.items():
                best, nodes = found.get(name, (None, []))
                if limit is not None and (best is None or limit > best):
                    best = limit
                found[name] = (best, [*nodes, peer.label])
        return [ReachableModel(name, limit, tuple(nodes)) for name, (limit, nodes) in sorted(found.items())]
