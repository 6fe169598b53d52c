"""The OpenAI endpoints through the aiohttp test client, on a real engine and model: the module of exact
tokens, compared with transformers. (The other API tests run on the fast tier's FakeEngine.)"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio
from dsnode import headers
from dsnode.node import Node

from tests.daemon.api.conftest import MODEL, make_node


@pytest_asyncio.fixture(scope="module")
async def node(tmp_path_factory, dense_dir) -> AsyncIterator[Node]:
    """This module's node (the conftest's `client` serves it): the transformers engine on the bundled
    dense model, where the conftest's is a FakeEngine."""
    node = await make_node(tmp_path_factory.mktemp("node"), dense_dir)
    yield node
    await node.engine.close()


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "It was the"}], "max_tokens": 20, "temperature": 0}


async def sse_events(response: Any) -> list[Any]:
    """Parse an SSE body into JSON payloads; the literal [DONE] stays a string."""
    raw = (await response.read()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = []
    for block in raw.split("\n\n"):
        if block:
            assert block.startswith("data: ")
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def test_chat_completion_is_the_models_greedy_answer(client, node, reference):
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status == 200
    assert response.headers[headers.NODE] == "node-under-test"
    assert response.headers[headers.ROUTE] == "local"
    body = await response.json()
    assert response.headers[headers.REQUEST_ID] in body["id"]
    prompt = node.engine.tokenizer.encode_chat(CHAT["messages"])
    expected = reference(prompt, 20)
    eos = node.engine.tokenizer.eos_token_ids
    cut = next((i for i, t in enumerate(expected) if t in eos), None)
    text = node.engine.tokenizer.decode(expected[:cut] if cut is not None else expected)
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text}
    assert text.startswith("best of times")
    assert choice["finish_reason"] == ("stop" if cut is not None else "length")
    assert body["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": (cut + 1) if cut is not None else 20,
        "total_tokens": len(prompt) + ((cut + 1) if cut is not None else 20),
        "prompt_tokens_details": {"cached_tokens": 0},  # 11 prompt tokens: under a block, never reused
        "completion_tokens_details": {"reasoning_tokens": 0},  # a reasoning model's (its template), not reasoning
    }
    assert body["object"] == "chat.completion" and body["model"] == MODEL


async def test_streamed_text_equals_whole_text(client):
    body = {"model": MODEL, "prompt": "Four score and", "max_tokens": 16, "temperature": 0}
    whole = await (await client.post("/v1/completions", json=body)).json()
    response = await client.post("/v1/completions", json={**body, "stream": True,
                                                           "stream_options": {"include_usage": True}})
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    events = await sse_events(response)
    assert events[-1] == "[DONE]"
    usage_event = events[-2]
    assert usage_event["choices"] == [] and usage_event["usage"] == whole["usage"]
    chunks = events[:-2]
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == whole["choices"][0]["finish_reason"] == "length"
    assert len(chunks) > 3


async def test_chat_stream_shape(client):
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = await sse_events(response)
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage
    last = chunks[-1]["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    whole = await (await client.post("/v1/chat/completions", json=CHAT)).json()
    assert text == whole["choices"][0]["message"]["content"]


async def test_stop_sequence_cuts_the_answer(client):
    body = {"model": MODEL, "prompt": "It was the best", "max_tokens": 30, "temperature": 0}
    full = (await (await client.post("/v1/completions", json=body)).json())["choices"][0]["text"]
    assert "worst" in full
    cut = await (await client.post("/v1/completions", json={**body, "stop": ["worst"]})).json()
    assert cut["choices"][0]["text"] == full[: full.index("worst")]
    assert cut["choices"][0]["finish_reason"] == "stop"


async def test_max_tokens_and_echo(client):
    body = {"model": MODEL, "prompt": "Call me", "max_tokens": 3, "temperature": 0, "echo": True}
    answer = await (await client.post("/v1/completions", json=body)).json()
    assert answer["usage"]["completion_tokens"] == 3 and answer["choices"][0]["finish_reason"] == "length"
    assert answer["choices"][0]["text"].startswith("Call me")


async def test_prompt_as_token_ids(client, node):
    ids = node.engine.tokenizer.encode("Four score and")
    by_ids = await (await client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 5,
                                                               "temperature": 0})).json()
    by_text = await (await client.post("/v1/completions", json={"model": MODEL, "prompt": "Four score and",
                                                                "max_tokens": 5, "temperature": 0})).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]


async def test_seeded_sampling_is_reproducible(client):
    body = {"model": MODEL, "prompt": "It was", "max_tokens": 24, "temperature": 1.5, "seed": 7}
    a = await (await client.post("/v1/completions", json=body)).json()
    b = await (await client.post("/v1/completions", json=body)).json()
    c = await (await client.post("/v1/completions", json={**body, "seed": 8})).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["choices"][0]["text"] != c["choices"][0]["text"]


async def test_concurrent_requests_all_get_their_own_answer(client):
    prompts = ["It was the best", "Four score and", "We hold these truths", "In the beginning"]
    body = {"model": MODEL, "max_tokens": 12, "temperature": 0}
    alone = [await (await client.post("/v1/completions", json={**body, "prompt": p})).json() for p in prompts]
    together = await asyncio.gather(*[client.post("/v1/completions", json={**body, "prompt": p}) for p in prompts])
    together = [await r.json() for r in together]
    assert [a["choices"][0]["text"] for a in alone] == [t["choices"][0]["text"] for t in together]


async def test_models_health_ready_cluster(client, node):
    models = await (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [(MODEL, 512)]
    assert (await client.get("/health")).status == 200
    ready = await client.get("/ready")
    assert ready.status == 200 and (await ready.json())["status"] == "ready"
    cluster = await (await client.get("/cluster")).json()
    me = cluster["node"]
    assert me["name"] == "node-under-test" and me["role"] == "central" and me["ready"] is True
    assert me["models"][0]["name"] == MODEL and me["models"][0]["max_context"] == 512
    assert me["models"][0]["tokenizer"] == node.engine.tokenizer.digest  # what token ids mean here
    assert me["host"]["cpu_logical"] >= 1 and isinstance(me["host"]["gpus"], list)
    assert "transformers" in me["host"]["backends"]
    assert set(me["load"]) >= {"waiting", "running", "tokens_per_second", "batch_tokens", "batch_token_budget"}


@pytest.mark.parametrize("n", [1, 3])
async def test_client_disconnect_frees_the_batch_slot(client, node, n):
    """Every choice's slot (n > 1: each choice is a sequence of its own)."""
    body = {"model": MODEL, "prompt": "It was", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True, "n": n}
    response = await client.post("/v1/completions", json=body)
    await response.content.readline()  # the first event arrived: it is generating
    assert node.engine.load_figures().running == n
    response.close()
    for _ in range(100):
        if node.engine.load_figures().running == 0:
            break
        await asyncio.sleep(0.05)
    figures = node.engine.load_figures()
    assert figures.running == 0 and figures.batch_tokens == 0


async def test_a_hang_up_after_done_does_not_undo_a_complete_answer():
    """aiohttp cancels the handler when the client hangs up; after `data: [DONE]` that loses nothing."""
    from dsnode.api.local import _end_complete_stream

    class SlowEof:
        async def write_eof(self) -> None:
            await asyncio.sleep(10)  # the client hangs up while the end is being written

    class ResetEof:
        async def write_eof(self) -> None:
            raise ConnectionResetError()

    async def handler_tail(response) -> str:
        await _end_complete_stream(response)
        return "served"

    task = asyncio.ensure_future(handler_tail(SlowEof()))
    await asyncio.sleep(0.01)
    task.cancel()  # what aiohttp's handler_cancellation does on a hang-up
    assert await task == "served" and not task.cancelled()
    assert await handler_tail(ResetEof()) == "served"


async def test_n_choices_compute_their_prompt_once(client, node, monkeypatch):
    """`n` choices of a long prompt: the first is prefilled alone and its prompt kept in the prompt cache,
    the others take it from there (all but the last few tokens), and every choice is still the greedy
    answer a single choice gets."""
    runner = node.engine._loaded.runner
    fed: list[int] = []
    prefill = runner.prefill
    monkeypatch.setattr(runner, "prefill", lambda seq_id, ids, start: (fed.append(len(ids)), prefill(seq_id, ids,
                                                                                                     start))[1])
    prompt = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "cache_salt": "n-choices"}
    one = await (await client.post("/v1/completions", json=body)).json()
    length = one["usage"]["prompt_tokens"]
    assert length > 32 and sum(fed) == length
    fed.clear()
    many = await (await client.post("/v1/completions", json={**body, "n": 4, "cache_salt": "n-choices-2"})).json()
    assert [c["text"] for c in many["choices"]] == [one["choices"][0]["text"]] * 4
    reused = (length - 1) // 16 * 16
    assert sum(fed) == length + 3 * (length - reused)  # without sharing: 4 * length
    assert many["usage"]["prompt_tokens"] == length
    assert many["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # the prompt was computed, once
