"""`GET /metrics` of a node (the real app over the fast tier's FakeEngine) via the aiohttp test client."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import pytest_asyncio
from dsnode.api.app import create_app
from dsnode.cluster.state import UpstreamState
from dsnode.gpu import GpuReading, GpuSampler
from dsnode.metrics import METRICS, NodeMetrics
from dsnode.nccl_result import RESULT_KIND, write_result
from dsnode.node import Node
from dsnode.record import RequestRecord
from dsnode.versions import CanarySection
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon.api.conftest import MODEL, config_text, fake_engines, make_node  # noqa: F401 - a fixture
from tests.support.engines import FakeEngine
from tests.support.fake_nodes import stub_model_dir  # noqa: F401 - a session fixture
from tests.support.tokenizer import fast_tokenizer, fast_tokenizer_dir  # noqa: F401 - session fixtures

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DASHBOARD, PROMETHEUS_YML = CONFIGS / "grafana-dashboard.json", CONFIGS / "prometheus.yml"
CENTRAL, SPARE = "http://10.0.0.10:8000", "http://10.0.0.11:8000"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


async def scrape(client: Any) -> Samples:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return parse(await response.text())


def upstreams() -> list[UpstreamState]:
    return [
        UpstreamState(
            url=CENTRAL,
            weight=3,
            effective_weight=2,
            healthy=True,
            name="central-1",
            role="central",
            ready=True,
            last_seen=1_700_000_000.0,
            fails=0,
            reachable=True,
            forwarded=7,
            in_flight=1,
            advert={"models": [{"name": "deepseek-r1-moe", "max_context": 8192}]},
        ),
        UpstreamState(
            url=SPARE, weight=1, effective_weight=0, healthy=False, last_error="connection refused", fails=2
        ),
    ]


def nccl_result(latency_s: float = 2.5e-5) -> dict[str, Any]:
    return {
        "kind": RESULT_KIND,
        "version": 1,
        "measured_at": 1_700_000_100.0,
        "backend": "nccl",
        "world_size": 2,
        "devices": ["NVIDIA A40"] * 2,
        "dtype": "float32",
        "iters": 20,
        "warmup": 5,
        "results": [
            {
                "bytes": 8,
                "count": 2,
                "time_s": latency_s,
                "time_max_s": latency_s,
                "algbw_bytes_per_s": 8 / latency_s,
                "busbw_bytes_per_s": 8 / latency_s,
                "correct": True,
            }
        ],
    }


A40 = GpuReading(
    index=0,
    name="NVIDIA A40",
    uuid="GPU-0a",
    utilization=0.75,
    memory_bandwidth_utilization=0.5,
    memory_used_bytes=20 * 2**30,
    memory_total_bytes=48 * 2**30,
    temperature_celsius=61.0,
    power_watts=None,
)  # a board that doesn't report power


@pytest_asyncio.fixture
async def node(tmp_path_factory, stub_model_dir, fake_engines) -> AsyncIterator[Node]:  # noqa: F811
    node = await make_node(tmp_path_factory.mktemp("metrics-node"), stub_model_dir, fake_engines)
    yield node
    await node.engine.close()


@pytest_asyncio.fixture
async def client(aiohttp_client: Callable[..., Any], node: Node) -> Any:
    return await aiohttp_client(create_app(node))


async def chat(client: Any, **extra: Any) -> Any:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "It was the"}],
        "max_tokens": 8,
        "temperature": 0,
        **extra,
    }
    return await client.post("/v1/chat/completions", json=body)


async def streamed_usage(response: Any) -> dict[str, int]:
    events = [
        json.loads(line[6:]) for line in (await response.text()).split("\n\n") if line.startswith("data: {")
    ]
    return next(e["usage"] for e in events if e.get("usage"))


async def test_requests_move_counters_and_histograms(client):
    whole = await (await chat(client)).json()
    streamed = await chat(client, stream=True, stream_options={"include_usage": True}, max_tokens=12)
    assert streamed.status == 200
    stream_usage = await streamed_usage(streamed)
    assert (
        await client.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"})
    ).status == 404
    assert (await client.post("/v1/completions", data=b"{not json")).status == 400

    after = await scrape(client)
    ok = dict(model=MODEL, route="local", version="unversioned")  # the stub folder is no store version
    assert value(after, "dsnode_requests_total", endpoint="chat", status="200", **ok) == 2
    assert (
        value(
            after,
            "dsnode_requests_total",
            model="unknown",
            endpoint="completion",
            route="local",
            status="404",
            version="none",
        )
        == 1
    )
    assert (
        value(
            after,
            "dsnode_requests_total",
            model="unknown",
            endpoint="completion",
            route="local",
            status="400",
            version="none",
        )
        == 1
    )
    usages = [whole["usage"], stream_usage]
    assert value(after, "dsnode_prompt_tokens_total", **ok) == sum(u["prompt_tokens"] for u in usages)
    assert value(after, "dsnode_generation_tokens_total", **ok) == sum(u["completion_tokens"] for u in usages)
    for histogram in ("dsnode_time_to_first_token_seconds", "dsnode_e2e_request_latency_seconds"):
        assert value(after, f"{histogram}_count", **ok) == 2
        assert value(after, f"{histogram}_sum", **ok) > 0
        assert value(after, f"{histogram}_bucket", le="+Inf", **ok) == 2
    # one token per engine step: a request with n tokens has n - 1 gaps between them
    gaps = sum(u["completion_tokens"] - 1 for u in usages)
    assert value(after, "dsnode_inter_token_latency_seconds_count", **ok) == gaps
    assert value(after, "dsnode_request_queue_time_seconds_count", model=MODEL, version="unversioned") == 2
    assert value(after, "dsnode_request_queue_time_seconds_sum", model=MODEL, version="unversioned") >= 0
    reasons = {whole["choices"][0]["finish_reason"]}
    assert sum(
        value(after, "dsnode_request_success_total", model=MODEL, finished_reason=r, version="unversioned") or 0
        for r in ("stop", "length")
    ) == 2 and reasons <= {"stop", "length"}
    # a failed request adds to no latency histogram
    assert value(after, "dsnode_e2e_request_latency_seconds_count", model="unknown", route="local",
                 version="none") is None


async def test_engine_figures_are_read_at_scrape_time(client, node):
    samples = await scrape(client)
    load = node.engine.load_figures()
    assert value(samples, "dsnode_num_requests_waiting", model=MODEL) == load.waiting
    assert value(samples, "dsnode_num_requests_running", model=MODEL) == load.running
    assert value(samples, "dsnode_batch_tokens", model=MODEL) == load.batch_tokens
    assert value(samples, "dsnode_batch_token_budget", model=MODEL) == 4096  # [batching] in the test config
    assert value(samples, "dsnode_queue_capacity", model=MODEL) == node.config.batching.max_queue
    assert value(samples, "dsnode_node_ready", model=MODEL) == 1
    assert (
        value(
            samples,
            "dsnode_node_info",
            node="node-under-test",
            role="central",
            version=node.version,
            model=MODEL,
            backend="transformers",
        )
        == 1
    )
    assert value(samples, "dsnode_config_reloads_total", result="ok") == 0
    assert value(samples, "dsnode_config_reloads_total", result="failed") == 0
    assert "process_resident_memory_bytes" in names(samples)


async def test_upstream_state_and_forwarding(client, node):
    """The balancer's figures come from `node.upstream_states()`; forwarding counts from records."""
    previous, node.upstreams_provider = node.upstreams_provider, upstreams
    try:
        metrics = client.app[METRICS]
        for status, model in (
            (200, "deepseek-r1-moe"),
            (200, "deepseek-r1-moe"),
            (502, "deepseek-r1-moe"),
            (404, "made-up"),
        ):
            record = RequestRecord(
                f"r{status}",
                "chat",
                "central-1",
                route="forwarded",
                model=model,
                status=status,
                upstream=CENTRAL,
                prompt_tokens=5,
                completion_tokens=3,
            )
            record.done()
            metrics.observe(record)
        samples = await scrape(client)
    finally:
        node.upstreams_provider = previous
    assert value(samples, "dsnode_upstream_healthy", upstream=CENTRAL) == 1
    assert value(samples, "dsnode_upstream_healthy", upstream=SPARE) == 0
    assert value(samples, "dsnode_upstream_weight", upstream=CENTRAL) == 3
    assert value(samples, "dsnode_upstream_effective_weight", upstream=CENTRAL) == 2
    assert value(samples, "dsnode_upstream_effective_weight", upstream=SPARE) == 0
    assert value(samples, "dsnode_upstream_recent_failures", upstream=SPARE) == 2
    assert value(samples, "dsnode_upstream_forward_attempts_total", upstream=CENTRAL) == 7
    assert value(samples, "dsnode_upstream_in_flight", upstream=CENTRAL) == 1
    assert value(samples, "dsnode_upstream_reachable", upstream=CENTRAL) == 1
    assert value(samples, "dsnode_upstream_reachable", upstream=SPARE) is None
    assert value(samples, "dsnode_upstream_ready", upstream=CENTRAL) == 1
    assert value(samples, "dsnode_upstream_ready", upstream=SPARE) is None  # never polled: absent, not 0
    assert value(samples, "dsnode_upstream_last_seen_timestamp_seconds", upstream=CENTRAL) == 1_700_000_000.0
    assert value(samples, "dsnode_upstream_info", upstream=CENTRAL, name="central-1", role="central") == 1
    moe = dict(model="deepseek-r1-moe", upstream=CENTRAL)
    assert value(samples, "dsnode_forwarded_requests_total", status="200", **moe) == 2
    assert value(samples, "dsnode_forwarded_requests_total", status="502", **moe) == 1
    assert value(samples, "dsnode_forward_failures_total", **moe) == 1
    assert (
        value(samples, "dsnode_forwarded_requests_total", model="unknown", upstream=CENTRAL, status="404")
        == 1
    )
    assert value(samples, "dsnode_generation_tokens_total", model="deepseek-r1-moe", route="forwarded",
                 version="none") == 9
    # without upstreams, no upstream series at all
    assert not {n for n in names(await scrape(client)) if n.startswith("dsnode_upstream_")}


async def test_config_reloads_are_counted(tmp_path, stub_model_dir, fast_tokenizer):  # noqa: F811
    from dsnode.config import load_config
    from dsnode.server import NodeServer

    path = tmp_path / "dsnode.toml"
    path.write_text(config_text(stub_model_dir))
    server = NodeServer(load_config(path), engine=FakeEngine(fast_tokenizer))  # never loaded: not needed here
    registry = server.app[METRICS].registry
    assert await server.reload() is True
    path.write_text(config_text(stub_model_dir) + "\n[routing]\nmax_fails = -1\n")
    assert await server.reload() is False
    assert registry.get_sample_value("dsnode_config_reloads_total", {"result": "ok"}) == 1
    assert registry.get_sample_value("dsnode_config_reloads_total", {"result": "failed"}) == 1


def test_gpu_figures_absent_without_nvml_and_per_device_with_it(node):
    metrics = NodeMetrics(node, nccl_result=Path("/nonexistent/nccl.json"))
    if GpuSampler().sample():
        pytest.skip("this host has NVML GPUs: the no-GPU case can't be seen here")
    assert metrics.gpus.sample() == [] and metrics.gpus.unavailable
    assert not {n for n in names(parse(generate_latest(metrics.registry).decode())) if "gpu" in n}
    metrics.gpu_collector.readings = [
        A40,
        GpuReading(1, "NVIDIA A40", None, 0.0, 0.0, 0, 48 * 2**30, 30.0, 75.5),
    ]
    samples = parse(generate_latest(metrics.registry).decode())
    assert value(samples, "dsnode_gpu_utilization_ratio", gpu="0") == 0.75
    assert value(samples, "dsnode_gpu_memory_bandwidth_utilization_ratio", gpu="0") == 0.5
    assert value(samples, "dsnode_gpu_memory_used_bytes", gpu="0") == 20 * 2**30
    assert value(samples, "dsnode_gpu_temperature_celsius", gpu="0") == 61.0
    assert value(samples, "dsnode_gpu_power_watts", gpu="0") is None  # not reported: absent, not 0
    assert value(samples, "dsnode_gpu_power_watts", gpu="1") == 75.5
    assert value(samples, "dsnode_gpu_utilization_ratio", gpu="1") == 0.0
    assert value(samples, "dsnode_gpu_info", gpu="0", name="NVIDIA A40", uuid="GPU-0a") == 1


def test_nccl_latency_appears_once_published(node, tmp_path):
    path = tmp_path / "nccl-allreduce.json"
    metrics = NodeMetrics(node, nccl_result=path)
    assert (
        metrics.registry.get_sample_value(
            "dsnode_nccl_allreduce_latency_seconds", {"backend": "nccl", "world_size": "2", "size_bytes": "8"}
        )
        is None
    )
    write_result(path, nccl_result(2.5e-5))
    labels = {"backend": "nccl", "world_size": "2", "size_bytes": "8"}
    assert metrics.registry.get_sample_value("dsnode_nccl_allreduce_latency_seconds", labels) == 2.5e-5
    write_result(path, {**nccl_result(4e-5), "measured_at": time.time()})
    assert metrics.registry.get_sample_value("dsnode_nccl_allreduce_latency_seconds", labels) == 4e-5
    path.write_text("{half a file")
    assert metrics.registry.get_sample_value("dsnode_nccl_allreduce_latency_seconds", labels) is None


async def test_two_apps_on_one_node_have_their_own_registries(aiohttp_client, node):
    before = list(node.observers)
    first, second = await aiohttp_client(create_app(node)), await aiohttp_client(create_app(node))
    assert first.app[METRICS].registry is not second.app[METRICS].registry
    assert (await chat(first)).status == 200
    assert (
        value(
            await scrape(first),
            "dsnode_requests_total",
            model=MODEL,
            endpoint="chat",
            route="local",
            status="200",
            version="unversioned",
        )
        == 1
    )
    assert (
        value(
            await scrape(second),
            "dsnode_requests_total",
            model=MODEL,
            endpoint="chat",
            route="local",
            status="200",
            version="unversioned",
        )
        == 1
    )  # every app observes the node's requests
    await first.close()
    await second.close()
    assert node.observers == before


async def test_openmetrics_when_asked(client):
    response = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await response.text()).rstrip().endswith("# EOF")


@pytest_asyncio.fixture
async def full_scrape(client, node, tmp_path) -> str:
    """A scrape with every family present: requests, upstreams, forwarding, splits, GPUs, NCCL."""
    metrics = client.app[METRICS]
    node.splits.configure({MODEL: {"v1": 90, "v2": 10}}, CanarySection())
    path = tmp_path / "nccl.json"
    write_result(path, nccl_result())
    assert (await chat(client)).status == 200
    previous, node.upstreams_provider = node.upstreams_provider, upstreams
    try:
        for status in (200, 502):
            record = RequestRecord(
                f"f{status}",
                "chat",
                "central-1",
                route="forwarded",
                model="deepseek-r1-moe",
                upstream=CENTRAL,
                prompt_tokens=4,
                completion_tokens=2,
            )
            record.mark_token()
            record.mark_token()
            record.done(status)
            metrics.observe(record)
        if metrics.gpus.sample():
            pytest.skip("this host has NVML GPUs; the scrape would mix real and example readings")
        metrics.gpu_collector.readings = [dataclasses.replace(A40, power_watts=180.0)]  # kept: no NVML here
        metrics.nccl_collector.path = path
        response = await client.get("/metrics")
        text = await response.text()
    finally:
        node.upstreams_provider = previous
    return text


async def test_promtool_accepts_the_scrape(full_scrape):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/run does)")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=full_scrape.encode(), capture_output=True, timeout=60
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


async def test_dashboard_uses_only_metrics_that_exist(full_scrape):
    dashboard = json.loads(DASHBOARD.read_text())
    queries = list(_queries(dashboard))
    assert len(queries) >= 15
    used = {name for q in queries for name in re.findall(r"\bdsnode_[a-z0-9_]+", q)}
    exposed = names(parse(full_scrape))
    assert used - exposed == set()
    # and every panel family of the issue is charted
    for wanted in (
        "dsnode_gpu_utilization_ratio",
        "dsnode_gpu_memory_bandwidth_utilization_ratio",
        "dsnode_nccl_allreduce_latency_seconds",
        "dsnode_num_requests_waiting",
        "dsnode_time_to_first_token_seconds_bucket",
        "dsnode_e2e_request_latency_seconds_bucket",
        "dsnode_generation_tokens_total",
        "dsnode_forwarded_requests_total",
        "dsnode_upstream_healthy",
        "dsnode_version_share_percent",
        "dsnode_canary_rollbacks_total",
    ):
        assert wanted in used


def _queries(node: Any) -> Any:
    if isinstance(node, dict):
        for key, item in node.items():
            if key in ("expr", "query") and isinstance(item, str):
                yield item
            elif key == "query" and isinstance(item, dict) and isinstance(item.get("query"), str):
                yield item["query"]
            else:
                yield from _queries(item)
    elif isinstance(node, list):
        for item in node:
            yield from _queries(item)


def test_dashboard_queries_and_scrape_example_pass_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/run does)")
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = ["groups:", "- name: dashboard", "  rules:"]
    for i, expr in enumerate(exprs):  # each PromQL query as a recording rule: promtool parses them all
        rules += [
            f"  - record: dashboard:query{i}",
            f"    expr: {json.dumps(expr.replace('$__rate_interval', '5m'))}",
        ]
    (tmp_path / "rules.yml").write_text("\n".join(rules) + "\n")
    checks = [["check", "rules", str(tmp_path / "rules.yml")], ["check", "config", str(PROMETHEUS_YML)]]
    for check in checks:
        result = subprocess.run([promtool, *check], capture_output=True, timeout=60, check=False)
        assert result.returncode == 0, (result.stdout + result.stderr).decode()


async def test_the_version_label_takes_only_versions_known_here(client, node):
    """An upstream's X-DSNode-Version header can't grow the label set: an id no node known here
    serves is `unknown`; a request no version answered is `none`."""
    metrics = client.app[METRICS]
    for version in (node.served.id, "made-up-by-a-header", None):
        record = RequestRecord(f"r-{version}", "completion", "central-1", route="forwarded", model=MODEL,
                               upstream=CENTRAL, version=version)
        record.done(200)
        metrics.observe(record)
    samples = await scrape(client)
    labels = {dict(labels)["version"] for name, labels in samples if name == "dsnode_requests_total"}
    assert labels == {"unversioned", "unknown", "none"}
