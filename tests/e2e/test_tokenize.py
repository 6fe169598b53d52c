"""vLLM's `/tokenize` and `/detokenize` on real nodes: the central, the edge, and through the edge to the
central (forwarded: the central's tokenizer answers)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from dsnode import headers

from tests.e2e.test_clients import ROUTES, sdk, tokenizer_of

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TEXT = "Four score and seven years ago"


def post(url: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], Any]:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def context_limit(route) -> int:
    with urllib.request.urlopen(f"{route.url}/v1/models/{route.model}", timeout=30) as resp:
        return int(json.loads(resp.read())["max_model_len"])


@pytest.mark.parametrize("route_name", ROUTES)
def test_a_chats_count_is_its_completions_prompt_tokens_on_the_node_that_serves_it(routes, route_name):
    route = routes[route_name]
    status, answer, got = post(route.url, "/tokenize", {"model": route.model, "messages": MESSAGES})
    assert status == 200, answer
    assert got[headers.NODE] == route.node
    assert got[headers.ROUTE] == ("forwarded" if route_name == "edge→central" else "local")
    completion = sdk(route).chat.completions.create(model=route.model, messages=MESSAGES, max_tokens=1)
    assert completion.usage is not None and answer["count"] == completion.usage.prompt_tokens
    assert answer["max_model_len"] == context_limit(route)


@pytest.mark.parametrize("route_name", ROUTES)
def test_a_text_goes_there_and_back(routes, route_name):
    route = routes[route_name]
    status, answer, _ = post(route.url, "/tokenize", {"model": route.model, "prompt": TEXT,
                                                      "add_special_tokens": False, "return_token_strs": True})
    assert status == 200, answer
    tokenizer = tokenizer_of(route)
    assert answer["tokens"] == tokenizer.encode(TEXT, add_special_tokens=False)
    assert answer["token_strs"] == [tokenizer.tokenizer.id_to_token(i) for i in answer["tokens"]]
    status, back, got = post(route.url, "/detokenize", {"model": route.model, "tokens": answer["tokens"]})
    assert status == 200 and back == {"prompt": TEXT} and got[headers.NODE] == route.node


def test_an_id_outside_the_upstreams_vocabulary_is_its_400(routes):
    route = routes["edge→central"]
    status, answer, got = post(route.url, "/detokenize", {"model": route.model, "tokens": [1, 10**7]})
    assert status == 400 and answer["error"]["param"] == "tokens[1]", answer
    assert got[headers.ROUTE] == "forwarded"  # the central's answer, relayed as it was
    assert f"({tokenizer_of(route).vocab_size})" in answer["error"]["message"]


def test_an_unknown_model_is_404_listing_those_there_are(routes):
    route = routes["edge"]
    status, answer, _ = post(route.url, "/tokenize", {"model": "no-such-model", "prompt": TEXT})
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    assert routes["central"].model in answer["error"]["message"]

