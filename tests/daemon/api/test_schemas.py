"""Request schemas: accepted shapes, refused values (with the parameter named), defaults."""

from __future__ import annotations

import pytest
from dsnode.api.completions import check_body_limits
from dsnode.api.errors import APIError
from dsnode.api.local import sampling_params
from dsnode.api.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from dsnode.config import LimitsSection

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def refused(model, body) -> APIError:
    with pytest.raises(APIError) as info:
        parse_body(model, body)
    assert info.value.status == 400
    return info.value


def test_chat_accepts_text_parts_developer_role_and_unknown_fields():
    body = parse_body(ChatCompletionRequest, {
        "model": "m",
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "some_future_field": True,
    })
    assert [m.for_template() for m in body.messages] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]


def test_image_parts_are_refused():
    error = refused(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert error.param.startswith("messages[0].content")


@pytest.mark.parametrize("field, value, param", [
    ("temperature", -0.1, "temperature"), ("temperature", 2.1, "temperature"), ("top_p", 1.5, "top_p"),
    ("top_k", -2, "top_k"), ("max_tokens", 0, "max_tokens"), ("seed", "x", "seed"), ("stop", [""], "stop"),
    ("stream", "yes", "stream"), ("n", 0, "n"), ("n", 17, "n"), ("frequency_penalty", 2.5, "frequency_penalty"),
    ("presence_penalty", -2.01, "presence_penalty"), ("repetition_penalty", 0, "repetition_penalty"),
    ("repetition_penalty", 5e-324, "repetition_penalty"), ("repetition_penalty", 10.5, "repetition_penalty"),
    ("logit_bias", {"x": 5}, "logit_bias"), ("logit_bias", {"-1": 5}, "logit_bias"),
    ("logit_bias", {"1": 100.5}, "logit_bias"), ("logit_bias", {str(i): 1 for i in range(301)}, "logit_bias"),
    ("top_logprobs", 21, "top_logprobs"), ("top_logprobs", 2, "top_logprobs"),  # the latter without logprobs
    ("tool_choice", "auto", "tool_choice"),
    # Literal[1] / Literal[False] compare by equality in Python; JSON keeps true and 1 apart, and so do we
    ("n", True, "n"), ("presence_penalty", False, "presence_penalty"), ("logprobs", 0, "logprobs"),
    # vLLM's structured_outputs: exactly one kind; its knobs with no meaning here, and its older spellings
    ("structured_outputs", {}, "structured_outputs"), ("structured_outputs", {"json_object": False}, "structured_outputs"),
    ("structured_outputs", {"regex": "a", "grammar": "b"}, "structured_outputs"),
    ("guided_regex", "a+", "guided_regex"), ("guided_json", {"type": "object"}, "guided_json"),
])
def test_refused_values_name_their_parameter(field, value, param):
    error = refused(ChatCompletionRequest, {**CHAT, field: value})
    assert error.param == param and repr(value)[:10] in error.message


def test_integers_may_be_spelled_with_a_zero_fraction():
    """JSON Schema's integer is a number with no fraction: 10.0 is 10 (a Rust or Go client's float)."""
    body = parse_body(ChatCompletionRequest, {**CHAT, "max_completion_tokens": 10.0, "n": 2.0, "seed": -3.0,
                                              "logprobs": True, "top_logprobs": 4.0, "stop_token_ids": [7.0]})
    got = (body.max_completion_tokens, body.n, body.seed, body.top_logprobs, *body.stop_token_ids)
    assert got == (10, 2, -3, 4, 7) and all(type(v) is int for v in got)
    completion = parse_body(CompletionRequest, {"model": "m", "prompt": [[1.0, 2.0], [3.0]], "logprobs": 1.0})
    assert completion.prompts() == [[1, 2], [3]] and completion.logprobs == 1
    for field, value in (("max_tokens", 10.5), ("max_tokens", "10"), ("max_tokens", True), ("n", 1e400)):
        assert refused(ChatCompletionRequest, {**CHAT, field: value}).param == field
    assert refused(CompletionRequest, {"model": "m", "prompt": [1.0, 2.5]}).param == "prompt"


def test_null_means_the_default_as_in_openai():
    nulls = {k: None for k in ("temperature", "top_p", "top_k", "n", "stream", "logprobs", "presence_penalty",
                               "frequency_penalty", "max_tokens", "stop", "seed")}
    body = parse_body(ChatCompletionRequest, {**CHAT, **nulls})
    assert (body.temperature, body.top_p, body.top_k, body.n, body.stream, body.logprobs) == (1.0, 1.0, -1, 1, False, False)
    assert body.max_tokens is None and body.stop_sequences() == ()
    assert parse_body(CompletionRequest, {"model": "m", "prompt": "x", "echo": None, "best_of": None}).echo is False
    assert refused(ChatCompletionRequest, {**CHAT, "messages": None}).param == "messages"  # required: no default
    assert refused(ChatCompletionRequest, {**CHAT, "model": None}).param == "model"


def test_completion_prompt_forms():
    assert parse_body(CompletionRequest, {"model": "m", "prompt": "x"}).prompt == "x"
    assert parse_body(CompletionRequest, {"model": "m", "prompt": ["x"]}).prompt == ["x"]
    assert parse_body(CompletionRequest, {"model": "m", "prompt": [1, 2]}).prompt == [1, 2]
    assert refused(CompletionRequest, {"model": "m", "prompt": [-1]}).param == "prompt"
    assert refused(CompletionRequest, {"model": "m", "prompt": ""}).param == "prompt"
    assert refused(CompletionRequest, {"model": "m", "prompt": "x", "best_of": 2}).param == "best_of"
    assert refused(CompletionRequest, {"model": "m", "prompt": "x", "best_of": True}).param == "best_of"
    assert refused(CompletionRequest, {"model": "m", "prompt": "x", "frequency_penalty": False}).param == "frequency_penalty"
    assert refused(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": 21}).param == "logprobs"
    assert refused(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": True}).param == "logprobs"
    scored = parse_body(CompletionRequest, {"model": "m", "prompt": "x", "echo": True, "logprobs": 1})
    assert scored.requested_prompt_logprobs() == 1  # the prompt's log-probabilities (lm-eval's loglikelihood)
    plain = parse_body(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": 1})
    assert plain.requested_prompt_logprobs() is None


def test_sampling_processors_and_logprobs_reach_the_engine():
    body = parse_body(ChatCompletionRequest, {**CHAT, "presence_penalty": 0.5, "frequency_penalty": -1,
                                              "repetition_penalty": 1.2, "logit_bias": {"7": -100, "3": 2.5},
                                              "logprobs": True, "top_logprobs": 3})
    params = sampling_params(body, 10, 100, LimitsSection(), vocab_size=8)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -1.0, 1.2)
    assert params.logit_bias == ((3, 2.5), (7, -100.0)) and params.logprobs == 3
    assert sampling_params(parse_body(ChatCompletionRequest, {**CHAT, "logprobs": True}), 10, 100,
                           LimitsSection()).logprobs == 0
    assert sampling_params(parse_body(ChatCompletionRequest, CHAT), 10, 100, LimitsSection()).logprobs is None
    completion = parse_body(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": 0})
    assert sampling_params(completion, 1, 100, LimitsSection()).logprobs == 0
    with pytest.raises(APIError) as info:  # an id past the serving model's vocabulary
        sampling_params(body, 10, 100, LimitsSection(), vocab_size=7)
    assert info.value.param == "logit_bias" and "7" in info.value.message


def test_sampling_defaults_and_caps():
    body = parse_body(ChatCompletionRequest, {**CHAT, "max_completion_tokens": 7, "stop": "END", "top_k": -1})
    params = sampling_params(body, prompt_tokens=10, max_context=100, limits=LimitsSection())
    assert (params.max_tokens, params.stop, params.top_k, params.temperature) == (7, ("END",), 0, 1.0)
    open_ended = sampling_params(parse_body(ChatCompletionRequest, CHAT), 10, 100, LimitsSection())
    assert open_ended.max_tokens == 90  # the rest of the context, as vLLM does
    capped = sampling_params(parse_body(ChatCompletionRequest, CHAT), 10, 100, LimitsSection(max_tokens=5))
    assert capped.max_tokens == 5
    with pytest.raises(APIError) as info:  # a request over the limit is refused before routing
        check_body_limits(parse_body(ChatCompletionRequest, {**CHAT, "max_tokens": 6}), LimitsSection(max_tokens=5))
    assert info.value.param == "max_tokens"
    with pytest.raises(APIError) as info:
        check_body_limits(parse_body(ChatCompletionRequest, {**CHAT, "max_completion_tokens": 6}),
                          LimitsSection(max_tokens=5))
    assert info.value.param == "max_completion_tokens"
    check_body_limits(parse_body(ChatCompletionRequest, {**CHAT, "max_tokens": 5}), LimitsSection(max_tokens=5))


@pytest.mark.parametrize("given, param", [
    ({"choice": []}, "structured_outputs.choice"), ({"choice": ["x"] * 1025}, "structured_outputs.choice"),
    ({"regex": ""}, "structured_outputs.regex"), ({"choice": "a"}, "structured_outputs.choice"),
    ({"json_object": True, "structural_tag": {"x": 1}}, "structured_outputs.structural_tag"),
    ({"json_object": True, "whitespace_pattern": " "}, "structured_outputs.whitespace_pattern"),
])
def test_a_bad_structured_outputs_field_is_named(given, param):
    assert refused(ChatCompletionRequest, {**CHAT, "structured_outputs": given}).param == param


def test_structured_outputs_take_one_kind_and_not_a_json_response_format():
    for given in ({"choice": ["a", "b"]}, {"regex": "[0-9]+"}, {"grammar": 'start: "x"'}, {"json": {"type": "object"}},
                  {"json": '{"type": "object"}'}, {"json_object": True}, {"json_object": False, "regex": "a"}):
        for model, body in ((ChatCompletionRequest, CHAT), (CompletionRequest, {"model": "m", "prompt": "x"})):
            parsed = parse_body(model, {**body, "structured_outputs": given})
            assert len(parsed.structured_outputs.kinds()) == 1
    both = {**CHAT, "structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}
    assert refused(ChatCompletionRequest, both).param == "structured_outputs"
    text = {**both, "response_format": {"type": "text"}}  # text format: no structure of its own
    assert parse_body(ChatCompletionRequest, text).structured_outputs.regex == "a"
    guided = refused(ChatCompletionRequest, {**CHAT, "guided_choice": ["a"]})
    assert "structured_outputs.choice" in guided.message and guided.code == "unsupported_value"
