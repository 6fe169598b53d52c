"""`/v1/responses` on the fast tier: the real app and batching engine over a scripted runner. The
engine's answer is the fake's; what is checked is the Responses API's shape around it, the chat request
a response stands for (the prompt the engine was given), the stored responses and the refusals."""

from __future__ import annotations

import json

import pytest
from dsnode.api.app import create_app
from dsnode.api.responses_api.store import ResponseStore

from tests.daemon.api.conftest import MODEL, make_node
from tests.daemon.api.test_errors import assert_openai_error, still_serves
from tests.support.engines import DEFAULT_REPLY

pytestmark = pytest.mark.asyncio


def events_of(text: str) -> list[dict]:
    """The SSE events, each checked to name its own type and to come in sequence."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        kind, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert kind == "event: " + event["type"]
        assert event["sequence_number"] == len(out)
        out.append(event)
    assert_items_well_formed(out)
    return out


def assert_items_well_formed(events: list[dict]) -> None:
    """Each output item is added, gets its deltas and is done before the next one is added; what its
    `.done` events and the final response hold is what its deltas added up to."""
    open_, deltas, items = None, "", []
    for event in events:
        kind = event["type"]
        if kind == "response.output_item.added":
            assert open_ is None, "an item was added while another was open"
            open_, deltas = event["item"], ""
            assert event["output_index"] == len(items)
        elif kind == "response.output_item.done":
            assert open_ is not None and event["item"]["id"] == open_["id"]
            done = event["item"]
            text = done["arguments"] if done["type"] == "function_call" else done["content"][0]["text"]
            assert text == deltas
            items.append(done)
            open_ = None
        elif kind.endswith(".delta"):
            assert open_ is not None and event["item_id"] == open_["id"]
            deltas += event["delta"]
        elif kind.endswith(".done") and "item_id" in event:
            said = event["part"]["text"] if "part" in event else event.get("text", event.get("arguments"))
            assert event["item_id"] == open_["id"] and said == deltas
    if events and events[-1]["type"] in ("response.completed", "response.incomplete", "response.failed"):
        assert open_ is None, "the response ended with an item open"
        assert events[-1]["response"]["output"] == items


def last_prompt(engine) -> str:
    """The text of the last prompt the engine prefilled."""
    call = engine.runner.prefills()[-1]
    return engine.tokenizer.decode(list(call.token_ids), skip_special_tokens=False)


async def test_a_text_input_is_answered_as_a_response(client, node):
    response = await client.post("/v1/responses", json={"model": MODEL, "input": "Say hello", "instructions": "Be brief",
                                                        "metadata": {"ticket": "42"}})
    assert response.status == 200, await response.text()
    assert response.headers["X-DSNode-Node"] == node.name and response.headers["X-DSNode-Route"] == "local"
    body = await response.json()
    assert body["object"] == "response" and body["id"].startswith("resp_") and body["status"] == "completed"
    [item] = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["status"] == "completed"
    assert item["content"] == [{"type": "output_text", "text": DEFAULT_REPLY, "annotations": [], "logprobs": []}]
    usage = body["usage"]
    assert usage["output_tokens"] > 0 and usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert body["instructions"] == "Be brief" and body["metadata"] == {"ticket": "42"}
    prompt = last_prompt(node.engine)  # the chat template rendered instructions as system, input as user
    assert prompt.index("Be brief") < prompt.index("Say hello")


async def test_the_stream_is_the_responses_event_sequence_and_ends_as_the_whole_answer(client):
    whole = await (await client.post("/v1/responses", json={"model": MODEL, "input": "Hi"})).json()
    response = await client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True})
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    text = await response.text()
    assert "[DONE]" not in text
    events = events_of(text)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == DEFAULT_REPLY
    ids = {e["response"]["id"] for e in events if "response" in e}
    assert len(ids) == 1
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["usage"]["output_tokens"] == whole["usage"]["output_tokens"]
    assert [i["content"] for i in final["output"]] == [i["content"] for i in whole["output"]]
    assert events[-2]["item"] == final["output"][0]


async def test_max_output_tokens_makes_an_incomplete_response(client, engine):
    engine.answer("and so on, ", eos=False)
    body = await (await client.post("/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 5})).json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["usage"]["output_tokens"] == 5 and body["output"][0]["status"] == "incomplete"
    response = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 5,
                                                        "stream": True})
    events = events_of(await response.text())
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_a_next_turn_continues_a_stored_response(client, engine):
    engine.answer("The capital is Paris.")
    first = await (await client.post("/v1/responses", json={"model": MODEL, "input": "Capital of France?",
                                                            "instructions": "Answer in one line"})).json()
    engine.answer("About two million.")
    second = await client.post("/v1/responses", json={"model": MODEL, "input": "And its population?",
                                                      "previous_response_id": first["id"]})
    assert second.status == 200, await second.text()
    body = await second.json()
    assert body["previous_response_id"] == first["id"]
    prompt = last_prompt(engine)
    # the history (input and answer) went before the new input; the old instructions did not (OpenAI's rule)
    assert prompt.index("Capital of France?") < prompt.index("The capital is Paris.") < prompt.index("population")
    assert "Answer in one line" not in prompt
    third = await client.post("/v1/responses", json={"model": MODEL, "input": "And Spain?",
                                                     "previous_response_id": body["id"]})
    assert third.status == 200
    assert last_prompt(engine).index("Capital of France?") < last_prompt(engine).index("About two million.")

    stored = await client.get(f"/v1/responses/{first['id']}")
    assert stored.status == 200 and (await stored.json()) == first
    items = await (await client.get(f"/v1/responses/{first['id']}/input_items")).json()
    assert items["object"] == "list" and items["has_more"] is False
    assert items["data"][0]["content"] == [{"type": "input_text", "text": "Capital of France?"}]
    deleted = await client.delete(f"/v1/responses/{first['id']}")
    assert (await deleted.json()) == {"id": first["id"], "object": "response", "deleted": True}
    gone = await client.get(f"/v1/responses/{first['id']}")
    assert gone.status == 404
    assert_openai_error(await gone.json(), "not_found")
    refused = await client.post("/v1/responses", json={"model": MODEL, "input": "again",
                                                       "previous_response_id": first["id"]})
    assert refused.status == 400
    assert_openai_error(await refused.json(), "previous_response_not_found", "previous_response_id")


async def test_a_streamed_response_is_stored_too_and_store_false_keeps_nothing(client):
    response = await client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True})
    final = events_of(await response.text())[-1]["response"]
    assert (await (await client.get(f"/v1/responses/{final['id']}")).json()) == final
    metrics = await (await client.get("/metrics")).text()
    assert "dsnode_stored_responses 1.0" in metrics
    held = float(next(line for line in metrics.splitlines() if line.startswith("dsnode_stored_responses_bytes ")
                      ).split()[1])
    assert held > len(json.dumps(final))
    body = await (await client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "store": False})).json()
    assert body["store"] is False
    assert (await client.get(f"/v1/responses/{body['id']}")).status == 404


async def test_input_items_become_the_chat_messages_they_stand_for(client, engine):
    items = [
        {"role": "developer", "content": "Use the tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text",
                                                                        "text": "SECRET-THOUGHT"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "rain, 7 C"},
    ]
    response = await client.post("/v1/responses", json={"model": MODEL, "input": items})
    assert response.status == 200, await response.text()
    prompt = last_prompt(engine)
    assert prompt.index("Use the tools.") < prompt.index("Weather in Oslo?") < prompt.index("rain, 7 C")
    assert "get_weather" in prompt and "SECRET-THOUGHT" not in prompt  # reasoning is dropped from history


@pytest.mark.parametrize("extra, param, code", [
    ({"tools": [{"type": "web_search_preview"}]}, "tools[0].type", "unsupported_value"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content", "invalid_value"),  # as chat's images: messages[0].content
    ({"input": [{"type": "computer_call_output", "call_id": "c"}]}, "input[0].type", "unsupported_value"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role", "invalid_value"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id",
     "missing_parameter"),
    ({"background": True}, "background", "unsupported_value"),
    ({"truncation": "auto"}, "truncation", "unsupported_value"),
    ({"conversation": "conv_1"}, "conversation", "unsupported_value"),
    ({"temperature": 3}, "temperature", "invalid_value"),
    ({"max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"input": None}, "input", "missing_parameter"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "invalid_value"),
    ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name", "invalid_value"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice", "unsupported_value"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata", "invalid_value"),
])
async def test_what_cannot_be_served_is_a_400_naming_the_responses_parameter(client, extra, param, code):
    response = await client.post("/v1/responses", json={"model": MODEL, "input": "x", **extra})
    assert response.status == 400, await response.text()
    assert_openai_error(await response.json(), code, param)
    await still_serves(client)


async def test_an_unknown_model_is_404_as_on_the_chat_path(client):
    response = await client.post("/v1/responses", json={"model": "nope", "input": "x"})
    assert response.status == 404
    assert_openai_error(await response.json(), "model_not_found", "model")


async def test_an_engine_failure_mid_stream_is_response_failed(client, engine):
    engine.hold()
    response = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "stream": True,
                                                        "max_output_tokens": 20})
    assert response.status == 200
    await engine.until_held()
    engine.runner.fail_decode(RuntimeError("simulated device error"))
    engine.resume()
    events = events_of(await response.text())
    assert events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and "simulated device error" in failed["error"]["message"]
    assert events[-2]["type"] == "response.output_item.done"  # the open item is closed first
    await still_serves(client)


async def test_stored_responses_belong_to_the_api_key_that_made_them(tmp_path, stub_model_dir, fake_engines, aiohttp_client):
    keys = tmp_path / "keys"
    keys.write_text("alice: sk-alice-0123456789\nbob: sk-bob-0123456789\n")
    keys.chmod(0o600)
    node = await make_node(tmp_path, stub_model_dir, fake_engines,
                           extra=f'[auth]\napi_keys_file = "{keys}"\n')
    try:
        client = await aiohttp_client(create_app(node))
        alice, bob = ({"Authorization": f"Bearer sk-{who}-0123456789"} for who in ("alice", "bob"))
        made = await (await client.post("/v1/responses", headers=alice, json={"model": MODEL, "input": "x"})).json()
        assert (await client.get(f"/v1/responses/{made['id']}", headers=alice)).status == 200
        assert (await client.get(f"/v1/responses/{made['id']}", headers=bob)).status == 404
        assert (await client.delete(f"/v1/responses/{made['id']}", headers=bob)).status == 404
        refused = await client.post("/v1/responses", headers=bob, json={"model": MODEL, "input": "y",
                                                                       "previous_response_id": made["id"]})
        assert refused.status == 400
    finally:
        await node.engine.close()


def test_the_store_keeps_the_most_recently_used_within_its_bytes():
    store = ResponseStore()

    def put(name: str, size: int, scope: str = "k") -> bool:
        return store.put(scope, {"id": name, "pad": "x" * size}, [], [], limit_bytes=3000)

    assert put("a", 900) and put("b", 900) and put("c", 900)
    assert store.get("k", "a") is not None  # used: now the most recent
    assert put("d", 900)  # over 3000 bytes: the least recently used (b) goes
    assert store.get("k", "b") is None and store.get("k", "a") is not None and store.get("k", "c") is not None
    assert store.nbytes <= 3000
    assert not put("huge", 5000) and store.get("k", "huge") is None  # bigger than the store: not kept
    assert store.get("other", "a") is None and not store.delete("other", "a")  # another key's
    assert store.delete("k", "a") and store.get("k", "a") is None
    put("e", 100)
    assert put("e", 200) and len([i for i in ("c", "d", "e") if store.get("k", i)]) == 3  # replaced, not twice
    assert store.nbytes == sum(s.nbytes for s in store._kept.values())


async def test_a_limit_of_the_chat_path_is_said_in_the_responses_apis_words(tmp_path, stub_model_dir, fake_engines,
                                                                             aiohttp_client):
    node = await make_node(tmp_path, stub_model_dir, fake_engines, extra="[limits]\nmax_tokens = 8\n")
    try:
        client = await aiohttp_client(create_app(node))
        response = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 9})
        assert response.status == 400
        error = assert_openai_error(await response.json(), "max_tokens_too_large", "max_output_tokens")
        assert error["message"].startswith("'max_output_tokens' is 9") and "max_completion" not in error["message"]
    finally:
        await node.engine.close()
