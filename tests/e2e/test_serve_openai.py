"""`dsnode serve` as a real process with the tiny MoE central model, driven by the official OpenAI client."""

from __future__ import annotations

import json
import signal
import urllib.request

import openai
import pytest

from tests.support.nodes import ServeProcess, free_port, node_toml

pytestmark = pytest.mark.slow

MODEL = "deepseek-r1-tiny"


@pytest.fixture(scope="module")
def central(tmp_path_factory, moe_dir):
    work = tmp_path_factory.mktemp("central")
    port = free_port()
    config = work / "dsnode.toml"
    config.write_text(node_toml("central-e2e", "central", port, MODEL, moe_dir, "transformers"))
    node = ServeProcess("central-e2e", config, port, work / "central.log").start().wait_ready()
    yield node
    assert node.stop() == 0, node.log_tail()


@pytest.fixture(scope="module")
def client(central):
    return openai.OpenAI(base_url=central.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_lists_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_and_completion_whole(client):
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Four score and"}], max_tokens=16, temperature=0
    )
    assert chat.choices[0].message.content.startswith("seven years ago")
    assert chat.usage.completion_tokens == 16 and chat.choices[0].finish_reason == "length"
    completion = client.completions.create(model=MODEL, prompt="We hold these truths", max_tokens=12, temperature=0)
    assert completion.choices[0].text.startswith(" to be self-evident")
    assert completion.usage.prompt_tokens > 0


def test_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "It was the"}], max_tokens=20, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for event in stream:
        if event.usage:
            usage = event.usage
        for choice in event.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text.startswith("best of times")
    assert usage is not None and usage.completion_tokens >= 1 and finish in ("stop", "length")
    raw = client.completions.create(model=MODEL, prompt="Call me Ishmael.", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in raw if c.choices).startswith(" Some years")


def test_same_greedy_request_twice_gives_the_same_text(client):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "In the beginning"}], max_tokens=24, temperature=0)
    first = client.chat.completions.create(**ask).choices[0].message.content
    second = client.chat.completions.create(**ask).choices[0].message.content
    assert first == second and first


def test_response_headers_name_the_node(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Call me"}], max_tokens=4
    )
    assert raw.headers["x-dsnode-node"] == "central-e2e"
    assert raw.headers["x-dsnode-route"] == "local"


@pytest.mark.parametrize(
    "call, status",
    [
        (lambda c: c.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}]), 404),
        (lambda c: c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                             temperature=9), 400),
        (lambda c: c.completions.create(model=MODEL, prompt="x", max_tokens=100000), 400),
        (lambda c: c.completions.create(model=MODEL, prompt="x", n=17), 400),
    ],
)
def test_bad_requests_raise_openai_errors_and_the_server_keeps_serving(client, call, status):
    with pytest.raises(openai.APIStatusError) as info:
        call(client)
    assert info.value.status_code == status
    assert info.value.body["message"]  # the SDK unwraps {"error": {...}}
    again = client.completions.create(model=MODEL, prompt="Call me", max_tokens=3, temperature=0)
    assert again.usage.completion_tokens == 3


def test_malformed_json_is_400(central):
    request = urllib.request.Request(central.url + "/v1/chat/completions", data=b"{oops",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400
    assert json.loads(info.value.read())["error"]["code"] == "invalid_json"


def test_one_request_log_event_per_request(client, central):
    # greedy: sampled at temperature 1, the bundled model may end the answer before its 3 tokens
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Call me", max_tokens=3, temperature=0)
    request_id = raw.headers["x-request-id"]
    central.request_records(request_id)  # written once the answer is sent: it may trail the client
    events = central.log_events()
    mine = [e for e in events if e.get("event") == "request" and e.get("request_id") == request_id]
    assert len(mine) == 1
    event = mine[0]
    assert event["route"] == "local" and event["node"] == "central-e2e" and event["model"] == MODEL
    assert event["completion_tokens"] == 3 and event["status"] == 200
    assert event["ttft_ms"] is not None and event["duration_ms"] >= event["ttft_ms"]
    startup = [e for e in events if e.get("event") == "config"]
    assert startup and startup[0]["effective"]["model"]["name"] == MODEL


def test_sighup_with_an_unchanged_file_keeps_serving(client, central):
    central.signal(signal.SIGHUP)
    answer = client.completions.create(model=MODEL, prompt="Call me", max_tokens=2, temperature=0)  # greedy: 2 tokens
    assert answer.usage.completion_tokens == 2
