"""The running node: its configuration, engine and host facts, shared by the HTTP handlers.

The configuration object is replaced as a whole on reload (never mutated); handlers read
`node.config` once per request, so a request in flight keeps the settings it started with. A request
that may use the engine holds a lease on it (`serving`): a reload onto another model version
(`dsnode.server`) installs the new engine for new requests and closes the old one once its last
lease is given back.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import structlog

from . import __version__
from .cluster.splits import Splits
from .cluster.state import UpstreamState
from .cluster.upstreams import Upstreams
from .config import Config
from .debug import InjectedFaults
from .inference.engine import Engine, Health
from .probe import HostFacts
from .record import RequestRecord
from .tasks import Supervised
from .versions import ServedVersion, served_version

log = structlog.get_logger("dsnode.request")

Observer = Callable[[RequestRecord], None]


@dataclass(frozen=True)
class Serving:
    """What one request uses of the local model: the engine and version in service when it began."""

    engine: Engine
    version: ServedVersion
    model: str  # its name


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
    switching: str | None = None  # why the local model takes no new requests (a version switch)
    served: ServedVersion = field(init=False)  # the version of the model in service
    versions_served: set[str] = field(init=False)  # every version id served here since start (metrics)
    splits: Splits = field(init=False)  # [routing.split]: shares, windows, rollbacks
    faults: InjectedFaults = field(default_factory=InjectedFaults)  # [debug] inject_errors
    _leases: dict[int, int] = field(default_factory=dict)  # id(engine) → requests holding it
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.upstreams = Upstreams(self.config.routing)
        if self.upstreams_provider is None:
            self.upstreams_provider = self.upstreams.states
        self.served = served_version(self.config.model_version, self.config.model.label)
        self.versions_served = {self.served.id}
        self.splits = Splits(self.config.routing.split, self.config.routing.canary)

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
        if self.switching is not None:
            return Health(False, self.switching)
        return self.engine.health()

    # --- the engine in service ----------------------------------------------------------------
    @contextmanager
    def serving(self) -> Iterator[Serving]:
        """The engine and version in service now, held for one request."""
        engine = self.engine
        key = id(engine)
        self._leases[key] = self._leases.get(key, 0) + 1
        try:
            yield Serving(engine, self.served, self.config.model.name)
        finally:
            left = self._leases[key] - 1
            if left:
                self._leases[key] = left
            else:
                del self._leases[key]
                self._released.set()

    def install(self, config: Config, engine: Engine) -> Engine:
        """Put another model (version) in service, for the requests that begin from now on; returns the
        engine it replaces (requests that hold it finish on it). `config`: the node's config with its
        new `[model]`."""
        old, self.engine, self.config = self.engine, engine, config
        self.served = served_version(config.model_version, config.model.label)
        self.versions_served.add(self.served.id)
        return old

    async def released(self, engine: Engine, timeout: float) -> bool:
        """Wait until no request holds `engine`; False if `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout
        while self._leases.get(id(engine)):
            self._released.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._released.wait(), left)
            except TimeoutError:
                return False
        return True

    def serves_locally(self, model: str) -> bool:
        return model == self.config.model.name

    def local_model_json(self) -> dict[str, Any] | None:
        version = {"version": self.served.id, "version_label": self.served.label}
        if not self.engine.health().ready:
            return {"name": self.config.model.name, "backend": self.config.model.backend, "ready": False, **version}
        info = self.engine.info
        return {
            "name": info.name,
            **version,
            "backend": info.backend,
            "architecture": info.architecture,
            "quantization": info.quantization,
            "max_context": info.max_context,
            "device": info.device,
            "tensor_parallel": info.tensor_parallel,
            "tokenizer": self.engine.tokenizer.digest,  # sha256 of tokenizer.json: what token ids mean here
            "ready": True,
            **({"details": info.extra} if info.extra else {}),
        }

    def upstream_states(self) -> list[UpstreamState]:
        """The configured upstreams as this node sees them (the balancer's, unless a test swaps
        `upstreams_provider`)."""
        return self.upstreams_provider() if self.upstreams_provider else []

    def observe(self, record: RequestRecord) -> None:
        """A request ended: log its one record and let observers (metrics) count it."""
        log_request(record)
        for observer in self.observers:
            try:
                observer(record)
            except Exception:
                log.exception("observer_failed", request_id=record.request_id)


def log_request(record: RequestRecord) -> None:
    """A request's one log record (a warning for 4xx, an error for 5xx)."""
    fields = record.fields()
    if record.status >= 500:
        log.error("request", **fields)
    elif record.status >= 400:
        log.warning("request", **fields)
    else:
        log.info("request", **fields)
