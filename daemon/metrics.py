"""`GET /metrics`: Prometheus figures of one node, named as vLLM/TGI users already chart them.

Three sources, one registry per application (never the global one, so several nodes can live in one
process, as in tests):
- every finished request's `RequestRecord` (an observer in `node.observers`): request counts,
  TTFT / inter-token / end-to-end / queue-time histograms, token counters, forwarding per upstream;
- figures read when Prometheus scrapes (custom collectors): the engine's `load_figures()`, the
  balancer's `node.upstream_states()`, NVML GPU readings (`dsnode.gpu`, sampled in a thread), and the
  latest `dsnode bench nccl --publish` result file;
- config reloads, counted by `NodeServer.reload`.

Every metric is described in docs/observability.md.

Request records are counted in batches (docs/performance.md): `observe` queues the record with the
labelled children it counts into, and the queue is folded into the metrics before every collection
(a scrape, `generate_latest`, `get_sample_value`) and whenever it holds `FOLD_EVERY` records. What a
scrape shows is exactly what counting each request at once would show; the counting itself runs
back to back, with warm caches, instead of cold after every request.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .gpu import GpuReading, GpuSampler
from .ops.nccl import default_result_path, read_result
from .record import RequestRecord

if TYPE_CHECKING:
    from .node import Node

FOLD_EVERY = 256  # queued records folded into the metrics at once, at the latest
UNKNOWN_MODEL = "unknown"  # requests naming a model this node can't reach (keeps the label bounded)

# Buckets: vLLM's, extended downwards for small models on CPUs.
# fmt: off
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
QUEUE_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                 80.0, 160.0, 320.0)
# fmt: on


class NodeMetrics:
    """The metrics of one node: its registry, the request observer, and the scrape handler."""

    def __init__(self, node: "Node", gpus: GpuSampler | None = None, nccl_result: Path | None = None) -> None:
        self.node = node
        self.gpus = gpus if gpus is not None else GpuSampler()
        self.registry = CollectorRegistry()
        r = self.registry
        # Queued request records: (the children they count into, the record). Folded by the first
        # collector of the registry, so every collection sees them all.
        self._pending: deque[tuple[_Series, RequestRecord]] = deque()
        r.register(_FoldPending(self.fold))
        self.requests = Counter(
            "dsnode_requests",
            "Completion requests answered, by route and HTTP status.",
            ["model", "endpoint", "route", "status"],
            registry=r,
        )
        self.success = Counter(
            "dsnode_request_success",
            "Requests that finished normally, by finish reason.",
            ["model", "finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "dsnode_time_to_first_token_seconds",
            "Time from request arrival to first token.",
            ["model", "route"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "dsnode_inter_token_latency_seconds",
            "Time between consecutive streamed tokens.",
            ["model", "route"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "dsnode_e2e_request_latency_seconds",
            "Time from request arrival to its last byte.",
            ["model", "route"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "dsnode_request_queue_time_seconds",
            "Time a local request waited for a batch slot.",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "dsnode_prompt_tokens", "Prompt tokens of answered requests.", ["model", "route"], registry=r
        )
        self.generation_tokens = Counter(
            "dsnode_generation_tokens",
            "Tokens generated for answered requests.",
            ["model", "route"],
            registry=r,
        )
        self.forwarded = Counter(
            "dsnode_forwarded_requests",
            "Requests forwarded to an upstream, by status.",
            ["model", "upstream", "status"],
            registry=r,
        )
        self.forward_failures = Counter(
            "dsnode_forward_failures",
            "Forwarded requests that failed at or on the way to the upstream (5xx).",
            ["model", "upstream"],
            registry=r,
        )
        self.reloads = Counter(
            "dsnode_config_reloads",
            "Configuration reloads (SIGHUP), applied or refused.",
            ["result"],
            registry=r,
        )
        for result in ("ok", "failed"):
            self.reloads.labels(result=result)  # both series exist from the start
        r.register(NodeCollector(node))
        r.register(UpstreamCollector(node))
        self.gpu_collector = GpuCollector()
        r.register(self.gpu_collector)
        self.nccl_collector = NcclCollector(nccl_result if nccl_result is not None else default_result_path())
        r.register(self.nccl_collector)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._expose = make_aiohttp_handler(r)
        # The labelled children each kind of request counts into, made on its first request: `labels()`
        # costs more than the `inc()`/`observe()` it leads to, and it ran ~8 times per request.
        self._series: dict[tuple[str, str, str, int, str | None, str | None], _Series] = {}

    # --- request records ----------------------------------------------------------------------
    def observe(self, record: RequestRecord) -> None:
        """Queue a finished request's record (counted at the next fold). Its labelled children are
        made now, so each series' `_created` is its first request's time, as before."""
        model = self._model_label(record)
        upstream = record.upstream if record.route == "forwarded" else None
        key = (model, record.endpoint, record.route, record.status, upstream, record.finish_reason)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(self, *key)
        if record.status < 400:  # the children made on a first value, made at the request's time
            if series.ttft is None and record.first_token is not None:
                series.first_ttft(self)
            if series.queue_time is None and record.queued_s is not None:
                series.first_queue_time(self)
        pending = self._pending
        pending.append((series, record))
        if len(pending) >= FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        """Count every queued record (thread-safe: each is taken off the queue once)."""
        pending = self._pending
        while pending:
            try:
                series, record = pending.popleft()
            except IndexError:  # another thread took the last one
                return
            series.count(self, record)

    def count_reload(self, applied: bool) -> None:
        self.reloads.labels(result="ok" if applied else "failed").inc()

    def _model_label(self, record: RequestRecord) -> str:
        """The requested name if this node can reach it; clients can't grow the label set at will."""
        model = record.model
        if not model:
            return UNKNOWN_MODEL
        if (record.route == "forwarded" and record.status < 400) or model == self.node.config.model.name:
            return model
        return model if model in _reachable_models(self.node) else UNKNOWN_MODEL

    # --- scraping -----------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not self.gpus.unavailable:  # NVML blocks: sample off the event loop
            self.gpu_collector.readings = await asyncio.to_thread(self.gpus.sample)
        self.fold()  # also here: a scrape restricted with name[]= skips the fold collector
        return await self._expose(request)

    async def close(self) -> None:
        if self.gpus.is_open:
            await asyncio.to_thread(self.gpus.close)


class _Series:
    """The children of one (model, endpoint, route, status, upstream, finish reason): what one kind of
    request counts into. A child is made exactly when the uncached code would first have asked for it
    (`labels()` makes a series appear in /metrics, at zero): TTFT and queue time on their first value."""

    __slots__ = ("model", "route", "requests", "prompt_tokens", "generation_tokens", "forwarded",
                 "forward_failures", "success", "ttft", "itl", "e2e", "queue_time")

    def __init__(self, m: NodeMetrics, model: str, endpoint: str, route: str, status: int,
                 upstream: str | None, finish_reason: str | None) -> None:
        code = str(status)
        self.model, self.route = model, route
        self.requests = m.requests.labels(model, endpoint, route, code)
        self.prompt_tokens = m.prompt_tokens.labels(model, route)
        self.generation_tokens = m.generation_tokens.labels(model, route)
        self.forwarded = m.forwarded.labels(model, upstream, code) if upstream else None
        self.forward_failures = m.forward_failures.labels(model, upstream) if upstream and status >= 500 else None
        ok = status < 400  # the rest counts answered requests only
        self.success = m.success.labels(model, finish_reason) if ok and finish_reason else None
        self.itl = m.itl.labels(model, route) if ok else None
        self.e2e = m.e2e.labels(model, route) if ok else None
        self.ttft: Any = None
        self.queue_time: Any = None

    def count(self, m: NodeMetrics, record: RequestRecord) -> None:
        """One request's figures into these children."""
        self.requests.inc()
        self.prompt_tokens.inc(record.prompt_tokens)
        self.generation_tokens.inc(record.completion_tokens)
        if self.forwarded is not None:
            self.forwarded.inc()
            if self.forward_failures is not None:
                self.forward_failures.inc()
        if record.status >= 400:
            return
        if self.success is not None:
            self.success.inc()
        ttft = record.ttft_s
        if ttft is not None:
            (self.ttft or self.first_ttft(m)).observe(ttft)
        times = record.token_times
        if len(times) > 1:
            observe_gap = self.itl.observe
            for a, b in zip(times, times[1:]):
                observe_gap(b - a)
        self.e2e.observe(record.duration_s)
        if record.queued_s is not None:
            (self.queue_time or self.first_queue_time(m)).observe(record.queued_s)

    def first_ttft(self, m: NodeMetrics) -> Any:
        self.ttft = m.ttft.labels(self.model, self.route)
        return self.ttft

    def first_queue_time(self, m: NodeMetrics) -> Any:
        self.queue_time = m.queue_time.labels(self.model)
        return self.queue_time


class _FoldPending(Collector):
    """The registry's first collector: folds the queued request records before the others are read."""

    def __init__(self, fold: Any) -> None:
        self._fold = fold

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        self._fold()
        return iter(())


METRICS: web.AppKey[NodeMetrics] = web.AppKey("metrics", NodeMetrics)


def install_metrics(app: web.Application, node: "Node") -> NodeMetrics:
    """Create the node's metrics, serve them at /metrics, count every request; undone on cleanup."""
    metrics = NodeMetrics(node)
    app[METRICS] = metrics
    node.observers.append(metrics.observe)
    app.router.add_get("/metrics", metrics.handle)

    async def uninstall(app: web.Application) -> None:
        if metrics.observe in node.observers:
            node.observers.remove(metrics.observe)
        await metrics.close()

    app.on_cleanup.append(uninstall)
    return metrics


def _reachable_models(node: "Node") -> set[str]:
    names = {node.config.model.name}
    for state in node.upstream_states():
        for model in (state.advert or {}).get("models", []):
            if isinstance(model, dict) and isinstance(model.get("name"), str):
                names.add(model["name"])
    return names


# --- collectors (read at scrape time) ----------------------------------------------------------------
class NodeCollector(Collector):
    """The engine's backlog and batch, and the node's readiness."""

    def __init__(self, node: "Node") -> None:
        self.node = node

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        node = self.node
        model = node.config.model.name
        info = GaugeMetricFamily(
            "dsnode_node_info",
            "This node: name, role, version, model and backend.",
            labels=["node", "role", "version", "model", "backend"],
        )
        info.add_metric([node.name, node.role, node.version, model, node.config.model.backend], 1)
        yield info
        yield _gauge(
            "dsnode_node_ready",
            "1 when the node accepts work (GET /ready is 200), else 0.",
            [([model], 1.0 if node.readiness().ready else 0.0)],
            ["model"],
        )
        yield _gauge(
            "dsnode_requests_in_flight", "HTTP requests being served right now.", [([], node.in_flight)], []
        )
        try:
            load = node.engine.load_figures()
        except Exception:  # an engine that can't tell yet (loading): leave its figures out
            return
        figures = (
            ("dsnode_num_requests_waiting", "Requests waiting for a batch slot.", load.waiting),
            ("dsnode_num_requests_running", "Requests in the running batch.", load.running),
            ("dsnode_batch_tokens", "KV tokens held by the running batch.", load.batch_tokens),
            (
                "dsnode_batch_token_budget",
                "The batch token budget ([batching] max_batch_tokens).",
                load.batch_token_budget,
            ),
            (
                "dsnode_queue_capacity",
                "Waiting requests accepted before 429 ([batching] max_queue).",
                load.max_queue,
            ),
            (
                "dsnode_generation_throughput_tokens_per_second",
                "Tokens generated per second by the engine over the last 10 s.",
                load.tokens_per_second,
            ),
        )
        for name, doc, value in figures:
            yield _gauge(name, doc, [([model], value)], ["model"])


class UpstreamCollector(Collector):
    """The balancer's view of each configured upstream."""

    def __init__(self, node: "Node") -> None:
        self.node = node

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        states = self.node.upstream_states()
        if not states:
            return
        info = GaugeMetricFamily(
            "dsnode_upstream_info",
            "An upstream's advertised name and role (1).",
            labels=["upstream", "name", "role"],
        )
        for s in states:
            info.add_metric([s.url, s.name or "", s.role or ""], 1)
        yield info
        labels = ["upstream"]
        yield _gauge(
            "dsnode_upstream_healthy",
            "1 while the balancer sends traffic to the upstream, else 0.",
            [([s.url], 1.0 if s.healthy else 0.0) for s in states],
            labels,
        )
        yield _gauge(
            "dsnode_upstream_ready",
            "The upstream's advertised readiness (absent until first polled).",
            [([s.url], 1.0 if s.ready else 0.0) for s in states if s.ready is not None],
            labels,
        )
        yield _gauge(
            "dsnode_upstream_weight",
            "The upstream's configured weight.",
            [([s.url], s.weight) for s in states],
            labels,
        )
        yield _gauge(
            "dsnode_upstream_effective_weight",
            "The balancer's current effective weight (0 while down).",
            [([s.url], s.effective_weight) for s in states],
            labels,
        )
        yield _gauge(
            "dsnode_upstream_reachable",
            "1 when the last advertisement poll answered (absent before it).",
            [([s.url], 1.0 if s.reachable else 0.0) for s in states if s.reachable is not None],
            labels,
        )
        yield _gauge(
            "dsnode_upstream_recent_failures",
            "Failures within the current fail_timeout window.",
            [([s.url], s.fails) for s in states],
            labels,
        )
        yield _gauge(
            "dsnode_upstream_in_flight",
            "Forwarded requests to the upstream being served now.",
            [([s.url], s.in_flight) for s in states],
            labels,
        )
        attempts = CounterMetricFamily(
            "dsnode_upstream_forward_attempts",
            "Attempts to forward to the upstream (retries on another one included).",
            labels=labels,
        )
        for s in states:
            attempts.add_metric([s.url], s.forwarded)
        yield attempts
        yield _gauge(
            "dsnode_upstream_last_seen_timestamp_seconds",
            "Unix time of the last successful advertisement poll.",
            [([s.url], s.last_seen) for s in states if s.last_seen is not None],
            labels,
        )


class GpuCollector(Collector):
    """The latest NVML readings (set by the scrape handler); nothing at all on hosts without NVML."""

    def __init__(self) -> None:
        self.readings: list[GpuReading] = []

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        readings = self.readings
        if not readings:
            return
        info = GaugeMetricFamily(
            "dsnode_gpu_info", "A GPU's name and UUID (1).", labels=["gpu", "name", "uuid"]
        )
        for g in readings:
            info.add_metric([str(g.index), g.name, g.uuid or ""], 1)
        yield info
        figures = (
            (
                "dsnode_gpu_utilization_ratio",
                "Share of the last sample period a kernel ran on the GPU (0-1).",
                "utilization",
            ),
            (
                "dsnode_gpu_memory_bandwidth_utilization_ratio",
                "Share of the last sample period device memory was read or written (0-1).",
                "memory_bandwidth_utilization",
            ),
            ("dsnode_gpu_memory_used_bytes", "GPU memory in use.", "memory_used_bytes"),
            ("dsnode_gpu_memory_total_bytes", "GPU memory in all.", "memory_total_bytes"),
            ("dsnode_gpu_temperature_celsius", "GPU core temperature.", "temperature_celsius"),
            ("dsnode_gpu_power_watts", "GPU power draw.", "power_watts"),
        )
        for name, doc, attr in figures:
            samples = [([str(g.index)], getattr(g, attr)) for g in readings if getattr(g, attr) is not None]
            if samples:
                yield _gauge(name, doc, samples, ["gpu"])


class NcclCollector(Collector):
    """The latest published `dsnode bench nccl` result; re-read only when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._result: dict[str, Any] | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        result = self._latest()
        if result is None:
            return
        labels = ["backend", "world_size", "size_bytes"]
        common = [str(result.get("backend", "")), str(result.get("world_size", ""))]
        rows = [r for r in result["results"] if isinstance(r, dict) and {"bytes", "time_s"} <= r.keys()]
        yield _gauge(
            "dsnode_nccl_allreduce_latency_seconds",
            "Latest measured all-reduce time per message size (dsnode bench nccl --publish).",
            [(common + [str(r["bytes"])], r["time_s"]) for r in rows],
            labels,
        )
        yield _gauge(
            "dsnode_nccl_allreduce_bus_bandwidth_bytes_per_second",
            "Latest measured all-reduce bus bandwidth per message size (nccl-tests busbw).",
            [(common + [str(r["bytes"])], r["busbw_bytes_per_s"]) for r in rows if "busbw_bytes_per_s" in r],
            labels,
        )
        if isinstance(result.get("measured_at"), (int, float)):
            yield _gauge(
                "dsnode_nccl_allreduce_measured_timestamp_seconds",
                "Unix time of the latest published all-reduce measurement.",
                [(common, result["measured_at"])],
                ["backend", "world_size"],
            )

    def _latest(self) -> dict[str, Any] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self._result = None, None
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._stamp, self._result = stamp, read_result(self.path)
        return self._result


def _gauge(
    name: str, doc: str, samples: list[tuple[list[str], float]], labels: list[str]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(values, float(value))
    return family
