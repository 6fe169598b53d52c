"""Operator tools against real `dsnode serve` processes: an edge forwarding to a central on loopback.

`dsnode status` sees both nodes, `dsnode bench load` numbers agree with both nodes' /metrics, the live
scrape passes `promtool check metrics`, and the Grafana dashboard charts only metrics that exist.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.nodes import ServeProcess, free_port, node_toml, write_config

pytestmark = pytest.mark.slow

DASHBOARD = Path(__file__).resolve().parents[2] / "configs" / "grafana-dashboard.json"
CENTRAL_MODEL, EDGE_MODEL = "tiny-central", "tiny-edge"


class Cluster:
    def __init__(self, central: ServeProcess, edge: ServeProcess) -> None:
        self.central, self.edge = central, edge


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, dense_dir) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("observability")
    central_port, edge_port = free_port(), free_port()
    central_cfg = write_config(
        work / "central.toml",
        node_toml("central-e2e", "central", central_port, CENTRAL_MODEL, dense_dir, "transformers"),
    )
    edge_cfg = write_config(
        work / "edge.toml",
        node_toml(
            "edge-e2e",
            "edge",
            edge_port,
            EDGE_MODEL,
            dense_dir,
            "transformers",
            extra=f"""
[routing]
poll_interval = 0.5

[[routing.upstream]]
url = "http://127.0.0.1:{central_port}"
weight = 2
""",
        ),
    )
    central = ServeProcess("central", central_cfg, central_port, work / "central.log").start()
    edge = ServeProcess("edge", edge_cfg, edge_port, work / "edge.log").start()
    try:
        central.wait_ready()
        edge.wait_ready()
        _wait_until_polled(edge.url, central.url)
        yield Cluster(central, edge)
    finally:
        edge.stop()
        central.stop()


def _wait_until_polled(edge_url: str, central_url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peers = get_json(f"{edge_url}/cluster")["peers"]
        if any(p["url"] == central_url and p.get("ready") for p in peers):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the edge never saw {central_url} ready: {peers}")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def dsnode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsnode.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_status_shows_both_nodes(cluster):
    run = dsnode("status", "--url", cluster.edge.url)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    edge_line = next(line for line in lines if line.startswith("edge-e2e *"))
    central_line = next(line for line in lines if line.startswith("central-e2e"))
    assert (
        "edge" in edge_line.split()
        and "ready" in edge_line
        and EDGE_MODEL in edge_line
        and "now" in edge_line
    )
    assert "central" in central_line.split() and " ready " in central_line and CENTRAL_MODEL in central_line
    assert "2/2" in central_line and cluster.central.url in central_line and "ago" in central_line

    run = dsnode("status", "--url", cluster.edge.url, "--json")
    assert run.returncode == 0, run.stderr
    nodes = json.loads(run.stdout)["nodes"]
    assert [(n["node"], n["role"], n["this_node"]) for n in nodes] == [
        ("edge-e2e", "edge", True),
        ("central-e2e", "central", False),
    ]
    central = nodes[1]
    assert central["state"] == "ready" and central["weight"] == 2 and central["models"] == [CENTRAL_MODEL]
    assert central["context"] == 512 and central["url"] == cluster.central.url and central["last_seen_s"] < 30


def test_bench_load_agrees_with_both_nodes_metrics(cluster):
    forwarded_key = (
        "dsnode_forwarded_requests_total",
        frozenset({"model": CENTRAL_MODEL, "upstream": cluster.central.url, "status": "200"}.items()),
    )
    central_prompt_key = (  # the central serves a folder outside the model store: `unversioned`
        "dsnode_prompt_tokens_total",
        frozenset({"model": CENTRAL_MODEL, "route": "local", "version": "unversioned"}.items()),
    )
    central_gen_key = (
        "dsnode_generation_tokens_total",
        frozenset({"model": CENTRAL_MODEL, "route": "local", "version": "unversioned"}.items()),
    )
    edge_before, central_before = samples(scrape(cluster.edge.url)), samples(scrape(cluster.central.url))

    run = dsnode(
        "bench",
        "load",
        "--url",
        cluster.edge.url,
        "--model",
        CENTRAL_MODEL,
        "-n",
        "6",
        "-c",
        "2",
        "--mix",
        "8:6:2,60:6:1",
        "--json",
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert "[6/6]" in run.stderr  # progress
    assert report["requests"] == {"sent": 6, "ok": 6, "failed": 0, "without_usage": 0}
    tokens = report["tokens"]
    assert report["nodes"] == [
        {
            "node": "central-e2e",
            "route": "forwarded",
            "requests": 6,
            "prompt_tokens": tokens["prompt"],
            "completion_tokens": tokens["completion"],
        }
    ]
    edge_after, central_after = samples(scrape(cluster.edge.url)), samples(scrape(cluster.central.url))
    assert edge_after[forwarded_key] - edge_before.get(forwarded_key, 0) == 6
    assert (central_after[central_prompt_key] - central_before.get(central_prompt_key, 0)) == tokens["prompt"]
    assert (central_after[central_gen_key] - central_before.get(central_gen_key, 0)) == tokens["completion"]

    run = dsnode(
        "bench",
        "load",
        "--url",
        cluster.edge.url,
        "-n",
        "4",
        "-c",
        "2",
        "--mix",
        "8:4",
        "--no-stream",
        "--json",
        "-q",
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["model"] == EDGE_MODEL  # the first one /v1/models lists: the local one
    assert [(n["node"], n["route"], n["requests"]) for n in report["nodes"]] == [("edge-e2e", "local", 4)]
    assert run.stderr == ""


def test_live_scrape_passes_promtool(cluster):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/run does)")
    for url in (cluster.edge.url, cluster.central.url):
        text = scrape(url)
        result = subprocess.run(
            [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
        )
        assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_edge_scrape_has_its_upstream_and_the_dashboard_only_charts_what_exists(cluster):
    for model in (EDGE_MODEL, CENTRAL_MODEL):  # one local and one forwarded request, whatever ran before
        run = dsnode(
            "bench", "load", "--url", cluster.edge.url, "--model", model, "-n", "1", "--mix", "4:2", "-q"
        )
        assert run.returncode == 0 and "1 ok" in run.stdout, run.stdout + run.stderr
    text = scrape(cluster.edge.url)
    found = samples(text)
    central = frozenset({"upstream": cluster.central.url}.items())
    assert found[("dsnode_upstream_healthy", central)] == 1
    assert found[("dsnode_upstream_effective_weight", central)] == 2
    assert found[("dsnode_upstream_weight", central)] == 2
    exposed = {name for name, _ in found}
    dashboard = DASHBOARD.read_text()
    used = set(re.findall(r"\bdsnode_[a-z0-9_]+", dashboard))
    # GPU and NCCL figures need NVML / a published result, a failure counter a failure, and the split
    # figures a [routing.split]: tests/daemon/test_metrics.py shows those on a scrape where they exist
    elsewhere = ("dsnode_gpu_", "dsnode_nccl_", "dsnode_forward_failures_total", "dsnode_version_share_",
                 "dsnode_canary_")
    missing = {n for n in used - exposed if not n.startswith(elsewhere)}
    assert missing == set()
