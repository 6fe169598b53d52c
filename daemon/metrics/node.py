"""One node's metrics: its registry, the request observer, the scrape handler, and reload counts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, PlatformCollector, ProcessCollector
from prometheus_client.aiohttp import make_aiohttp_handler

from ..gpu import GpuSampler
from ..record import RequestRecord
from .collectors import GpuCollector, NcclCollector, NodeCollector, UpstreamCollector
from .requests import RequestMetrics

if TYPE_CHECKING:
    from ..node import Node

UNKNOWN_MODEL = "unknown"  # requests naming a model this node can't reach (keeps the label bounded)
UNKNOWN_VERSION = "unknown"  # a version header no node known here advertises
NO_VERSION = "none"  # no version answered (the request failed before one was chosen)


class NodeMetrics:
    """The metrics of one node. One registry per node (never the global one), so several nodes can
    live in one process, as in tests."""

    def __init__(self, node: "Node", gpus: GpuSampler | None = None, nccl_result: Path | None = None) -> None:
        self.node = node
        self.gpus = gpus if gpus is not None else GpuSampler()
        self.registry = r = CollectorRegistry()
        self.requests = RequestMetrics(r)
        self.reloads = Counter("dsnode_config_reloads", "Configuration reloads (SIGHUP), applied or refused.",
                               ["result"], registry=r)
        for result in ("ok", "failed"):
            self.reloads.labels(result=result)  # both series exist from the start
        r.register(NodeCollector(node))
        r.register(UpstreamCollector(node))
        self.gpu_collector = GpuCollector()
        r.register(self.gpu_collector)
        self.nccl_collector = NcclCollector(nccl_result)
        r.register(self.nccl_collector)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._expose = make_aiohttp_handler(r)

    def observe(self, record: RequestRecord) -> None:
        """A finished request (a `node.observers` callback)."""
        self.requests.observe(record, self._model_label(record), self._version_label(record))

    def fold(self) -> None:
        self.requests.fold()

    def count_reload(self, applied: bool) -> None:
        self.reloads.labels(result="ok" if applied else "failed").inc()

    def _model_label(self, record: RequestRecord) -> str:
        """The requested name if this node can reach it; clients can't grow the label set at will."""
        model = record.model
        if not model:
            return UNKNOWN_MODEL
        if (record.route == "forwarded" and record.status < 400) or model == self.node.config.model.name:
            return model
        return model if model in self._reachable_models() else UNKNOWN_MODEL

    def _version_label(self, record: RequestRecord) -> str:
        """The version that answered, if this node knows it (served here since start, or advertised by
        an upstream): an upstream's header can't grow the label set at will."""
        version = record.version
        if not version:
            return NO_VERSION
        if version in self.node.versions_served or version in self.node.upstreams.balancer.known_version_ids():
            return version
        return UNKNOWN_VERSION

    def _reachable_models(self) -> set[str]:
        names = {self.node.config.model.name}
        for state in self.node.upstream_states():
            for model in (state.advert or {}).get("models", []):
                if isinstance(model, dict) and isinstance(model.get("name"), str):
                    names.add(model["name"])
        return names

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """`GET /metrics`."""
        if not self.gpus.unavailable:  # NVML blocks: sample off the event loop
            self.gpu_collector.readings = await asyncio.to_thread(self.gpus.sample)
        self.fold()  # also here: a scrape restricted with name[]= skips the fold collector
        return await self._expose(request)

    async def close(self) -> None:
        if self.gpus.is_open:
            await asyncio.to_thread(self.gpus.close)


METRICS: web.AppKey[NodeMetrics] = web.AppKey("metrics", NodeMetrics)


def install_metrics(app: web.Application, node: "Node", nccl_result: Path | None = None) -> NodeMetrics:
    """Create the node's metrics, serve them at /metrics, count every request; undone on cleanup."""
    metrics = NodeMetrics(node, nccl_result=nccl_result)
    app[METRICS] = metrics
    node.observers.append(metrics.observe)
    app.router.add_get("/metrics", metrics.handle)

    async def uninstall(app: web.Application) -> None:
        if metrics.observe in node.observers:
            node.observers.remove(metrics.observe)
        await metrics.close()

    app.on_cleanup.append(uninstall)
    return metrics
