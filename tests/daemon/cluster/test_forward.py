"""Forwarding through a real node to scripted upstreams: bytes passed on untouched, retries before the
first token, clean ends after it, 503/502 with reasons, pooled connections, loops refused."""

from __future__ import annotations

import asyncio
import json

import pytest

from .fakes import MODEL

BODY = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}


async def post(client, body=None, raw: bytes | None = None, headers=None, path="/v1/completions"):
    data = raw if raw is not None else json.dumps(body or BODY).encode()
    response = await client.post(path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    return response, await response.read()


def sse_events(data: bytes) -> list[str]:
    return [part.removeprefix("data: ") for part in data.decode().split("\n\n") if part]


async def test_the_body_goes_on_byte_for_byte_and_the_answer_says_who_served_it(fakes, edge):
    a = await fakes("central-a")
    node, client = await edge([(a.url, 1)])
    raw = b'{ "prompt":"caf\xc3\xa9  \\u00e9", "max_tokens" : 4,\n "model": "remote-model", "x_extra": [1,2]}'
    response, data = await post(client, raw=raw, headers={"X-Request-Id": "req-42", "Authorization": "Bearer k"})
    assert response.status == 200, data
    assert json.loads(data)["choices"][0]["text"] == "from central-a"
    assert response.headers["X-DSNode-Node"] == "central-a"
    assert response.headers["X-DSNode-Route"] == "forwarded"
    assert response.headers["X-Request-Id"] == "req-42"
    got = a.received[-1]
    assert got.body == raw
    assert got.head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert got.header("X-Request-Id") == "req-42"
    assert got.header("Authorization") == "Bearer k"
    assert got.header("X-DSNode-Via") == "edge-under-test"
    assert node.upstream_states()[0].forwarded == 1


async def test_request_record_explains_the_route(fakes, edge):
    a = await fakes("central-a")
    node, client = await edge([(a.url, 1)])
    records = []
    node.observers.append(records.append)
    response, _ = await post(client)
    assert response.status == 200
    record = records[-1]
    assert (record.route, record.upstream, record.node) == ("forwarded", a.url, "central-a")
    assert record.route_reason == f"model `{MODEL}` is served only by upstreams"
    assert (record.prompt_tokens, record.completion_tokens) == (7, 3)  # from the upstream's usage


async def test_connections_are_pooled(fakes, edge):
    a = await fakes("central-a")
    _, client = await edge([(a.url, 1)])
    before = a.connections  # the poller's own (aiohttp) connection
    for _ in range(5):
        response, _ = await post(client)
        assert response.status == 200
    assert a.connections - before == 1


async def test_a_pooled_connection_the_peer_closed_is_replaced_without_a_failure(fakes, edge):
    a = await fakes("central-a", close_after_answer=True)
    node, client = await edge([(a.url, 1)])
    for _ in range(3):
        response, _ = await post(client)
        assert response.status == 200
    assert node.upstream_states()[0].fails == 0


@pytest.mark.parametrize("behaviour", ["error-500", "hang-up"])
async def test_a_failure_before_the_first_token_goes_to_the_next_upstream(fakes, edge, behaviour):
    a = await fakes("central-a", script=[behaviour])
    b = await fakes("central-b")
    node, client = await edge([(a.url, 1), (b.url, 1)])
    response, _ = await post(client)
    assert response.status == 200 and response.headers["X-DSNode-Node"] == "central-b"
    state_a, state_b = node.upstream_states()
    assert (state_a.fails, state_a.down, state_a.healthy) == (1, True, False)  # max_fails = 1
    assert state_b.fails == 0
    assert len(a.received) == len(b.received) == 1


async def test_a_refused_connection_goes_to_the_next_upstream(fakes, edge):
    a = await fakes("central-a")
    b = await fakes("central-b")
    node, client = await edge([(a.url, 1), (b.url, 1)])
    await a.stop()  # the poller has not noticed yet: the request finds out
    answers = [(await post(client))[0].headers["X-DSNode-Node"] for _ in range(3)]
    assert answers == ["central-b"] * 3
    assert node.upstream_states()[0].last_error.endswith(": Connection refused")


async def test_no_answer_within_first_token_timeout_goes_to_the_next_upstream(fakes, edge):
    a = await fakes("central-a", script=["hang"])
    b = await fakes("central-b")
    node, client = await edge([(a.url, 1), (b.url, 1)], routing="")
    node.config = node.config.model_copy(
        update={"routing": node.config.routing.model_copy(update={"first_token_timeout": 0.3})})
    response, _ = await post(client)
    assert response.headers["X-DSNode-Node"] == "central-b"
    assert "no response within 0.3s" in node.upstream_states()[0].last_error


async def test_429_goes_to_the_next_upstream_without_counting_a_failure(fakes, edge):
    a = await fakes("central-a", script=["busy-429"])
    b = await fakes("central-b")
    node, client = await edge([(a.url, 1), (b.url, 1)])
    response, _ = await post(client)
    assert response.headers["X-DSNode-Node"] == "central-b"
    assert node.upstream_states()[0].fails == 0 and node.upstream_states()[0].healthy


async def test_when_every_upstream_refuses_the_last_answer_is_passed_on(fakes, edge):
    a = await fakes("central-a", script=["error-500"])
    b = await fakes("central-b", script=["error-500"])
    _, client = await edge([(a.url, 1), (b.url, 1)])
    response, data = await post(client)
    assert response.status == 500
    assert json.loads(data)["error"]["message"] == "central-b broke"
    assert response.headers["X-DSNode-Route"] == "forwarded"


async def test_no_upstream_that_can_take_it_is_a_503_saying_why(fakes, edge):
    a = await fakes("central-a", ready=False)
    b = await fakes("central-b")
    _, client = await edge([(a.url, 1), (b.url, 1)], wait_healthy=1)
    await b.stop()
    response, data = await post(client)
    assert response.status == 503
    error = json.loads(data)["error"]
    assert error["code"] == "no_upstream" and error["type"] == "service_unavailable"
    assert "central-a: not ready: model is loading" in error["message"]
    assert "central-b: failed for this request" in error["message"]
    assert response.headers["Retry-After"] == "5"


async def test_a_request_too_big_for_every_upstream_is_a_final_400(fakes, edge):
    a = await fakes("central-a", max_context=64)
    _, client = await edge([(a.url, 1)])
    response, data = await post(client, {"model": MODEL, "prompt": "x", "max_tokens": 100})
    assert response.status == 400
    error = json.loads(data)["error"]
    assert error["code"] == "context_length_exceeded" and "maximum context length is 64 tokens" in error["message"]
    assert a.received == []


async def test_a_stream_passes_through_event_by_event(fakes, edge):
    a = await fakes("central-a", script=["stream"])
    _, client = await edge([(a.url, 1)])
    response, data = await post(client, {**BODY, "stream": True})
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    events = sse_events(data)
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == [" t0", " t1", " t2"]
    assert events[-1] == "[DONE]"


async def test_a_stream_cut_after_tokens_ends_with_an_error_event_and_done(fakes, edge):
    a = await fakes("central-a", script=["cut-stream"])
    b = await fakes("central-b")
    _, client = await edge([(a.url, 1), (b.url, 1)])
    response, data = await post(client, {**BODY, "stream": True})
    assert response.status == 200 and response.headers["X-DSNode-Node"] == "central-a"
    events = sse_events(data)
    assert [json.loads(e)["choices"][0]["text"] for e in events[:3]] == [" t0", " t1", " t2"]
    error = json.loads(events[3])["error"]  # the half event was dropped, not passed on
    assert error["code"] == "upstream_cut" and "central-a" in error["message"]
    assert events[4:] == ["[DONE]"]
    assert b.received == []  # too late to go elsewhere


async def test_a_stream_cut_after_its_done_event_just_ends(fakes, edge):
    a = await fakes("central-a", script=["done-then-hang-up"])
    _, client = await edge([(a.url, 1)])
    response, data = await post(client, {**BODY, "stream": True})
    events = sse_events(data)
    assert response.status == 200 and len(events) == 4 and events[-1] == "[DONE]"
    assert not any("error" in e for e in events)


async def test_a_whole_answer_cut_mid_body_is_a_502(fakes, edge):
    a = await fakes("central-a", script=["cut-body"])
    _, client = await edge([(a.url, 1)])
    response, data = await post(client)
    assert response.status == 502
    error = json.loads(data)["error"]
    assert error["code"] == "upstream_cut" and "stopped in the middle of its answer" in error["message"]


async def test_a_client_that_goes_away_closes_the_upstream_connection(fakes, edge):
    a = await fakes("central-a", script=["hang"])
    node, client = await edge([(a.url, 1)])
    task = asyncio.ensure_future(post(client))
    for _ in range(100):
        if a.received:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await client.close()  # the client's connection goes: the handler is cancelled
    for _ in range(100):
        if a.closed_by_peer:
            break
        await asyncio.sleep(0.02)
    assert a.closed_by_peer == 1
    assert node.upstream_states()[0].in_flight == 0


async def test_a_request_that_passed_through_this_node_is_not_forwarded_again(fakes, edge):
    a = await fakes("central-a")
    _, client = await edge([(a.url, 1)])
    response, data = await post(client, headers={"X-DSNode-Via": "central-a,edge-under-test"})
    assert response.status == 508
    assert json.loads(data)["error"]["code"] == "loop_detected"
    response, _ = await post(client, headers={"X-DSNode-Via": "central-a"})  # came from a: not back to it
    assert response.status == 503
    assert a.received == []


async def test_an_unknown_model_is_a_404_listing_every_model(fakes, edge):
    a = await fakes("central-a")
    _, client = await edge([(a.url, 1)])
    response, data = await post(client, {"model": "gpt-4", "prompt": "x"})
    assert response.status == 404
    assert "(available: remote-model, tiny-dense)" in json.loads(data)["error"]["message"]


async def test_models_and_cluster_show_what_peers_serve(fakes, edge):
    a = await fakes("central-a", max_context=8192)
    b = await fakes("central-b", ready=False)
    _, client = await edge([(a.url, 3), (b.url, 1)], wait_healthy=1)
    models = await (await client.get("/v1/models")).json()
    by_id = {m["id"]: m for m in models["data"]}
    assert set(by_id) == {"tiny-dense", MODEL}
    assert by_id[MODEL]["max_model_len"] == 8192
    assert by_id[MODEL]["dsnode"] == {"nodes": ["central-a"], "local": False, "ready": True, "versions": []}
    cluster = await (await client.get("/cluster")).json()
    assert cluster["node"]["name"] == "edge-under-test"
    peers = {p["name"]: p for p in cluster["peers"]}
    assert (peers["central-a"]["weight"], peers["central-a"]["healthy"]) == (3, True)
    assert (peers["central-b"]["healthy"], peers["central-b"]["ready"]) == (False, False)
    assert peers["central-a"]["advert"]["models"][0]["max_context"] == 8192
