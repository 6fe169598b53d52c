"""A chat answer's text → reasoning_content, content and tool_calls, streamed or whole, alike."""

from __future__ import annotations

import json

import pytest
from dsnode.api.chat_output import ChatOutput, model_reasons, stream_delta, whole_message
from dsnode.inference.reasoning import ReasoningSplitter
from dsnode.inference.toolformats import HermesFormat

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def output(reasons: bool = True, tools: bool = True, opened: bool = False) -> ChatOutput:
    return ChatOutput(ReasoningSplitter(opened) if reasons else None, HermesFormat() if tools else None)


def streamed_message(text: str, cut: int, **kwargs) -> tuple[dict, str | None]:
    """The message a client rebuilds from the stream's deltas, the text pushed `cut` characters at a time."""
    out = output(**kwargs)
    deltas = [stream_delta(p) for i in range(0, len(text), cut) for p in out.push(text[i:i + cut])]
    deltas += [stream_delta(p) for p in out.finish()]
    message: dict = {"role": "assistant", "content": "".join(d.get("content", "") for d in deltas)}
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    if reasoning:
        message["reasoning_content"] = reasoning
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    if calls:
        message["content"] = message["content"] or None
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    return message, out.finish_reason("stop")


@pytest.mark.parametrize("text", [
    "<think>\nweather question\n</think>\n\n" + CALL,
    "Sure." + CALL,
    "<think>r</think>plain answer with <tool_call but no call",
    "<think>r</think>" + CALL[:-5],  # malformed: cut before the end marker
    "no reasoning, no call",
])
@pytest.mark.parametrize("cut", [1, 3, 7, 1000])
def test_streamed_and_whole_answers_agree(text, cut):
    whole = whole_message(output(), text)
    streamed, _ = streamed_message(text, cut)
    for message in (whole, streamed):
        for call in message.get("tool_calls", []):
            call["id"] = "same"
    assert streamed == whole


def test_a_call_becomes_tool_calls_with_the_reasoning_beside_it():
    out = output()
    message = whole_message(out, "<think>\nweather question\n</think>\n\n" + CALL)
    assert message["reasoning_content"] == "\nweather question\n"
    assert message["content"] == "\n\n"  # the text between </think> and the call, exactly
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}
    assert out.finish_reason("stop") == "tool_calls"


def test_a_malformed_call_is_text_and_the_reason_stays():
    out = output(reasons=False)
    broken = CALL.replace('"Paris"}}', '"Paris"')
    assert whole_message(out, broken) == {"role": "assistant", "content": broken}
    assert out.finish_reason("stop") == "stop"


def test_without_tools_the_markers_are_plain_text():
    message = whole_message(output(tools=False), CALL)
    assert message["content"] == CALL and "tool_calls" not in message


def test_reasoning_is_decided_by_the_setting_or_the_template():
    assert model_reasons("auto", "{{ content.split('</think>')[-1] }}")
    assert not model_reasons("auto", "{{ '<|im_start|>' }}") and not model_reasons("auto", None)
    assert model_reasons("deepseek_r1", None) and not model_reasons("none", "</think>")
