"""An edge and two centrals as separate `dsnode serve` processes on loopback.

The three processes start once for the module and the tests run in file order, each leaving the
cluster as the next expects: weights 3:1 → an invalid reload (still 3:1) → a reload to 1:1 → central-1
killed under load → central-2 killed too. All serve the same model name, so short prompts stay on the
edge and long ones go to a central.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import openai
import pytest

from tests.support.nodes import ServeProcess, free_port, free_port_pair, node_toml, running_cluster, wait_until

pytestmark = pytest.mark.slow

MODEL = "deepseek-r1-tiny"
LONG_PROMPT_TOKENS = 32
WAIT_S = 60.0  # a safety net against hangs, never a measurement
SHORT = "It was the best of times"
LONG = (
    "We hold these truths to be self-evident, that all men are created equal, that they are endowed by "
    "their Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit "
    "of Happiness. Four score and seven years ago"
)


def edge_toml(port: int, dense_dir: Path, centrals: list[tuple[ServeProcess, int]]) -> str:
    upstreams = "".join(f'\n[[routing.upstream]]\nurl = "{c.url}"\nweight = {w}\n' for c, w in centrals)
    routing = f"""[routing]
long_prompt_tokens = {LONG_PROMPT_TOKENS}
poll_interval = 0.5
poll_timeout = 5
max_fails = 1
fail_timeout = 120
first_token_timeout = 60
{upstreams}"""
    return node_toml("edge-1", "edge", port, MODEL, dense_dir, "transformers", extra=routing)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, dense_dir, moe_dir):
    work = tmp_path_factory.mktemp("cluster")
    ports = [free_port() for _ in range(3)]
    centrals = []
    for i, (port, model_dir) in enumerate(zip(ports[:2], (moe_dir, dense_dir))):
        name = f"central-{i + 1}"
        config = work / f"{name}.toml"
        config.write_text(node_toml(name, "central", port, MODEL, model_dir, "transformers"))
        centrals.append(ServeProcess(name, config, port, work / f"{name}.log"))
    edge_config = work / "edge.toml"
    edge_config.write_text(edge_toml(ports[2], dense_dir, [(centrals[0], 3), (centrals[1], 1)]))
    edge = ServeProcess("edge-1", edge_config, ports[2], work / "edge.log")
    with running_cluster(centrals, edge, WAIT_S) as codes:
        yield {"edge": edge, "central-1": centrals[0], "central-2": centrals[1], "dense": dense_dir, "work": work}
    assert codes[-1] == 0, edge.log_tail()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster["edge"].url + "/v1", api_key="unused", max_retries=0, timeout=120)


# --- helpers ---------------------------------------------------------------------------------------------
class Keepalive:
    """Sequential completions over one keep-alive connection: (status, node header, route header)."""

    def __init__(self, node: ServeProcess) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=120)

    def complete(self, prompt: str, max_tokens: int = 1) -> tuple[int, str | None, str | None, dict]:
        body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        self.connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        data = json.loads(response.read())
        return response.status, response.getheader("X-DSNode-Node"), response.getheader("X-DSNode-Route"), data

    def split(self, n: int) -> Counter:
        nodes = Counter()
        for _ in range(n):
            status, node, route, data = self.complete(LONG)
            assert status == 200 and route == "forwarded", data
            nodes[node] += 1
        return nodes


def _weights(edge: ServeProcess) -> list[int]:
    return [p["weight"] for p in edge.get_json("/cluster")["peers"]]


# --- the tests, in order -----------------------------------------------------------------------------------
def test_short_prompts_stay_on_the_edge_and_long_ones_go_to_a_central(cluster, client):
    edge = cluster["edge"]
    with client.completions.with_streaming_response.create(
        model=MODEL, prompt=SHORT, max_tokens=8, temperature=0, stream=True
    ) as response:
        assert (response.headers["x-dsnode-route"], response.headers["x-dsnode-node"]) == ("local", "edge-1")
        short_text = "".join(c.choices[0].text for c in response.parse() if c.choices)
    with client.completions.with_streaming_response.create(
        model=MODEL, prompt=LONG, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    ) as response:
        assert response.headers["x-dsnode-route"] == "forwarded"
        assert response.headers["x-dsnode-node"] in ("central-1", "central-2")
        chunks = list(response.parse())
        long_id = response.headers["x-request-id"]
    assert short_text and "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    chat = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": LONG}], max_tokens=4, temperature=0
    )  # greedy: sampled, the model may end its answer before 4 tokens
    assert chat.headers["x-dsnode-route"] == "forwarded" and chat.parse().usage.completion_tokens == 4
    record = edge.request_records(long_id)[long_id]  # the edge's log record explains the decision
    assert record["route"] == "forwarded" and record["upstream"] in (cluster["central-1"].url, cluster["central-2"].url)
    assert record["route_reason"].endswith(f"tokens > long_prompt_tokens ({LONG_PROMPT_TOKENS})")
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {MODEL}
    assert models[MODEL].model_extra["max_model_len"] == 2048  # the MoE central's context
    assert models[MODEL].model_extra["dsnode"]["nodes"] == ["edge-1", "central-1", "central-2"]


def test_weights_3_and_1_split_400_forwarded_requests_300_and_100(cluster):
    assert Keepalive(cluster["edge"]).split(400) == {"central-1": 300, "central-2": 100}


def test_an_invalid_file_on_sighup_changes_nothing(cluster):
    edge = cluster["edge"]
    good = edge.config_path.read_text()
    try:
        edge.config_path.write_text(good.replace("weight = 1\n", "weight = 0\n"))
        edge.signal(signal.SIGHUP)
        wait_until(lambda: edge.log_events("config_reload_failed"), "the refused reload in the log", WAIT_S)
    finally:
        edge.config_path.write_text(good)
    refused = edge.log_events("config_reload_failed")[-1]
    assert any("routing.upstream[1].weight: must be > 0" in p for p in refused["problems"])
    assert _weights(edge) == [3, 1]
    assert Keepalive(edge).split(8) == {"central-1": 6, "central-2": 2}


def test_a_reload_to_1_and_1_splits_evenly_while_an_earlier_stream_completes(cluster, client):
    edge = cluster["edge"]
    with client.completions.with_streaming_response.create(
        model=MODEL, prompt=LONG, max_tokens=300, temperature=0, stream=True, extra_body={"ignore_eos": True}
    ) as response:
        stream_node = response.headers["x-dsnode-node"]
        events = iter(response.parse())
        first = next(events)  # the stream has started on its upstream
        edge.config_path.write_text(
            edge_toml(edge.port, cluster["dense"], [(cluster["central-1"], 1), (cluster["central-2"], 1)])
        )
        edge.signal(signal.SIGHUP)
        wait_until(lambda: _weights(edge) == [1, 1], "the reload to apply", WAIT_S)
        assert Keepalive(edge).split(20) == {"central-1": 10, "central-2": 10}
        rest = list(events)
    text_chunks = [c for c in [first, *rest] if c.choices]
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in text_chunks if c.choices[0].text) >= 250  # all of it arrived, from one node
    assert stream_node in ("central-1", "central-2")


def test_killing_a_central_under_load_fails_only_streams_it_had_started(cluster, client):
    edge, victim = cluster["edge"], cluster["central-1"]
    outcomes: list[tuple[float, str, int, str | None]] = []  # (started, node, chunks, error)
    done = threading.Event()
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(8):
            node, chunks, error, started = "", 0, None, time.monotonic()
            try:
                with client.completions.with_streaming_response.create(
                    model=MODEL, prompt=LONG, max_tokens=24, temperature=0, stream=True,
                    extra_body={"ignore_eos": True},
                ) as response:
                    node = response.headers["x-dsnode-node"]
                    for _chunk in response.parse():
                        chunks += 1
            except openai.APIError as exc:
                error = str(exc)
            with lock:
                outcomes.append((started, node, chunks, error))
                if len(outcomes) >= 4:
                    done.set()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    done.wait(timeout=120)
    victim.kill()
    killed_at = time.monotonic()
    for thread in threads:
        thread.join(timeout=180)
    assert len(outcomes) == 32
    failed = [o for o in outcomes if o[3] is not None]
    for _, node, chunks, error in failed:  # only streams already under way on the killed node
        assert node == "central-1" and chunks > 0, (node, chunks, error)
        assert "stopped in the middle of the stream" in error
    after = [o for o in outcomes if o[0] > killed_at]  # central-1 was dead before these began
    assert after and all(node == "central-2" and error is None for _, node, _, error in after)
    state = {p["name"]: p for p in edge.get_json("/cluster")["peers"]}
    assert not state["central-1"]["healthy"] and state["central-2"]["healthy"]


def test_with_both_centrals_gone_what_fits_here_is_served_here_and_the_rest_gets_503(cluster, client):
    cluster["central-2"].kill()
    long = client.completions.with_raw_response.create(model=MODEL, prompt=LONG, max_tokens=4)
    assert long.headers["x-dsnode-route"] == "local" and long.parse().choices[0].text  # slower, but served
    with pytest.raises(openai.APIStatusError) as refused:  # too big for the edge's own context (512)
        client.completions.create(model=MODEL, prompt=LONG, max_tokens=600)
    assert refused.value.status_code == 503
    error = refused.value.body
    assert error["code"] == "no_upstream"
    assert error["message"].startswith(f"No upstream can take this request for model `{MODEL}`")
    assert "central-1" in error["message"] and "central-2" in error["message"]
    short = client.completions.with_raw_response.create(model=MODEL, prompt=SHORT, max_tokens=4)
    assert short.headers["x-dsnode-route"] == "local" and short.parse().choices[0].text


def test_demo_once_prints_who_served_each_request(tmp_path, bundled):
    """`dsnode demo --once`: a central and an edge of its own; the short request is the edge's, the
    long one the central's (independent of the cluster above)."""
    import os
    import subprocess
    import sys

    from tests.support.models import cache_dir

    port = free_port_pair()
    run = subprocess.run(
        [sys.executable, "-m", "dsnode.cli", "demo", "--once", "--port", str(port), "--cache-dir", str(cache_dir())],
        check=False, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert not list(tmp_path.glob("dsnode-demo-*")), run.stderr  # a run that went well leaves no configs or logs
    assert "→ served by edge-1 (X-DSNode-Route: local)" in run.stdout
    assert "→ served by central-1 (X-DSNode-Route: forwarded)" in run.stdout
    lines = run.stdout.splitlines()
    assert any(line.startswith("short prompt") and "(X-DSNode-Route: local)" in line for line in lines)
    assert any(line.startswith("long prompt") and "(X-DSNode-Route: forwarded)" in line for line in lines)
