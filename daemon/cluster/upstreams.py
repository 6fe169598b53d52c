"""This node's upstreams as one object: the balancer's state (pure), the forwarding connection pool,
and the advertisement poller with its client session.

`Node` owns one `Upstreams`. The app starts it (`start`: session, pool, poller task, supervised:
restarted with backoff if it fails) and stops it on cleanup (`stop`: poller cancelled and awaited,
pool and session closed). `NodeServer` registers
`reload` as a reloader, so a SIGHUP that changes `[routing]` swaps the upstream list for new requests
while requests in flight keep their peer.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import aiohttp
import structlog

from ..tasks import Supervised
from ..versions import ServedVersion
from .balancer import Balancer
from .peers import Poller, Signer
from .pool import Pool
from .state import UpstreamState

if TYPE_CHECKING:
    from ..config import Config, RoutingSection

log = structlog.get_logger("dsnode.cluster")

@dataclass(frozen=True)
class ReachableModel:
    name: str
    max_context: int | None  # the largest context limit among the peers serving it
    nodes: tuple[str, ...]
    versions: tuple[tuple[ServedVersion, str], ...] = ()  # (version, node) for the peers that say


class Upstreams:
    def __init__(self, routing: "RoutingSection") -> None:
        self.balancer = Balancer(routing)
        self.pool: Pool | None = None  # while started
        self.changed = asyncio.Event()  # set on reload: the poller polls the new list at once
        self._session: aiohttp.ClientSession | None = None
        self.poller: Supervised | None = None  # while started
        self._users = 0  # apps that started it (tests run two apps on one node): stopped by the last

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self, routing: Callable[[], "RoutingSection"], trust: ssl.SSLContext | None,
                    sign: Signer | None) -> None:
        """The pool for forwarding and the poller (its own client session) for advertisements.
        `routing` is read each poll round, so a reload's poll settings apply; `trust` verifies
        https:// upstreams (None: the system store)."""
        self._users += 1
        if self._users > 1:
            return
        self.pool = Pool(trust)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=trust or True))
        poller = Poller(self.balancer, self.changed, self._session, routing, sign=sign)
        self.poller = Supervised("dsnode-poller", poller.run)
        poller.on_round = self.poller.healthy_run
        self.poller.start()

    async def stop(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users:
            return
        if self.poller is not None:
            await self.poller.stop()
            self.poller = None
        pool, self.pool = self.pool, None
        if pool is not None:
            await pool.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- configuration ------------------------------------------------------------------------
    def reload(self, old: "Config", new: "Config") -> None:
        """A `NodeServer` reloader: apply a new `[routing]` (never raises; the file is valid by now)."""
        if old.routing == new.routing:
            return
        self.balancer.configure(new.routing)
        self.changed.set()
        log.info("upstreams_reloaded", upstreams={u.url: u.weight for u in new.routing.upstream})

    # --- views --------------------------------------------------------------------------------
    def states(self) -> list[UpstreamState]:
        return self.balancer.states(time.monotonic())

    def known_models(self) -> frozenset[str]:
        return self.balancer.known_models()

    def model_limits(self, model: str | None = None, version: str | None = None) -> dict[str, int | None]:
        return self.balancer.model_limits(model, version)

    def tokenizers_of(self, model: str) -> set[str | None]:
        return self.balancer.tokenizers_of(model)

    def served_versions(self) -> dict[str, list[ServedVersion]]:
        return self.balancer.served_versions()

    def reachable_models(self) -> list[ReachableModel]:
        """Models that healthy upstreams serve now, for `/v1/models`."""
        now = time.monotonic()
        found: dict[str, tuple[int | None, list[str]]] = {}
        versions: dict[str, list[tuple[ServedVersion, str]]] = {}
        for peer in self.balancer.peers:
            if not peer.healthy(now):
                continue
            for name, limit in peer.models.items():
                best, nodes = found.get(name, (None, []))
                if limit is not None and (best is None or limit > best):
                    best = limit
                found[name] = (best, [*nodes, peer.label])
                if name in peer.versions:
                    versions.setdefault(name, []).append((peer.versions[name], peer.label))
        return [ReachableModel(name, limit, tuple(nodes), tuple(versions.get(name, ())))
                for name, (limit, nodes) in sorted(found.items())]
