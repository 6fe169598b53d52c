"""The running node: its configuration, engine and host facts, shared by the HTTP handlers.

The configuration object is replaced as a whole on reload (never mutated); handlers read
`node.config` once per request, so a request in flight keeps the settings it started with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

from . import __version__
from .cluster.state import UpstreamState
from .cluster.upstreams import Upstreams
from .config import Config
from .inference.engine import Engine, Health
from .probe import HostFacts
from .record import RequestRecord
from .tasks import Supervised

log = structlog.get_logger("dsnode.request")

Observer = Callable[[RequestRecord], None]


@dataclass
class Node:
    config: Config
    engine: Engine
    host: HostFacts
    version: str = __version__
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    in_flight: int = 0
    observers: list[Observer] = field(default_factory=list)
    upstreams_provider: Callable[[], list[UpstreamState]] | None = None
    upstreams: Upstreams = field(init=False)  # the balancer's view of [[routing.upstream]]
    tasks: list[Supervised] = field(default_factory=list)  # background tasks others own (the watchdog)

    def __post_init__(self) -> None:
        self.upstreams = Upstreams(self.config.routing)
        if self.upstreams_provider is None:
            self.upstreams_provider = self.upstreams.states

    @property
    def name(self) -> str:
        return self.config.node.name

    @property
    def role(self) -> str:
        return self.config.node.role

    @property
    def url(self) -> str:
        if self.config.node.advertise_url:
            return self.config.node.advertise_url
        host, port = self.config.node.host, self.config.node.port
        scheme = "https" if self.config.tls.cert_file else "http"
        if host in ("0.0.0.0", "::", ""):
            host = self.host.hostname
        return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"

    def background_tasks(self) -> list[Supervised]:
        """Every supervised background task running for this node (for /metrics)."""
        poller = self.upstreams.poller
        return [*([poller] if poller is not None else []), *self.tasks]

    def readiness(self) -> Health:
        if self.draining:
            return Health(False, "draining: the node is shutting down")
        return self.engine.health()

    def serves_locally(self, model: str) -> bool:
        return model == self.config.model.name

    def local_model_json(self) -> dict[str, Any] | None:
        if not self.engine.health().ready:
            return {"name": self.config.model.name, "backend": self.config.model.backend, "ready": False}
        info = self.engine.info
        return {
            "name": info.name,
            "backend": info.backend,
            "architecture": info.architecture,
            "quantization": info.quantization,
            "max_context": info.max_context,
            "device": info.device,
            "tensor_parallel": info.tensor_parallel,
            "ready": True,
            **({"details": info.extra} if info.extra else {}),
        }

    def upstream_states(self) -> list[UpstreamState]:
        """The configured upstreams as this node sees them (the balancer's, unless a test swaps
        `upstreams_provider`)."""
        return self.upstreams_provider() if self.upstreams_provider else []

    def observe(self, record: RequestRecord) -> None:
        """A request ended: log its one record and let observers (metrics) count it."""
        fields = record.fields()
        if record.status >= 500:
            log.error("request", **fields)
        elif record.status >= 400:
            log.warning("request", **fields)
        else:
            log.info("request", **fields)
        for observer in self.observers:
            try:
                observer(record)
            except Exception:
                log.exception("observer_failed", request_id=record.request_id)
