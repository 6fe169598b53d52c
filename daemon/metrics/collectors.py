"""Figures read when Prometheus scrapes: the node and its engine, the balancer's upstreams, NVML GPU
readings and the latest published `dsnode bench nccl` result. Each family is a row of a table:
(name, help, how to read its value)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..cluster.state import UpstreamState
from ..gpu import GpuReading
from ..inference.engine import EngineLoad
from ..nccl_result import read_result

if TYPE_CHECKING:
    from ..node import Node

Samples = list[tuple[list[str], float]]

# --- the node and its engine ------------------------------------------------------------------------
_ENGINE_GAUGES: tuple[tuple[str, str, Callable[[EngineLoad], float]], ...] = (
    ("dsnode_num_requests_waiting", "Requests waiting for a batch slot.", lambda e: e.waiting),
    ("dsnode_num_requests_running", "Requests in the running batch.", lambda e: e.running),
    ("dsnode_batch_tokens", "KV tokens held by the running batch.", lambda e: e.batch_tokens),
    ("dsnode_batch_token_budget", "The batch token budget ([batching] max_batch_tokens).",
     lambda e: e.batch_token_budget),
    ("dsnode_queue_capacity", "Waiting requests accepted before 429 ([batching] max_queue).",
     lambda e: e.max_queue),
    ("dsnode_prompt_cache_bytes", "Host memory held by the prompt cache ([batching] prompt_cache_mb).",
     lambda e: e.prompt_cache_bytes),
    ("dsnode_generation_throughput_tokens_per_second",
     "Tokens generated per second by the engine over the last 10 s.", lambda e: e.tokens_per_second),
)


class NodeCollector(Collector):
    """The engine's backlog and batch, and the node's readiness."""

    def __init__(self, node: "Node") -> None:
        self.node = node

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        node = self.node
        model = node.config.model.name
        info = GaugeMetricFamily("dsnode_node_info", "This node: name, role, version, model and backend.",
                                 labels=["node", "role", "version", "model", "backend"])
        info.add_metric([node.name, node.role, node.version, model, node.config.model.backend], 1)
        yield info
        yield gauge("dsnode_node_ready", "1 when the node accepts work (GET /ready is 200), else 0.",
                    [([model], 1.0 if node.readiness().ready else 0.0)], ["model"])
        yield gauge("dsnode_requests_in_flight", "HTTP requests being served right now.",
                    [([], node.in_flight)], [])
        yield from _task_families(node)
        yield from _split_families(node)
        try:
            load = node.engine.load_figures()
        except Exception:  # an engine that can't tell yet (loading): leave its figures out
            return
        for name, doc, read in _ENGINE_GAUGES:
            yield gauge(name, doc, [([model], read(load))], ["model"])


class StoredResponsesCollector(Collector):
    """`/v1/responses` kept for `previous_response_id` ([limits] stored_responses_mb)."""

    def __init__(self, store: Any) -> None:
        self.store = store  # a ResponseStore: its length and `nbytes`

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield gauge("dsnode_stored_responses", "Responses kept in memory for previous_response_id.",
                    [([], float(len(self.store)))], [])
        yield gauge("dsnode_stored_responses_bytes", "Memory held by the stored responses, as JSON "
                    "([limits] stored_responses_mb).", [([], float(self.store.nbytes))], [])


def _task_families(node: "Node") -> Iterator[Metric]:
    tasks = node.background_tasks()
    restarts = CounterMetricFamily("dsnode_background_task_restarts",
                                   "Times a background task failed (or ended) and was started again.", labels=["task"])
    for task in tasks:
        restarts.add_metric([task.name], task.restarts)
    yield restarts
    yield gauge("dsnode_background_task_failing",
                "1 while a background task's last run failed and no run has gone well since, else 0.",
                [([t.name], 1.0 if t.failing else 0.0) for t in tasks], ["task"])


def _split_families(node: "Node") -> Iterator[Metric]:
    """[routing.split]: each version's share in force, and the automatic rollbacks (dsnode.cluster.splits)."""
    splits = node.splits
    shares = [([split.model, key], float(share)) for split in splits.models.values()
              for key, share in split.shares.items()]
    yield gauge("dsnode_version_share_percent", "Share of a model's requests a version gets now (a split).",
                shares, ["model", "version"])
    rolled = [([split.model, key], 1.0 if key in split.decisions and split.decisions[key].action == "rolled_back"
               else 0.0) for split in splits.models.values() for key in split.shares]
    yield gauge("dsnode_canary_rolled_back", "1 while a canary of a split is rolled back.", rolled,
                ["model", "version"])
    counts = {(split.model, key): 0 for split in splits.models.values() for key in split.shares}
    counts.update(splits.rollbacks)
    rollbacks = CounterMetricFamily("dsnode_canary_rollbacks", "Canaries rolled back automatically.",
                                    labels=["model", "version"])
    for (model, key), n in sorted(counts.items()):
        rollbacks.add_metric([model, key], n)
    yield rollbacks


# --- upstreams --------------------------------------------------------------------------------------
# a value of None leaves that upstream out of the family (not known yet)
_UPSTREAM_GAUGES: tuple[tuple[str, str, Callable[[UpstreamState], float | None]], ...] = (
    ("dsnode_upstream_healthy", "1 while the balancer sends traffic to the upstream, else 0.",
     lambda s: 1.0 if s.healthy else 0.0),
    ("dsnode_upstream_ready", "The upstream's advertised readiness (absent until first polled).",
     lambda s: None if s.ready is None else (1.0 if s.ready else 0.0)),
    ("dsnode_upstream_weight", "The upstream's configured weight.", lambda s: s.weight),
    ("dsnode_upstream_effective_weight", "The balancer's current effective weight (0 while down).",
     lambda s: s.effective_weight),
    ("dsnode_upstream_reachable", "1 when the last advertisement poll answered (absent before it).",
     lambda s: None if s.reachable is None else (1.0 if s.reachable else 0.0)),
    ("dsnode_upstream_recent_failures", "Failures within the current fail_timeout window.", lambda s: s.fails),
    ("dsnode_upstream_in_flight", "Forwarded requests to the upstream being served now.",
     lambda s: s.in_flight),
)


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
        info = GaugeMetricFamily("dsnode_upstream_info", "An upstream's advertised name and role (1).",
                                 labels=["upstream", "name", "role"])
        for s in states:
            info.add_metric([s.url, s.name or "", s.role or ""], 1)
        yield info
        for name, doc, read in _UPSTREAM_GAUGES:
            yield gauge(name, doc, _per_upstream(states, read), ["upstream"])
        attempts = CounterMetricFamily(
            "dsnode_upstream_forward_attempts",
            "Attempts to forward to the upstream (retries on another one included).", labels=["upstream"])
        for s in states:
            attempts.add_metric([s.url], s.forwarded)
        yield attempts
        yield gauge("dsnode_upstream_last_seen_timestamp_seconds",
                    "Unix time of the last successful advertisement poll.",
                    _per_upstream(states, lambda s: s.last_seen), ["upstream"])


def _per_upstream(states: list[UpstreamState], read: Callable[[UpstreamState], float | None]) -> Samples:
    return [([s.url], value) for s in states if (value := read(s)) is not None]


# --- GPUs -------------------------------------------------------------------------------------------
_GPU_GAUGES = (
    ("dsnode_gpu_utilization_ratio", "Share of the last sample period a kernel ran on the GPU (0-1).",
     "utilization"),
    ("dsnode_gpu_memory_bandwidth_utilization_ratio",
     "Share of the last sample period device memory was read or written (0-1).", "memory_bandwidth_utilization"),
    ("dsnode_gpu_memory_used_bytes", "GPU memory in use.", "memory_used_bytes"),
    ("dsnode_gpu_memory_total_bytes", "GPU memory in all.", "memory_total_bytes"),
    ("dsnode_gpu_temperature_celsius", "GPU core temperature.", "temperature_celsius"),
    ("dsnode_gpu_power_watts", "GPU power draw.", "power_watts"),
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
        info = GaugeMetricFamily("dsnode_gpu_info", "A GPU's name and UUID (1).", labels=["gpu", "name", "uuid"])
        for g in readings:
            info.add_metric([str(g.index), g.name, g.uuid or ""], 1)
        yield info
        for name, doc, attr in _GPU_GAUGES:
            samples = [([str(g.index)], getattr(g, attr)) for g in readings if getattr(g, attr) is not None]
            if samples:
                yield gauge(name, doc, samples, ["gpu"])


# --- the published all-reduce benchmark -------------------------------------------------------------
class NcclCollector(Collector):
    """The latest published `dsnode bench nccl` result; re-read only when the file changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: this node reads no result file
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
        yield gauge("dsnode_nccl_allreduce_latency_seconds",
                    "Latest measured all-reduce time per message size (dsnode bench nccl --publish).",
                    [(common + [str(r["bytes"])], r["time_s"]) for r in rows], labels)
        yield gauge("dsnode_nccl_allreduce_bus_bandwidth_bytes_per_second",
                    "Latest measured all-reduce bus bandwidth per message size (nccl-tests busbw).",
                    [(common + [str(r["bytes"])], r["busbw_bytes_per_s"]) for r in rows if "busbw_bytes_per_s" in r],
                    labels)
        if isinstance(result.get("measured_at"), (int, float)):
            yield gauge("dsnode_nccl_allreduce_measured_timestamp_seconds",
                        "Unix time of the latest published all-reduce measurement.",
                        [(common, result["measured_at"])], ["backend", "world_size"])

    def _latest(self) -> dict[str, Any] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self._result = None, None
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._stamp, self._result = stamp, read_result(self.path)
        return self._result


def gauge(name: str, doc: str, samples: Samples, labels: list[str]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(values, float(value))
    return family
