"""OpenAI response bodies and stream chunks for chat and text completions."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Shape:
    """What every body of one request shares."""

    endpoint: str  # "chat" | "completion"
    response_id: str
    model: str
    created: int

    @classmethod
    def new(cls, endpoint: str, request_id: str, model: str) -> "Shape":
        prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
        return cls(endpoint, prefix + request_id, model, int(time.time()))

    @property
    def chat(self) -> bool:
        return self.endpoint == "chat"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
          reasoning_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage; `prompt_tokens_details.cached_tokens`: prompt tokens the prompt cache gave;
    `completion_tokens_details.reasoning_tokens`: a reasoning model's chat answer's reasoning tokens."""
    out = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    if reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return out


def choice_body(shape: Shape, index: int, text: str, finish_reason: str | None, message: dict[str, Any] | None = None,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One choice of a whole answer. `message`: a chat answer's message when it is more than its text
    (reasoning, tool calls); `logprobs`: in the endpoint's shape (`dsnode.api.logprobs`), when asked."""
    if shape.chat:
        return {"index": index, "message": message or {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def full_response(shape: Shape, choices: list[dict[str, Any]], use: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": shape.response_id,
        "object": "chat.completion" if shape.chat else "text_completion",
        "created": shape.created,
        "model": shape.model,
        "choices": choices,
        "usage": use,
    }


def chunk(
    shape: Shape,
    text: str,
    finish_reason: str | None = None,
    first: bool = False,
    with_usage_field: bool = False,
    delta: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """`delta`: a chat chunk's delta when it carries more than text (reasoning, a tool call); `index`:
    the choice it belongs to (requests with n > 1)."""
    if shape.chat:
        if delta is None:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        kind = "text_completion"
    body: dict[str, Any] = {
        "id": shape.response_id,
        "object": kind,
        "created": shape.created,
        "model": shape.model,
        "choices": [choice],
    }
    if with_usage_field:
        body["usage"] = None
    return body


def usage_chunk(shape: Shape, use: dict[str, Any]) -> dict[str, Any]:
    kind = "chat.completion.chunk" if shape.chat else "text_completion"
    return {
        "id": shape.response_id,
        "object": kind,
        "created": shape.created,
        "model": shape.model,
        "choices": [],
        "usage": use,
    }


def sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
