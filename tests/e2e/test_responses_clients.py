"""OpenAI's Responses API through the official `openai` SDK (`client.responses`), against real nodes: the
central (transformers), the edge (int8 ONNX) and through the edge to the central. A response must say
what the chat endpoint says for the same conversation (reasoning, text, tool calls, usage), streamed
through the SDK's own event accumulator (which checks the events' order and ids) or whole."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from dsnode.central.bundled.formats import TIME_TOOL, WEATHER_TOOL

from tests.e2e.clients_support import THINK_PROMPT, post
from tests.e2e.test_clients import ROUTES, Book, sdk, tokenizer_of

pytestmark = pytest.mark.slow


def reasoning_tokens(route, text: str, max_tokens: int) -> int:
    """The model's own tokens from `<think>` to `</think>` for this chat prompt (a text completion of the
    rendered prompt, token by token)."""
    prompt = tokenizer_of(route).render_chat([{"role": "user", "content": text}])
    status, body = post(route.url, "/v1/completions", {"model": route.model, "prompt": prompt, "logprobs": 0,
                                                        "max_tokens": max_tokens, "temperature": 0})
    assert status == 200, body
    tokens = body["choices"][0]["logprobs"]["tokens"]
    assert tokens[0] == "<think>"
    return next(i + 1 for i in range(len(tokens)) if "</think>" in "".join(tokens[:i + 1]))


def flat(tool: dict) -> dict:
    """A chat tool as the Responses API spells it."""
    return {"type": "function", **tool["function"]}


@pytest.mark.parametrize("route_name", ROUTES)
def test_a_response_says_what_the_chat_answer_says(routes, route_name):
    route = routes[route_name]
    client = sdk(route)
    chat = client.chat.completions.create(model=route.model, messages=[{"role": "user", "content": THINK_PROMPT}],
                                          max_tokens=48, temperature=0)
    message = chat.choices[0].message
    assert message.reasoning_content  # the model does reason here
    raw = client.responses.with_raw_response.create(model=route.model, input=THINK_PROMPT, max_output_tokens=48,
                                                    temperature=0)
    assert raw.headers["x-dsnode-node"] == route.node
    response = raw.parse()
    status = "incomplete" if chat.choices[0].finish_reason == "length" else "completed"
    assert response.status == status and [i.type for i in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == message.reasoning_content
    assert response.output_text == message.content
    assert (response.usage.input_tokens, response.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                           chat.usage.completion_tokens)
    reasoning = reasoning_tokens(route, THINK_PROMPT, 48)
    assert 0 < reasoning < chat.usage.completion_tokens
    assert chat.usage.completion_tokens_details.reasoning_tokens == reasoning
    assert response.usage.output_tokens_details.reasoning_tokens == reasoning

    with client.responses.stream(model=route.model, input=THINK_PROMPT, max_output_tokens=48,
                                 temperature=0) as stream:
        events = list(stream)  # each through the SDK's accumulator, which checks order and ids
    kinds = [event.type for event in events]
    final = events[-1].response  # the SDK's get_final_response() takes only `response.completed`
    assert kinds[0] == "response.created" and kinds[-1] == "response." + status
    assert "response.reasoning_text.delta" in kinds and "response.output_text.delta" in kinds
    assert final.output_text == message.content and final.output[0].content[0].text == message.reasoning_content
    assert final.usage.output_tokens == chat.usage.completion_tokens


@pytest.mark.parametrize("route_name", ROUTES)
def test_responses_parse_with_a_pydantic_model(routes, route_name):
    route = routes[route_name]
    response = sdk(route).responses.parse(model=route.model, input="Describe Ishmael in JSON.", text_format=Book,
                                          max_output_tokens=120)
    assert isinstance(response.output_parsed, Book), response.output_text


@pytest.mark.parametrize("route_name", ["edge", "edge→central"])
def test_a_response_takes_vllms_structured_outputs(routes, route_name):
    route = routes[route_name]
    client = sdk(route)
    response = client.responses.create(model=route.model, input="Is the sea blue?", max_output_tokens=80,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert response.status == "completed" and response.output_text in ("yes", "no"), response
    with pytest.raises(openai.BadRequestError) as info:  # not with a JSON text.format: each sets the structure
        client.responses.create(model=route.model, input="x", text={"format": {"type": "json_object"}},
                                extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert info.value.body["param"] == "structured_outputs" and "'text.format'" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:  # vLLM's removed spelling: refused, not ignored
        client.responses.create(model=route.model, input="x", extra_body={"guided_choice": ["yes", "no"]})
    assert info.value.body["param"] == "guided_choice" and "structured_outputs.choice" in info.value.body["message"]


def test_a_tool_call_and_its_output_round_trip_through_previous_response_id(routes):
    """The bundled dense model calls the weather tool on its own; the next turn sends only the tool's
    output and the previous response's id, and the node renders the whole conversation: its prompt is
    exactly the chat template's rendering of it."""
    route = routes["edge"]
    client = sdk(route)
    tools = [flat(WEATHER_TOOL), flat(TIME_TOOL)]
    first = client.responses.create(model=route.model, input="What is the weather in Paris?", tools=tools,
                                    max_output_tokens=60, temperature=0)
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["function"]["parameters"])
    second = client.responses.create(model=route.model, previous_response_id=first.id, tools=tools,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "sunny, 22 C"}], max_output_tokens=10, temperature=0)
    assert second.previous_response_id == first.id
    rendered = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": call.call_id, "type": "function",
                     "function": {"name": "get_weather", "arguments": json.loads(call.arguments)}}]},
                {"role": "tool", "content": "sunny, 22 C", "tool_call_id": call.call_id}]
    prompt = tokenizer_of(route).encode_chat(rendered, [WEATHER_TOOL, TIME_TOOL])
    assert second.usage.input_tokens == len(prompt)
    assert second.usage.input_tokens_details.cached_tokens > 0  # the first turn's prompt, from the cache
    assert client.responses.retrieve(first.id).output[-1].call_id == call.call_id
    assert client.responses.input_items.list(second.id).data[0].type == "function_call_output"
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


@pytest.mark.parametrize("route_name", ROUTES)
def test_a_forced_tool_call_streams_as_function_call_items(routes, route_name):
    route = routes[route_name]
    tools = [flat(WEATHER_TOOL), flat(TIME_TOOL)]
    with sdk(route).responses.stream(model=route.model, input="It was the best of times", tools=tools,
                                     tool_choice={"type": "function", "name": "get_time"}, max_output_tokens=120,
                                     temperature=0) as stream:
        deltas = [event.delta for event in stream if event.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert calls and all(call.name == "get_time" for call in calls)
    assert "".join(deltas) == "".join(call.arguments for call in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), TIME_TOOL["function"]["parameters"])


def test_what_cannot_be_served_is_refused_through_the_sdk(routes):
    route = routes["edge→central"]
    with pytest.raises(openai.BadRequestError) as info:
        sdk(route).responses.create(model=route.model, input="x", tools=[{"type": "web_search_preview"}])
    assert info.value.body["param"] == "tools[0].type" and "function tools" in info.value.body["message"]
