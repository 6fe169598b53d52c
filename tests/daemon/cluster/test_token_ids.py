"""Requests that carry token ids (a prompt of ids, `logit_bias`, `stop_token_ids`) for a model served
here: an edge's distill and a central's full model may share a name but not a vocabulary, so such a
request is forwarded only to upstreams that advertise this node's tokenizer."""

from __future__ import annotations

import pytest

from .conftest import LOCAL_MODEL

LONG_TEXT = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
LONG_IDS = [5, 6, 7, 8] * 6  # 24 tokens: over the node's long_prompt_tokens (16)


@pytest.mark.parametrize("extra", [{"prompt": LONG_IDS}, {"prompt": LONG_TEXT, "logit_bias": {"5": -100}},
                                   {"prompt": LONG_TEXT, "stop_token_ids": [5]}])
async def test_token_ids_stay_here_when_an_upstream_uses_another_tokenizer(fakes, local_node, extra):
    central = await fakes("central-a", model=LOCAL_MODEL, tokenizer="f" * 64)
    node, client, engine = await local_node(upstreams=[(central.url, 1)])
    records = []
    node.observers.append(records.append)
    response = await client.post("/v1/completions", json={"model": LOCAL_MODEL, "max_tokens": 2, **extra})
    assert response.status == 200, await response.text()
    assert response.headers["X-DSNode-Route"] == "local" and central.received == [] and len(engine.requests) == 1
    assert "token ids are this node's tokenizer's" in records[-1].route_reason


async def test_text_is_forwarded_as_before_and_ids_too_when_the_tokenizers_match(fakes, local_node):
    other = await fakes("central-a", model=LOCAL_MODEL, tokenizer="f" * 64)
    node, client, engine = await local_node(upstreams=[(other.url, 1)])
    response = await client.post("/v1/completions", json={"model": LOCAL_MODEL, "prompt": LONG_TEXT, "max_tokens": 2})
    assert response.headers["X-DSNode-Route"] == "forwarded" and len(other.received) == 1  # text: each tokenizes

    same = await fakes("central-b", model=LOCAL_MODEL, tokenizer=engine.tokenizer.digest)
    node, client, engine = await local_node(upstreams=[(same.url, 1)])
    response = await client.post("/v1/completions", json={"model": LOCAL_MODEL, "prompt": LONG_IDS, "max_tokens": 2})
    assert response.headers["X-DSNode-Route"] == "forwarded" and len(same.received) == 1 and engine.requests == []


async def test_an_upstream_that_does_not_say_its_tokenizer_gets_no_token_ids(fakes, local_node):
    silent = await fakes("central-a", model=LOCAL_MODEL)  # an older node: no `tokenizer` in its advertisement
    _, client, engine = await local_node(upstreams=[(silent.url, 1)])
    response = await client.post("/v1/completions", json={"model": LOCAL_MODEL, "prompt": LONG_IDS, "max_tokens": 2})
    assert response.headers["X-DSNode-Route"] == "local" and silent.received == []


async def test_while_the_local_model_is_down_text_is_forwarded_and_token_ids_wait(fakes, local_node):
    """Not ready here, the tokenizer the ids were meant for is not known: a 503 the client retries, not
    an answer from another vocabulary."""
    central = await fakes("central-a", model=LOCAL_MODEL, tokenizer="f" * 64)
    _, client, engine = await local_node(upstreams=[(central.url, 1)])
    engine.die("the device was lost")
    text = await client.post("/v1/completions", json={"model": LOCAL_MODEL, "prompt": "Hi", "max_tokens": 2})
    assert text.status == 200 and text.headers["X-DSNode-Route"] == "forwarded"
    ids = await client.post("/v1/completions", json={"model": LOCAL_MODEL, "prompt": LONG_IDS, "max_tokens": 2})
    assert ids.status == 503 and ids.headers["Retry-After"] and len(central.received) == 1
