"""`ResponsesRender` as pure logic: a chat answer rendered whole and the same answer's stream chunks
rendered as events end in the same response (items, their statuses, usage), and the events are well
formed, whatever the answer holds."""

from __future__ import annotations

import json

import pytest
from dsnode.api.errors import APIError
from dsnode.api.responses_api.events import ResponsesRender
from dsnode.api.responses_api.request import parse_responses

from tests.daemon.api.test_responses_api import events_of

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
USAGE = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14,
         "prompt_tokens_details": {"cached_tokens": 2}, "completion_tokens_details": {"reasoning_tokens": 4}}


def render() -> ResponsesRender:
    return ResponsesRender(parse_responses({"model": "m", "input": "x"}))


def chunks(message: dict, finish: str) -> list[dict]:
    """The chat stream of `message`, as the chat path sends it: a role chunk, text a few characters at a
    time, each tool call whole, the finish reason, the usage."""
    def piece(delta: dict, reason: str | None = None) -> dict:
        return {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}], "usage": None}

    out = [piece({"role": "assistant", "content": ""})]
    for key in ("reasoning_content", "content"):
        text = message.get(key) or ""
        out += [piece({key: text[i:i + 3]}) for i in range(0, len(text), 3)]
    out += [piece({"tool_calls": [{"index": i, **call}]}) for i, call in enumerate(message.get("tool_calls") or ())]
    out += [piece({}, finish), {"choices": [], "usage": USAGE}]
    return out


def without_ids(output: list[dict]) -> list[dict]:
    return [{k: v for k, v in item.items() if k != "id"} for item in output]


@pytest.mark.parametrize("message, finish", [
    ({"content": "Paris.", "reasoning_content": "The capital of France"}, "stop"),
    ({"content": "", "reasoning_content": "cut in the mid"}, "length"),
    ({"content": "cut in the answ"}, "length"),
    ({"content": None, "reasoning_content": "use the tool", "tool_calls": [CALL, {**CALL, "id": "call_2"}]},
     "tool_calls"),
    ({"content": "Let me look.", "tool_calls": [CALL]}, "tool_calls"),
    ({"content": ""}, "stop"),
])
def test_a_streamed_answer_ends_in_the_response_the_whole_one_is(message, finish):
    whole = render().whole({"choices": [{"index": 0, "message": {"role": "assistant", **message},
                                         "logprobs": None, "finish_reason": finish}], "usage": USAGE})
    streamed = render()
    data = streamed.opening() + b"".join(streamed.chunk(c) for c in chunks(message, finish)) + streamed.closing()
    events = events_of(data.decode())
    final = events[-1]["response"]
    assert events[-1]["type"] == ("response.incomplete" if finish == "length" else "response.completed")
    assert without_ids(final["output"]) == without_ids(whole["output"])
    assert (final["status"], final["usage"], final["incomplete_details"]) == \
        (whole["status"], whole["usage"], whole["incomplete_details"])
    assert whole["usage"]["output_tokens_details"] == {"reasoning_tokens": 4}
    assert whole["usage"]["input_tokens_details"] == {"cached_tokens": 2}


def test_relayed_events_render_as_local_chunks_do():
    message = {"content": "Paris.", "reasoning_content": "The capital"}
    local, relayed = render(), render()
    sse = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks(message, "stop")) + b"data: [DONE]\n\n"
    from_chunks = local.opening() + b"".join(local.chunk(c) for c in chunks(message, "stop")) + local.closing()
    cut = sse.index(b"\n\n", len(sse) // 2) + 2  # the relay hands over whole events, several at a time
    from_events = relayed.opening() + relayed.events(sse[:cut]) + relayed.events(sse[cut:])
    assert without_ids(events_of(from_events.decode())[-1]["response"]["output"]) == \
        without_ids(events_of(from_chunks.decode())[-1]["response"]["output"])


def test_after_the_end_nothing_more_is_said():
    done = render()
    done.opening()
    assert done.chunk({"choices": [{"index": 0, "delta": {"content": "x"}}]})
    final = done.failed(APIError(500, "broke", code="engine_error"))
    assert b"response.failed" in final
    assert done.chunk({"choices": [{"index": 0, "delta": {"content": "more"}}]}) == b""
    assert done.closing() == b"" and done.failed(APIError(500, "again")) == b""
    assert done.final is not None and done.final["error"] == {"code": "engine_error", "message": "broke"}
