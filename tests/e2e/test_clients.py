"""Real clients against real nodes: the official `openai` SDK and LangChain's `ChatOpenAI`, on the central
(transformers), on the edge (int8 ONNX) and through the edge to the central. What these tests measure
is the client-compatibility table of docs/clients.md.
"""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from dsnode.central.bundled.formats import TIME_TOOL, WEATHER_TOOL  # what the bundled models learned to call
from pydantic import BaseModel

from tests.e2e.clients_support import THINK_PROMPT, post

pytestmark = pytest.mark.slow

ROUTES = ["central", "edge", "edge→central"]


class Book(BaseModel):
    title: str
    year: int
    sailor: bool


def sdk(route) -> openai.OpenAI:
    return openai.OpenAI(base_url=route.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def tokenizer_of(route):
    from dsnode.inference.tokenizer import TextTokenizer

    from tests.support.models import bundled_models

    return TextTokenizer.from_folder(bundled_models().moe if route.model.endswith("tiny") else bundled_models().dense)


def raw_completion(route, messages: list[dict], max_tokens: int) -> dict:
    """The model's own text for the same prompt (the chat template rendered by the node's tokenizer is
    the same one the chat endpoint uses): what the split must cut exactly at the tags."""
    from dsnode.inference.tokenizer import TextTokenizer

    from tests.support.models import bundled_models

    folder = bundled_models().moe if route.model.endswith("tiny") else bundled_models().dense
    prompt = TextTokenizer.from_folder(folder).render_chat(messages)
    status, body = post(route.url, "/v1/completions", {"model": route.model, "prompt": prompt,
                                                        "max_tokens": max_tokens, "temperature": 0})
    assert status == 200, body
    return body


# --- reasoning --------------------------------------------------------------------------------------
@pytest.mark.parametrize("route_name", ROUTES)
def test_reasoning_content_is_split_exactly_at_the_tags(routes, route_name):
    route = routes[route_name]
    messages = [{"role": "user", "content": THINK_PROMPT}]
    raw = raw_completion(route, messages, 48)
    text = raw["choices"][0]["text"]
    assert text.startswith("<think>") and "</think>" in text, text  # the model does reason here
    reasoning, content = text.removeprefix("<think>").split("</think>", 1)

    client = sdk(route)
    whole = client.chat.completions.with_raw_response.create(model=route.model, messages=messages, max_tokens=48,
                                                             temperature=0)
    assert whole.headers["x-dsnode-node"] == route.node
    answer = whole.parse()
    message = answer.choices[0].message
    assert (message.reasoning_content, message.content) == (reasoning, content)
    assert content.startswith("\n\nseven years ago") and "Lincoln" in reasoning
    assert answer.usage.completion_tokens == raw["usage"]["completion_tokens"]  # the tags count as tokens

    stream = client.chat.completions.create(model=route.model, messages=messages, max_tokens=48, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed_reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                                 for c in chunks if c.choices)
    streamed_content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (streamed_reasoning, streamed_content) == (reasoning, content)
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


@pytest.mark.parametrize("route_name", ["central", "edge→central"])
def test_a_stream_cut_inside_the_reasoning_keeps_it_all_as_reasoning(routes, route_name):
    route = routes[route_name]
    messages = [{"role": "user", "content": THINK_PROMPT}]
    text = raw_completion(route, messages, 6)["choices"][0]["text"]
    answer = sdk(route).chat.completions.create(model=route.model, messages=messages, max_tokens=6, temperature=0)
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "length"
    assert message.reasoning_content == text.removeprefix("<think>") and message.content == ""


def test_a_plain_answer_has_no_reasoning(routes):
    route = routes["central"]
    answer = sdk(route).chat.completions.create(model=route.model, messages=[{"role": "user", "content": "Four score and"}],
                                                max_tokens=12, temperature=0)
    message = answer.choices[0].message
    assert message.content.startswith("seven years") and getattr(message, "reasoning_content", None) is None


# --- structured output ------------------------------------------------------------------------------
@pytest.mark.parametrize("route_name", ROUTES)
def test_openai_parse_with_a_pydantic_model(routes, route_name):
    route = routes[route_name]
    completion = sdk(route).chat.completions.parse(
        model=route.model, messages=[{"role": "user", "content": "Describe Ishmael in JSON."}],
        response_format=Book, max_tokens=120)
    book = completion.choices[0].message.parsed
    assert isinstance(book, Book), completion.choices[0].message.content


@pytest.mark.parametrize("route_name", ["central", "edge"])
def test_json_object_mode_answers_an_object(routes, route_name):
    route = routes[route_name]
    answer = sdk(route).chat.completions.create(
        model=route.model, messages=[{"role": "user", "content": "Describe Ahab in JSON."}],
        response_format={"type": "json_object"}, max_tokens=120)
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_a_schema_the_library_cannot_compile_is_400_naming_response_format(routes):
    route = routes["edge→central"]
    with pytest.raises(openai.BadRequestError) as info:
        sdk(route).chat.completions.create(
            model=route.model, messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}})
    assert info.value.body["param"] == "response_format" and "objekt" in info.value.body["message"]


# --- vLLM's structured_outputs ------------------------------------------------------------------------
SENTIMENTS = ["positive", "negative", "neutral"]
DATE = r"(18|19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"


@pytest.mark.parametrize("route_name", ROUTES)
def test_a_chat_answer_is_one_of_the_choices(routes, route_name):
    """vLLM's commonest use of structured outputs (classification), as its docs send it: the SDK's
    `extra_body`. A reasoning model reasons first, unconstrained, then answers one of the choices."""
    route = routes[route_name]
    for content in ("Describe Ahab.", THINK_PROMPT, "Is the sea blue?"):
        answer = sdk(route).chat.completions.create(
            model=route.model, messages=[{"role": "user", "content": content}], max_tokens=80,
            extra_body={"structured_outputs": {"choice": SENTIMENTS}})
        choice = answer.choices[0]
        assert choice.message.content in SENTIMENTS and choice.finish_reason == "stop", choice


@pytest.mark.parametrize("route_name", ROUTES)
def test_a_text_completion_matches_a_regex_and_a_grammar(routes, route_name):
    """Text completions take structured outputs too (as vLLM), constrained from the first token."""
    route = routes[route_name]
    client = sdk(route)
    dated = client.completions.create(model=route.model, prompt="Moby-Dick was published on", max_tokens=24,
                                      temperature=0.8, seed=3, n=3, extra_body={"structured_outputs": {"regex": DATE}})
    for choice in dated.choices:
        assert re.fullmatch(DATE, choice.text) and choice.finish_reason == "stop", choice
    gbnf = 'root ::= "Call me " name "."\nname ::= [A-Z] [a-z]+'
    named = client.completions.create(model=route.model, prompt="The first line:", max_tokens=24, temperature=0,
                                      extra_body={"structured_outputs": {"grammar": gbnf}})
    assert re.fullmatch(r"Call me [A-Z][a-z]+\.", named.choices[0].text), named.choices[0]


@pytest.mark.parametrize("route_name", ["edge", "edge→central"])
def test_a_streamed_chat_follows_a_json_schema_given_as_structured_outputs(routes, route_name):
    route = routes[route_name]
    schema = Book.model_json_schema()
    stream = sdk(route).chat.completions.create(
        model=route.model, messages=[{"role": "user", "content": "Describe Ishmael in JSON."}], max_tokens=120,
        stream=True, extra_body={"structured_outputs": {"json": schema}})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), schema)


def test_a_text_completion_takes_response_format_as_vllm_does(routes):
    route = routes["edge"]
    answer = sdk(route).completions.create(model=route.model, prompt="Ahab as JSON:", max_tokens=80,
                                           extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(answer.choices[0].text), dict)


@pytest.mark.parametrize("extra, param, words", [
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex", "unclosed group"),
    ({"structured_outputs": {"grammar": "root ::== x"}}, "structured_outputs.grammar", "neither Lark nor GBNF"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "key must be a string"),
    ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs", "not regex and choice"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "'response_format' is given too"),
    ({"guided_choice": ["a", "b"]}, "guided_choice", "structured_outputs.choice"),
    ({"structured_outputs": {"choice": ["a"]}, "tools": [WEATHER_TOOL], "tool_choice": "required"},
     "structured_outputs", "a tool call is forced"),
])
def test_a_structured_output_that_cannot_be_used_is_400_naming_it(routes, extra, param, words):
    """Refused by the node that would answer: here the central, behind the edge."""
    route = routes["edge→central"]
    body = {"model": route.model, "messages": [{"role": "user", "content": "x"}], **extra}
    status, answer = post(route.url, "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == param and words in answer["error"]["message"], answer


# --- tools ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("route_name", ["edge"])
def test_the_model_calls_a_tool_on_its_own_and_the_round_trip_is_rendered(routes, route_name):
    """`auto`: the bundled dense model calls the tool for a question it was trained on (the MoE does not
    learn it: docs/clients.md). The call and the tool's answer then go back in the history, and the node
    renders both: its prompt is exactly the chat template's rendering of them (the tiny model's reply to
    a tool result is not reliable)."""
    route = routes[route_name]
    client = sdk(route)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=route.model, messages=ask, tools=[WEATHER_TOOL, TIME_TOOL],
                                           max_tokens=60, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    [call] = choice.message.tool_calls  # the model's own call (which city it copies is its business)
    assert call.function.name == "get_weather" and choice.message.content is None
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])
    history = ask + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 22 C"}]
    second = client.chat.completions.create(model=route.model, messages=history, tools=[WEATHER_TOOL, TIME_TOOL],
                                            max_tokens=20, temperature=0)
    rendered = [ask[0], {"role": "assistant", "content": "", "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather",
                                                          "arguments": json.loads(call.function.arguments)}}]},
        {"role": "tool", "content": "sunny, 22 C", "tool_call_id": call.id}]
    prompt = tokenizer_of(route).encode_chat(rendered, [WEATHER_TOOL, TIME_TOOL])
    assert second.usage.prompt_tokens == len(prompt)
    assert "<tool_response>\nsunny, 22 C\n</tool_response>" in tokenizer_of(route).decode(prompt)


@pytest.mark.parametrize("route_name", ROUTES)
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_forced_tool_calls_stream_with_arguments_that_match_the_schema(routes, route_name, choice):
    route = routes[route_name]
    tools = [WEATHER_TOOL, TIME_TOOL]
    stream = sdk(route).chat.completions.create(
        model=route.model, messages=[{"role": "user", "content": "It was the best of times"}], tools=tools,
        tool_choice=choice, max_tokens=120, stream=True, temperature=0)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            entry = calls.setdefault(delta_call.index, {"name": "", "arguments": ""})
            entry["name"] += delta_call.function.name or ""
            entry["arguments"] += delta_call.function.arguments or ""
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls" and calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
        if isinstance(choice, dict):
            assert call["name"] == "get_time"


def test_a_tool_whose_parameters_are_not_a_schema_is_400_naming_it(routes):
    route = routes["central"]
    bad = {"type": "function", "function": {"name": "broken", "parameters": {"type": "objekt"}}}
    with pytest.raises(openai.BadRequestError) as info:
        sdk(route).chat.completions.create(model=route.model, messages=[{"role": "user", "content": "x"}],
                                           tools=[WEATHER_TOOL, bad])
    assert info.value.body["param"] == "tools[1].function.parameters" and "`broken`" in info.value.body["message"]


# --- logprobs, logit_bias, penalties -----------------------------------------------------------------
@pytest.mark.parametrize("route_name", ROUTES)
def test_logprobs_logit_bias_and_penalties_through_the_sdk(routes, route_name):
    route = routes[route_name]
    client, messages = sdk(route), [{"role": "user", "content": "Four score and"}]
    answer = client.chat.completions.create(model=route.model, messages=messages, max_tokens=12, temperature=0,
                                            logprobs=True, top_logprobs=3)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens == 12
    assert b"".join(bytes(e.bytes) for e in entries).decode() == answer.choices[0].message.content
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 3 for e in entries)
    assert all(e.top_logprobs[0].token == e.token for e in entries)  # greedy: the likeliest, by the same logits
    stream = client.chat.completions.create(model=route.model, messages=messages, max_tokens=12, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]

    text = client.completions.create(model=route.model, prompt="Four score and", max_tokens=6, temperature=0,
                                     logprobs=2)
    assert "".join(text.choices[0].logprobs.tokens) == text.choices[0].text

    tokenizer = tokenizer_of(route)
    first = next(i for i in range(tokenizer.vocab_size) if tokenizer.token_piece(i)[0] == entries[0].token)
    banned = client.chat.completions.create(model=route.model, messages=messages, max_tokens=3, temperature=0,
                                            logit_bias={str(first): -100}, presence_penalty=1.5,
                                            frequency_penalty=0.5, logprobs=True)
    assert banned.choices[0].logprobs.content[0].token != entries[0].token


@pytest.mark.parametrize("route_name", ROUTES)
def test_n_choices_through_the_sdk(routes, route_name):
    route = routes[route_name]
    answer = sdk(route).chat.completions.create(model=route.model, messages=[{"role": "user", "content": "Four"}],
                                                max_tokens=8, temperature=1.2, seed=3, n=3, logprobs=True)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert answer.usage.completion_tokens == sum(len(c.logprobs.content) for c in answer.choices) > 8
    stream = sdk(route).chat.completions.create(model=route.model, messages=[{"role": "user", "content": "Four"}],
                                                max_tokens=8, temperature=1.2, seed=3, n=3, stream=True)
    texts = ["", "", ""]
    for c in stream:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in answer.choices]  # the same seeds, the same choices


@pytest.mark.parametrize("route_name", ROUTES)
def test_several_prompts_through_the_sdk(routes, route_name):
    route, prompts = routes[route_name], ["Four score and", "Call me"]
    client = sdk(route)
    singles = [client.completions.create(model=route.model, prompt=p, max_tokens=5, temperature=0).choices[0].text
               for p in prompts]
    batch = client.completions.create(model=route.model, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and [c.text for c in batch.choices] == singles


def test_a_conversations_next_turn_is_served_from_the_prompt_cache(routes):
    """The edge keeps a finished prompt's cache in host memory: the next turn of the conversation (the
    history resent, as every chat client does) reports the tokens it reused in OpenAI's
    `usage.prompt_tokens_details.cached_tokens`, streamed or not, and /metrics counts them."""
    import urllib.request

    route = routes["edge"]
    client = sdk(route)
    history = [{"role": "user", "content": "It was the best of times, it was the worst of times, it was the age of "
                                           "wisdom, it was the age of foolishness. Who wrote that?"}]
    first = client.chat.completions.create(model=route.model, messages=history, max_tokens=16, temperature=0)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And what comes next?"}]
    second = client.chat.completions.create(model=route.model, messages=history, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    usage = [c.usage for c in second if c.usage is not None][-1]
    cached = usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens // 16 * 16 <= cached < usage.prompt_tokens and cached % 16 == 0
    third = client.chat.completions.create(model=route.model, messages=history, max_tokens=8, temperature=0)
    assert third.usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16  # all of it
    with urllib.request.urlopen(route.url + "/metrics") as response:
        metrics = response.read().decode()
    counted = [line for line in metrics.splitlines() if line.startswith("dsnode_prompt_cached_tokens_total{")
               and 'route="local"' in line]
    assert counted and sum(float(line.rsplit(" ", 1)[1]) for line in counted) >= cached + 16


@pytest.mark.parametrize("route_name", ROUTES)
def test_scoring_a_text_as_lm_eval_does(routes, route_name):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs 1, max_tokens 1, two texts at once;
    the continuation's score is the sum of its tokens' log-probabilities in the echoed prompt."""
    route, context = routes[route_name], "It was the best of times, it was the"
    client = sdk(route)
    answer = client.completions.create(model=route.model, prompt=[context + " worst", context + " zebra"],
                                       echo=True, logprobs=1, max_tokens=1, temperature=0)
    scores = []
    for choice in answer.choices:
        block = choice.logprobs
        assert choice.text.startswith(context)
        assert block.token_logprobs[0] is None and block.top_logprobs[0] is None
        assert len(block.tokens) == len(block.token_logprobs) == len(block.text_offset) == len(block.top_logprobs)
        cut = block.text_offset.index(len(context))  # the continuation's first token
        scores.append(sum(block.token_logprobs[cut:-1]))  # the last entry is the generated token
        assert all(lp <= 0 for lp in block.token_logprobs[1:])
    assert scores[0] > scores[1]  # the bundled model learnt this sentence: " worst" beats " zebra"


# --- what stays unsupported, and the models endpoint ----------------------------------------------------
@pytest.mark.parametrize("extra, param", [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content"),
])
def test_unsupported_parameters_are_400_naming_them_in_plain_words(routes, extra, param):
    route = routes["edge"]
    body = {"model": route.model, "messages": [{"role": "user", "content": "x"}], **extra}
    status, answer = post(route.url, "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == param
    assert "Input should be" not in answer["error"]["message"], answer


def test_models_retrieve(routes, client_nodes):
    client = sdk(routes["edge"])
    assert client.models.retrieve(routes["edge"].model).id == routes["edge"].model
    assert client.models.retrieve(routes["central"].model).id == routes["central"].model  # via the upstream
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# --- LangChain --------------------------------------------------------------------------------------
def chat_model(route):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=route.url + "/v1", api_key="unused", model=route.model, temperature=0,
                      max_retries=0, timeout=120, max_tokens=120)


@pytest.mark.parametrize("route_name", ROUTES)
@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_with_structured_output(routes, route_name, method):
    structured = chat_model(routes[route_name]).with_structured_output(Book, method=method)
    prompt = "Describe Ishmael in JSON." if method != "json_mode" else \
        "Describe Ishmael in JSON with the keys title, year and sailor."
    if method == "json_mode":  # JSON mode promises an object, not the schema's keys: parsed, may not validate
        structured = chat_model(routes[route_name]).with_structured_output(method="json_mode")
        assert isinstance(structured.invoke(prompt), dict)
        return
    book = structured.invoke(prompt)
    assert isinstance(book, Book)


@pytest.mark.parametrize("route_name", ROUTES)
def test_langchain_bind_tools_round_trip(routes, route_name):
    """A forced first call (`tool_choice="any"`: LangChain's tool definitions are not the ones the tiny
    model was trained on), the tool run, its answer sent back with `auto`: the node takes and renders
    the AIMessage's tool call and the ToolMessage, and answers."""
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city"""
        return "sunny, 22 C"

    @tool
    def get_time(city: str) -> str:
        """The local time in a city"""
        return "14:05"

    model = chat_model(routes[route_name])
    history = [HumanMessage("What is the weather in Paris?")]
    first = model.bind_tools([get_weather, get_time], tool_choice="get_weather").invoke(history)
    [call] = first.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    history += [first, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    final = model.bind_tools([get_weather, get_time]).invoke(history)
    assert isinstance(final, AIMessage)
    from langchain_core.utils.function_calling import convert_to_openai_tool

    rendered = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": call["id"], "type": "function", "function": {
                    "name": "get_weather", "arguments": call["args"]}}]},
                {"role": "tool", "content": "sunny, 22 C", "tool_call_id": call["id"]}]
    tools = [convert_to_openai_tool(t) for t in (get_weather, get_time)]
    prompt = tokenizer_of(routes[route_name]).encode_chat(rendered, tools)
    assert final.response_metadata["token_usage"]["prompt_tokens"] == len(prompt)


@pytest.mark.parametrize("route_name", ["central", "edge→central"])
def test_langchain_gets_the_answer_without_the_reasoning(routes, route_name):
    """langchain-openai does not surface `reasoning_content` (its DeepSeek package does); the content it
    returns is the answer alone."""
    reply = chat_model(routes[route_name]).invoke(THINK_PROMPT)
    assert reply.content.startswith("\n\nseven year") and "<think>" not in reply.content
    assert "Lincoln" not in json.dumps(reply.additional_kwargs)


@pytest.mark.parametrize("route_name", ROUTES)
def test_langchain_logprobs(routes, route_name):
    reply = chat_model(routes[route_name]).bind(logprobs=True, top_logprobs=2, max_tokens=8).invoke("Four score and")
    entries = reply.response_metadata["logprobs"]["content"]
    assert len(entries) == reply.response_metadata["token_usage"]["completion_tokens"]
    assert b"".join(bytes(e["bytes"]) for e in entries).decode() == reply.content
