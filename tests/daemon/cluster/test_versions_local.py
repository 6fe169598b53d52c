"""Versions on the local route: a node's own version in its answers, its advertisement and /v1/models;
`[debug] inject_errors`; a split between the node's own version (a canary) and an upstream's (the
baseline): the local canary's failures are retried upstream and roll it back."""

from __future__ import annotations

import json

from structlog.testing import capture_logs

from .conftest import LOCAL_MODEL

BASELINE = "3865e12a1eb7"


def short(**extra):
    return {"model": LOCAL_MODEL, "prompt": "Hi", "max_tokens": 2, **extra}


async def test_the_node_says_which_version_it_serves(local_node):
    node, client, _ = await local_node(extra_model='label = "2026-12"')
    response = await client.post("/v1/completions", json=short())
    assert response.status == 200 and response.headers["X-DSNode-Version"] == "2026-12"
    streamed = await client.post("/v1/completions", json=short(stream=True))
    assert streamed.headers["X-DSNode-Version"] == "2026-12"
    await streamed.read()
    advert = (await (await client.get("/cluster")).json())["node"]
    assert advert["models"][0]["version"] == "2026-12" and advert["models"][0]["version_label"] == "2026-12"
    [model] = (await (await client.get("/v1/models")).json())["data"]
    assert model["dsnode"]["versions"] == [{"version": "2026-12", "label": "2026-12", "nodes": ["edge-under-test"]}]
    metrics = await (await client.get("/metrics")).text()
    assert ('dsnode_requests_total{endpoint="completion",model="tiny-dense",route="local",status="200",'
            'version="2026-12"} 2.0') in metrics


async def test_injected_errors_fail_exactly_that_share_before_the_first_token(local_node):
    _, client, engine = await local_node(extra_model='label = "v9"', debug="inject_errors = 0.3")
    statuses = []
    for _ in range(20):
        response = await client.post("/v1/completions", json=short())
        statuses.append(response.status)
        if response.status != 200:
            error = (await response.json())["error"]
            assert error["code"] == "engine_error" and "inject_errors" in error["message"]
            assert response.headers["X-DSNode-Version"] == "v9"  # the version that failed says so
    assert statuses.count(500) == 6 and statuses.count(200) == 14
    assert len(engine.requests) == 14  # the injected ones never reached the engine


async def test_a_local_canary_that_fails_is_retried_upstream_and_rolled_back(local_node, fakes):
    central = await fakes("central-a", model=LOCAL_MODEL, version=BASELINE, version_label="2026-11")
    routing = (f'[routing.split."{LOCAL_MODEL}"]\n"2026-11" = 50\n"2026-12" = 50\n\n'
               "[routing.canary]\nwindow = 10\nmin_requests = 4\nerror_rate_margin = 0.2\n")
    node, client, engine = await local_node(extra_model='label = "2026-12"', routing=routing,
                                            upstreams=[(central.url, 1)], debug="inject_errors = 0.5")
    with capture_logs() as logs:
        answers = [await client.post("/v1/completions", json=short()) for _ in range(40)]
    assert {a.status for a in answers} == {200}
    versions = [a.headers["X-DSNode-Version"] for a in answers]
    # the canary (this node) had 50% until rolled back: its failures went to the baseline upstream
    [event] = [e for e in logs if e["event"] == "canary_rolled_back"]
    assert event["version"] == "2026-12" and event["canary"]["requests"] == 4 and event["canary"]["errors"] == 2
    assert versions.count("2026-12") == len(engine.requests) == 2
    assert node.splits.models[LOCAL_MODEL].shares == {"2026-11": 100, "2026-12": 0}
    assert versions[-10:] == [BASELINE] * 10
    body = json.loads(await answers[-1].read())
    assert body["choices"][0]["text"] == "from central-a"
