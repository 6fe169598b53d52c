"""Request records are counted in batches (`NodeMetrics.observe` queues, `fold` counts): every way of
reading the metrics must see every record, and the series appear when their first request does."""

from __future__ import annotations

import time
import types
from typing import Any

from aiohttp import web
from dsnode.cluster.splits import Splits
from dsnode.inference.engine import EngineLoad, Health
from dsnode.metrics import FOLD_EVERY, NodeMetrics
from dsnode.record import RequestRecord
from dsnode.versions import CanarySection
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

MODEL = "tiny"
UPSTREAM = "http://10.0.0.10:8000"


def fake_node() -> Any:
    engine = types.SimpleNamespace(load_figures=lambda: EngineLoad(0, 0, 0, 4096, 0.0, 16))
    config = types.SimpleNamespace(model=types.SimpleNamespace(name=MODEL, backend="test"))
    return types.SimpleNamespace(
        config=config, engine=engine, name="edge-1", role="edge", version="0", in_flight=0,
        readiness=lambda: Health(True), upstream_states=list, background_tasks=list,
        splits=Splits({}, CanarySection()), versions_served=set(),
        upstreams=types.SimpleNamespace(balancer=types.SimpleNamespace(known_version_ids=frozenset)),
    )


def metrics() -> NodeMetrics:
    no_gpus = types.SimpleNamespace(unavailable=True, is_open=False, sample=list)
    return NodeMetrics(fake_node(), gpus=no_gpus)


def forwarded(status: int = 200, tokens: int = 3) -> RequestRecord:
    record = RequestRecord("r", "completion", "central-1", route="forwarded", model=MODEL, status=status,
                           upstream=UPSTREAM, prompt_tokens=5, completion_tokens=tokens)
    record.mark_token()
    record.mark_token()
    record.done()
    return record


def requests_total(m: NodeMetrics, status: str = "200") -> float | None:
    return m.registry.get_sample_value(
        "dsnode_requests_total", {"model": MODEL, "endpoint": "completion", "route": "forwarded", "status": status,
                                  "version": "none"}
    )


def test_every_collection_sees_every_queued_record():
    m = metrics()
    for _ in range(5):
        m.observe(forwarded())
    m.observe(forwarded(status=502))
    assert requests_total(m) == 5 and requests_total(m, "502") == 1  # get_sample_value folds first
    m.observe(forwarded(tokens=7))
    text = generate_latest(m.registry).decode()  # so does a plain collection
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("dsnode_generation_tokens_total", (("model", MODEL), ("route", "forwarded"), ("version", "none")))] == 5 * 3 + 3 + 7
    assert samples[("dsnode_forward_failures_total", (("model", MODEL), ("upstream", UPSTREAM)))] == 1
    # two tokens per answered request: one inter-token gap each
    assert samples[("dsnode_inter_token_latency_seconds_count", (("model", MODEL), ("route", "forwarded"), ("version", "none")))] == 6
    assert samples[("dsnode_e2e_request_latency_seconds_count", (("model", MODEL), ("route", "forwarded"), ("version", "none")))] == 6


def test_the_queue_is_folded_every_FOLD_EVERY_records():
    m = metrics()

    def child_total() -> float:  # read from the metric object itself: no fold before reading
        return sum(s.value for f in m.requests.requests.collect() for s in f.samples if s.name == "dsnode_requests_total")

    for _ in range(FOLD_EVERY - 1):
        m.observe(forwarded())
    assert child_total() == 0  # queued
    m.observe(forwarded())
    assert child_total() == FOLD_EVERY  # folded at once, never more than FOLD_EVERY waiting


def test_series_are_created_at_their_first_request_not_at_the_fold():
    m = metrics()
    before = time.time()
    m.observe(forwarded())
    after = time.time()
    time.sleep(0.05)
    created = m.registry.get_sample_value(
        "dsnode_time_to_first_token_seconds_created", {"model": MODEL, "route": "forwarded", "version": "none"}
    )
    assert created is not None and before <= created <= after
    assert before <= requests_created(m) <= after


def requests_created(m: NodeMetrics) -> float:
    value = m.registry.get_sample_value(
        "dsnode_requests_created", {"model": MODEL, "endpoint": "completion", "route": "forwarded", "status": "200",
                                    "version": "none"}
    )
    assert value is not None
    return value


async def test_a_scrape_restricted_by_name_sees_queued_records(aiohttp_client):
    m = metrics()
    app = web.Application()
    app.router.add_get("/metrics", m.handle)
    client = await aiohttp_client(app)
    m.observe(forwarded())
    m.observe(forwarded())
    response = await client.get("/metrics", params={"name[]": "dsnode_requests_total"})
    text = await response.text()
    assert response.status == 200
    line = next(line for line in text.splitlines() if line.startswith("dsnode_requests_total{"))
    assert line.endswith(" 2.0")
