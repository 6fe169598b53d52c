"""`/v1/responses` through a real node to scripted upstreams: the upstream is asked the chat request the
response stands for, and its chat answer (whole or streamed, cut or not) reaches the client as a
response."""

from __future__ import annotations

import json

from tests.daemon.api.test_responses_api import events_of

from .fakes import MODEL

ASK = {"model": MODEL, "input": "Weather in Oslo?", "instructions": "Be brief", "max_output_tokens": 9,
       "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]}


async def post(client, body: dict):
    response = await client.post("/v1/responses", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return response, await response.read()


async def test_the_upstream_is_asked_the_chat_request_and_its_answer_is_a_response(fakes, edge):
    a = await fakes("central-a", script=["chat"])
    node, client = await edge([(a.url, 1)])
    records = []
    node.observers.append(records.append)
    response, data = await post(client, ASK)
    assert response.status == 200, data
    assert response.headers["X-DSNode-Node"] == "central-a" and response.headers["X-DSNode-Route"] == "forwarded"
    got = a.received[-1]
    assert got.head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert json.loads(got.body) == {
        "model": MODEL, "stream": False, "max_completion_tokens": 9,
        "messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Weather in Oslo?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        "parallel_tool_calls": True,
    }
    body = json.loads(data)
    assert body["object"] == "response" and body["status"] == "completed"
    assert [item["type"] for item in body["output"]] == ["reasoning", "message", "function_call"]
    reasoning, message, call = body["output"]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "thinking"}]
    assert message["content"][0]["text"] == "from central-a"
    assert (call["call_id"], call["name"], call["arguments"]) == ("call_7", "get_weather", '{"city": "Oslo"}')
    assert body["usage"]["input_tokens"] == 7 and body["usage"]["input_tokens_details"] == {"cached_tokens": 4}
    assert (records[-1].endpoint, records[-1].completion_tokens) == ("responses", 3)
    stored = await client.get(f"/v1/responses/{body['id']}")  # kept where the client asked, not upstream
    assert stored.status == 200


async def test_a_relayed_stream_becomes_the_responses_events(fakes, edge):
    a = await fakes("central-a", script=["chat-stream"])
    _, client = await edge([(a.url, 1)])
    response, data = await post(client, {**ASK, "stream": True})
    assert response.status == 200
    got = json.loads(a.received[-1].body)
    assert got["stream"] is True and got["stream_options"] == {"include_usage": True}
    events = events_of(data.decode())
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert [e["delta"] for e in events if e["type"] == "response.reasoning_text.delta"] == ["hmm"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "from central-a"
    final = events[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["reasoning", "message"]
    assert final["usage"]["output_tokens"] == 3


async def test_a_relayed_stream_cut_ends_with_response_failed(fakes, edge):
    a = await fakes("central-a", script=["cut-chat-stream"])
    _, client = await edge([(a.url, 1)])
    response, data = await post(client, {**ASK, "stream": True})
    assert response.status == 200
    assert b"[DONE]" not in data
    events = events_of(data.decode())
    assert events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "upstream_cut"
    assert "central-a" in failed["error"]["message"]


async def test_an_upstream_refusal_is_passed_on_as_openai_error_json(fakes, edge):
    a = await fakes("central-a", script=["error-500"], otherwise="error-500")
    _, client = await edge([(a.url, 1)])
    response, data = await post(client, ASK)
    assert response.status == 500
    assert json.loads(data)["error"]["code"] == "engine_error"


async def test_an_upstream_answer_that_is_no_chat_completion_is_a_502_counted_against_it(fakes, edge):
    a = await fakes("central-a", script=["not-chat"])
    node, client = await edge([(a.url, 1)])
    response, data = await post(client, ASK)
    assert response.status == 502
    error = json.loads(data)["error"]
    assert error["code"] == "upstream_bad_answer" and "central-a" in error["message"]
    assert node.upstream_states()[0].fails == 1
