"""Per-request figures: every finished request's `RequestRecord`, counted into labelled families.

Records are counted in batches (docs/performance.md): `observe` queues the record with the labelled
children it counts into, and the queue is folded into the metrics before every collection (a scrape,
`generate_latest`, `get_sample_value`) and whenever it holds `FOLD_EVERY` records. What a scrape shows
is exactly what counting each request at once would show; the counting itself runs back to back, with
warm caches, instead of cold after every request.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from ..record import RequestRecord

FOLD_EVERY = 256  # queued records folded into the metrics at once, at the latest

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

# attribute, name, help, labels, histogram buckets (None: a counter)
_FAMILIES: tuple[tuple[str, str, str, tuple[str, ...], tuple[float, ...] | None], ...] = (
    ("requests", "dsnode_requests", "Completion requests answered, by route and HTTP status.",
     ("model", "endpoint", "route", "status", "version"), None),
    ("success", "dsnode_request_success", "Requests that finished normally, by finish reason.",
     ("model", "finished_reason", "version"), None),
    ("ttft", "dsnode_time_to_first_token_seconds", "Time from request arrival to first token.",
     ("model", "route", "version"), TTFT_BUCKETS),
    ("itl", "dsnode_inter_token_latency_seconds", "Time between consecutive streamed tokens.",
     ("model", "route", "version"), ITL_BUCKETS),
    ("e2e", "dsnode_e2e_request_latency_seconds", "Time from request arrival to its last byte.",
     ("model", "route", "version"), E2E_BUCKETS),
    ("queue_time", "dsnode_request_queue_time_seconds", "Time a local request waited for a batch slot.",
     ("model", "version"), QUEUE_BUCKETS),
    ("prompt_tokens", "dsnode_prompt_tokens", "Prompt tokens of answered requests.", ("model", "route", "version"),
     None),
    ("cached_tokens", "dsnode_prompt_cached_tokens",
     "Prompt tokens of answered requests that the serving node's prompt cache gave, not computed.",
     ("model", "route", "version"), None),
    ("generation_tokens", "dsnode_generation_tokens", "Tokens generated for answered requests.",
     ("model", "route", "version"), None),
    ("forwarded", "dsnode_forwarded_requests", "Requests forwarded to an upstream, by status.",
     ("model", "upstream", "status"), None),
    ("forward_failures", "dsnode_forward_failures",
     "Forwarded requests that failed at or on the way to the upstream (5xx).", ("model", "upstream"), None),
)

# model, endpoint, route, status, upstream, finish reason, version
SeriesKey = tuple[str, str, str, int, "str | None", "str | None", str]


class RequestMetrics:
    """The per-request families of one registry, and the queue of records not counted yet."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # The registry's first collector folds the queue, so every collection sees every record.
        registry.register(_FoldPending(self.fold))
        for attribute, name, doc, labels, buckets in _FAMILIES:
            family = Counter(name, doc, labels, registry=registry) if buckets is None else \
                Histogram(name, doc, labels, buckets=buckets, registry=registry)
            setattr(self, attribute, family)
        self._pending: deque[tuple[_Series, RequestRecord]] = deque()
        # The labelled children each kind of request counts into, made on its first request: `labels()`
        # costs more than the `inc()`/`observe()` it leads to, and it ran ~8 times per request.
        self._series: dict[SeriesKey, _Series] = {}

    def observe(self, record: RequestRecord, model: str, version: str) -> None:
        """Queue a finished request's record (counted at the next fold). Its labelled children are
        made now, so each series' `_created` is its first request's time. `model` and `version`: the
        label values (bounded by the caller)."""
        upstream = record.upstream if record.route == "forwarded" else None
        key = (model, record.endpoint, record.route, record.status, upstream, record.finish_reason, version)
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


class _Series:
    """The children of one (model, endpoint, route, status, upstream, finish reason, version): what one
    kind of request counts into. A child is made exactly when the uncached code would first have asked
    for it (`labels()` makes a series appear in /metrics, at zero): TTFT and queue time on their first value."""

    __slots__ = ("model", "route", "version", "requests", "prompt_tokens", "cached_tokens", "generation_tokens",
                 "forwarded", "forward_failures", "success", "ttft", "itl", "e2e", "queue_time")

    def __init__(self, m: Any, model: str, endpoint: str, route: str, status: int,
                 upstream: str | None, finish_reason: str | None, version: str) -> None:
        code = str(status)
        self.model, self.route, self.version = model, route, version
        self.requests = m.requests.labels(model, endpoint, route, code, version)
        self.prompt_tokens = m.prompt_tokens.labels(model, route, version)
        self.cached_tokens = m.cached_tokens.labels(model, route, version)
        self.generation_tokens = m.generation_tokens.labels(model, route, version)
        self.forwarded = m.forwarded.labels(model, upstream, code) if upstream else None
        self.forward_failures = m.forward_failures.labels(model, upstream) if upstream and status >= 500 else None
        ok = status < 400  # the rest counts answered requests only
        self.success = m.success.labels(model, finish_reason, version) if ok and finish_reason else None
        self.itl = m.itl.labels(model, route, version) if ok else None
        self.e2e = m.e2e.labels(model, route, version) if ok else None
        self.ttft: Any = None
        self.queue_time: Any = None

    def count(self, m: Any, record: RequestRecord) -> None:
        """One request's figures into these children."""
        self.requests.inc()
        self.prompt_tokens.inc(record.prompt_tokens)
        self.cached_tokens.inc(record.cached_tokens)
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

    def first_ttft(self, m: Any) -> Any:
        self.ttft = m.ttft.labels(self.model, self.route, self.version)
        return self.ttft

    def first_queue_time(self, m: Any) -> Any:
        self.queue_time = m.queue_time.labels(self.model, self.version)
        return self.queue_time


class _FoldPending(Collector):
    """The registry's first collector: folds the queued request records before the others are read."""

    def __init__(self, fold: Callable[[], None]) -> None:
        self._fold = fold

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        self._fold()
        return iter(())
