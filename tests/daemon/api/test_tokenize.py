"""`POST /tokenize` and `/detokenize` (vLLM's) on the fast tier's node: the bundled tokenizer and chat template."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dsnode import headers
from dsnode.api.prompt import prompt_token_ids
from dsnode.api.schemas import ChatCompletionRequest

from tests.daemon.api.conftest import MODEL

TEXT = "It was the best of times, it was the worst of times"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


async def post(client: Any, path: str, body: dict[str, Any]) -> tuple[int, Any, Any]:
    response = await client.post(path, json=body)
    return response.status, await response.json(), response.headers


async def test_a_text_is_tokenized_with_the_local_models_tokenizer(client, node):
    tokenizer = node.engine.tokenizer
    status, answer, got_headers = await post(client, "/tokenize", {"model": MODEL, "prompt": TEXT})
    assert status == 200, answer
    assert answer["tokens"] == tokenizer.encode(TEXT) and answer["count"] == len(answer["tokens"]) > 5
    assert answer["max_model_len"] == node.engine.info.max_context and answer["token_strs"] is None
    assert got_headers[headers.NODE] == node.name and got_headers[headers.ROUTE] == "local"
    status, without_model, _ = await post(client, "/tokenize", {"prompt": TEXT, "return_token_strs": True})
    assert status == 200 and without_model["tokens"] == answer["tokens"]  # no model: this node's
    assert without_model["token_strs"] == [tokenizer.tokenizer.id_to_token(i) for i in answer["tokens"]]
    status, plain, _ = await post(client, "/tokenize", {"prompt": TEXT, "add_special_tokens": False})
    assert plain["tokens"] == tokenizer.encode(TEXT, add_special_tokens=False)


@pytest.mark.parametrize("tools", [None, TOOLS])
async def test_a_chat_counts_what_its_completion_will_count(client, node, tools):
    """The chat form renders messages and tools as the chat path does: `count` is the completion's
    `usage.prompt_tokens`, and the ids are the ones the engine is given."""
    extra = {"tools": tools} if tools else {}
    status, answer, _ = await post(client, "/tokenize", {"model": MODEL, "messages": MESSAGES, **extra})
    assert status == 200, answer
    chat = ChatCompletionRequest.model_validate({"model": MODEL, "messages": MESSAGES, **extra})
    assert [answer["tokens"]] == await prompt_token_ids(node.engine.tokenizer, chat)
    response = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4,
                                                               **extra})
    assert (await response.json())["usage"]["prompt_tokens"] == answer["count"]
    status, no_turn, _ = await post(client, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False,
                                                          **extra})
    assert status == 200 and len(no_turn["tokens"]) < answer["count"]
    assert answer["tokens"][:len(no_turn["tokens"])] == no_turn["tokens"]  # the assistant's turn opens after


async def test_tools_are_in_the_count(client):
    _, alone, _ = await post(client, "/tokenize", {"messages": MESSAGES})
    _, offered, _ = await post(client, "/tokenize", {"messages": MESSAGES, "tools": TOOLS})
    assert offered["count"] > alone["count"] + 10


async def test_detokenize_gives_back_the_text_special_tokens_included(client, node):
    _, answer, _ = await post(client, "/tokenize", {"prompt": TEXT, "add_special_tokens": False})
    status, back, got_headers = await post(client, "/detokenize", {"model": MODEL, "tokens": answer["tokens"]})
    assert status == 200 and back == {"prompt": TEXT}
    assert got_headers[headers.ROUTE] == "local"
    _, chat, _ = await post(client, "/tokenize", {"messages": MESSAGES})
    _, rendered, _ = await post(client, "/detokenize", {"tokens": chat["tokens"]})
    assert rendered["prompt"] == node.engine.tokenizer.render_chat(
        [{"role": m["role"], "content": m["content"]} for m in MESSAGES])
    assert (await post(client, "/detokenize", {"tokens": []}))[1] == {"prompt": ""}


@pytest.mark.parametrize("path, body, status, param", [
    ("/detokenize", {"tokens": [5, 10**9]}, 400, "tokens[1]"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
    ("/detokenize", {"tokens": ["5"]}, 400, "tokens[0]"),
    ("/detokenize", {}, 400, "tokens"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, 400, "continue_final_message"),
    ("/tokenize", {"model": "no-such-model", "prompt": TEXT}, 404, "model"),
    ("/detokenize", {"model": "no-such-model", "tokens": [1]}, 404, "model"),
])
async def test_bad_requests_name_the_parameter(client, path, body, status, param):
    got, answer, _ = await post(client, path, body)
    assert got == status, answer
    assert answer["error"]["param"] == param, answer


async def test_the_body_must_be_json(client):
    response = await client.post("/tokenize", data=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status == 400 and "error" in await response.json()


async def test_long_inputs_are_handled_off_the_event_loop_with_the_same_answer(client, node, monkeypatch):
    threaded = []
    to_thread = asyncio.to_thread

    async def spy(function, *args):
        threaded.append(function)
        return await to_thread(function, *args)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    status, _, _ = await post(client, "/tokenize", {"prompt": TEXT})
    assert status == 200 and not threaded  # a short text: on the loop, no thread hop
    long_text = TEXT * 1000  # over TOKENIZE_IN_THREAD_CHARS
    status, answer, _ = await post(client, "/tokenize", {"prompt": long_text, "add_special_tokens": False})
    assert status == 200 and answer["tokens"] == node.engine.tokenizer.encode(long_text, add_special_tokens=False)
    status, back, _ = await post(client, "/detokenize", {"tokens": answer["tokens"]})
    assert status == 200 and back["prompt"] == long_text
    assert len(threaded) == 2  # the encoding and the decoding each in a thread


async def test_a_chat_over_the_message_limit_is_refused(tmp_path, stub_model_dir, fake_engines, aiohttp_client):
    from dsnode.api.app import create_app

    from tests.daemon.api.conftest import make_node

    node = await make_node(tmp_path, stub_model_dir, fake_engines, extra="[limits]\nmax_messages = 2\n")
    try:
        client = await aiohttp_client(create_app(node))
        status, answer, _ = await post(client, "/tokenize", {"messages": MESSAGES * 2})
        assert status == 400 and answer["error"]["code"] == "too_many_messages"
        assert (await post(client, "/tokenize", {"messages": MESSAGES}))[0] == 200
    finally:
        await node.engine.close()
