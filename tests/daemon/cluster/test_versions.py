"""Splits on the forwarding path, through a real node to scripted upstreams that advertise versions:
the share per version before the node choice, sticky users, a canary's 5xx retried on the baseline
and judged, a canary that is down not judged, and the operator's commands over HTTP."""

from __future__ import annotations

import json
from collections import Counter

from dsnode.cluster.split import sticky_pick
from structlog.testing import capture_logs

from .fakes import MODEL

BODY = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
V1, V2 = "3865e12a1eb7", "0a1b2c3d4e5f"


def split(shares: str, canary: str = "") -> str:
    return f'[routing.split."{MODEL}"]\n{shares}\n\n[routing.canary]\n{canary}\n'


async def post(client, body=None, headers=None):
    response = await client.post("/v1/completions", data=json.dumps(body or BODY).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    return response, await response.read()


async def three_centrals(fakes, **canary_options):
    """central-a and central-b serve V1 (label 2026-11), central-c serves V2 (label 2026-12)."""
    a = await fakes("central-a", version=V1, version_label="2026-11")
    b = await fakes("central-b", version=V1, version_label="2026-11")
    c = await fakes("central-c", version=V2, version_label="2026-12", **canary_options)
    return a, b, c


async def test_shares_apply_before_the_node_choice_exactly_and_the_answer_names_its_version(fakes, edge):
    a, b, c = await three_centrals(fakes)
    node, client = await edge([(a.url, 1), (b.url, 1), (c.url, 1)], routing=split('"2026-11" = 90\n"2026-12" = 10'))
    records = []
    node.observers.append(records.append)
    served, versions = Counter(), Counter()
    for _ in range(200):
        response, data = await post(client)
        assert response.status == 200, data
        served[response.headers["X-DSNode-Node"]] += 1
        versions[response.headers["X-DSNode-Version"]] += 1
    assert versions == {V1: 180, V2: 20}
    assert served == {"central-a": 90, "central-b": 90, "central-c": 20}  # then round-robin among V1's nodes
    assert {(r.version, r.split) for r in records} == {(V1, "shares"), (V2, "shares")}
    models = {m["id"]: m for m in (await (await client.get("/v1/models")).json())["data"]}
    assert models[MODEL]["dsnode"]["versions"] == [
        {"version": V1, "label": "2026-11", "nodes": ["central-a", "central-b"]},
        {"version": V2, "label": "2026-12", "nodes": ["central-c"]}]


async def test_a_user_stays_on_one_version_and_the_header_comes_first(fakes, edge):
    a, b, c = await three_centrals(fakes)
    node, client = await edge([(a.url, 1), (b.url, 1), (c.url, 1)], routing=split('"2026-11" = 50\n"2026-12" = 50'))
    shares = (("2026-11", 50), ("2026-12", 50))
    expected = {"2026-11": V1, "2026-12": V2}
    for user in (f"user-{i}" for i in range(20)):
        want = expected[sticky_pick(shares, MODEL, user)]
        for _ in range(3):
            response, _ = await post(client, {**BODY, "user": user})
            assert response.headers["X-DSNode-Version"] == want
    # the header wins over the body's user: pick a header value that lands elsewhere than the user
    user = "alice"
    key = next(k for k in (f"k{i}" for i in range(100)) if sticky_pick(shares, MODEL, k) != sticky_pick(shares, MODEL, user))
    response, _ = await post(client, {**BODY, "user": user}, headers={"X-DSNode-Split-Key": key})
    assert response.headers["X-DSNode-Version"] == expected[sticky_pick(shares, MODEL, key)]


async def test_a_canary_that_fails_before_the_first_token_is_retried_on_the_baseline_and_rolled_back(fakes, edge):
    a, b, c = await three_centrals(fakes, otherwise="error_500")
    canary = "window = 10\nmin_requests = 5\nerror_rate_margin = 0.1"
    node, client = await edge([(a.url, 1), (b.url, 1), (c.url, 1)],
                              routing=split('"2026-11" = 80\n"2026-12" = 20', canary))
    records = []
    node.observers.append(records.append)
    with capture_logs() as logs:
        statuses = [(await post(client))[0] for _ in range(100)]
    assert {r.status for r in statuses} == {200}  # no client saw the canary's errors
    assert {r.headers["X-DSNode-Version"] for r in statuses} == {V1}
    assert len(c.received) == 5  # min_requests, then the share was 0
    [event] = [e for e in logs if e["event"] == "canary_rolled_back"]
    assert (event["model"], event["version"], event["baseline"], event["by"]) == (MODEL, "2026-12", "2026-11", "automatic")
    assert event["canary"]["requests"] == 5 and event["canary"]["errors"] == 5
    assert event["reasons"] == ["error rate 100.0% > baseline 0.0% + margin 10.0%"]
    retried = [r for r in records if "version 2026-12 failed before the first token" in r.route_reason]
    assert len(retried) == 5 and all(r.status == 200 and r.version == V1 for r in retried)
    # the canary's 5xx are the canary rule's to judge, not passive health's: central-c is not down
    assert [s.fails for s in node.upstream_states()] == [0, 0, 0]
    state = (await (await client.get("/canary")).json())["splits"][0]
    assert [(v["version"], v["share"], v["state"]) for v in state["versions"]] == [
        ("2026-11", 100, "baseline"), ("2026-12", 0, "rolled_back")]
    metrics = await (await client.get("/metrics")).text()
    assert f'dsnode_canary_rollbacks_total{{model="{MODEL}",version="2026-12"}} 1.0' in metrics
    assert f'dsnode_version_share_percent{{model="{MODEL}",version="2026-11"}} 100.0' in metrics
    assert (await client.get("/cluster")).status == 200


async def test_a_canary_that_is_down_is_no_verdict_on_it(fakes, edge):
    a, b, c = await three_centrals(fakes)
    node, client = await edge([(a.url, 1), (b.url, 1), (c.url, 1)],
                              routing=split('"2026-11" = 50\n"2026-12" = 50', "window = 10\nmin_requests = 2"))
    canary_url = c.url
    await c.stop()  # refuses connections: passive health's business
    for _ in range(20):
        response, data = await post(client)
        assert response.status == 200 and response.headers["X-DSNode-Version"] == V1, data
    split_state = node.splits.models[MODEL]
    assert split_state.shares == {"2026-11": 50, "2026-12": 50} and split_state.decisions == {}
    assert split_state.windows["2026-12"].outcomes == type(split_state.windows["2026-12"].outcomes)()
    assert next(s for s in node.upstream_states() if s.url == canary_url).down


async def test_the_last_version_left_answers_as_ever(fakes, edge):
    """Every version refuses with 5xx: the last refusal is passed on, as without a split."""
    a = await fakes("central-a", version=V1, version_label="2026-11", otherwise="error_500")
    c = await fakes("central-c", version=V2, version_label="2026-12", otherwise="error_500")
    _, client = await edge([(a.url, 1), (c.url, 1)], routing=split('"2026-11" = 50\n"2026-12" = 50'))
    response, data = await post(client)
    assert response.status == 500 and json.loads(data)["error"]["code"] == "engine_error"
    assert response.headers["X-DSNode-Version"] in (V1, V2)
    assert len(a.received) == len(c.received) == 1


async def test_an_operator_promotes_rolls_back_and_resets_over_http(fakes, edge):
    a, b, c = await three_centrals(fakes)
    node, client = await edge([(a.url, 1), (b.url, 1), (c.url, 1)], routing=split('"2026-11" = 90\n"2026-12" = 10'))
    promoted = await client.post("/canary/promote", json={"model": MODEL})
    assert promoted.status == 200
    body = await promoted.json()
    assert body["decision"]["action"] == "promoted" and body["decision"]["version"] == "2026-12"
    for _ in range(5):
        response, _ = await post(client)
        assert response.headers["X-DSNode-Version"] == V2
    refused = await client.post("/canary/rollback", json={"model": MODEL, "version": "2026-12"})
    assert refused.status == 409 and "is the baseline" in (await refused.json())["error"]["message"]
    assert (await client.post("/canary/reset", json={"model": MODEL})).status == 200
    rolled = await client.post("/canary/rollback", json={"model": MODEL, "version": "2026-12"})
    assert rolled.status == 200 and node.splits.models[MODEL].shares == {"2026-11": 100, "2026-12": 0}
    assert (await client.post("/canary/promote", json={"model": "nope"})).status == 409
    assert (await client.post("/canary/explode", json={"model": MODEL})).status == 404
    assert (await client.post("/canary/reset", json={"version": "x"})).status == 400
