"""A chat answer as OpenAI clients read it: the engine's text split into `reasoning_content` and
`content` (at `<think>` / `</think>`), and the model's tool calls parsed out of the content into
`tool_calls`. The same object serves a streamed answer (`push` per delta, `finish` at the end) and a
whole one.

Tool calls are recognised by the model's own format (`dsnode.inference.toolformats`). Content before a
call streams as it comes; from the first marker on it is held until the end, then parsed: well-formed
calls become `tool_calls` (finish_reason "tool_calls"); a malformed call is returned as the text it was,
with the generation's own finish reason — never an error.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from ..inference.reasoning import THINK_END, Piece, ReasoningSplitter, prompt_opens_reasoning
from ..inference.tokenizer import TextTokenizer
from ..inference.toolformats import ToolCall, ToolFormat, format_for_template
from .schemas import ChatCompletionRequest
from .tools import offered_tools

Part = tuple[Literal["reasoning", "content", "tool_call"], Any]  # text, or a tool call's JSON body


@dataclass
class ChatOutput:
    splitter: ReasoningSplitter | None  # None: the model does not reason
    tools: ToolFormat | None  # None: no tools offered, nothing parsed
    _held: str = ""  # content that may be (or is) a tool call
    _in_call: bool = False
    calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def reasons(self) -> bool:
        return self.splitter is not None

    @property
    def starts_in_reasoning(self) -> bool:
        """The prompt opened `<think>` (before any text was pushed)."""
        return self.splitter is not None and self.splitter.in_reasoning

    def push(self, text: str) -> list[Part]:
        pieces: list[Piece] = self.splitter.push(text) if self.splitter else [("content", text)]
        return self._parts(pieces)

    def finish(self) -> list[Part]:
        parts = self._parts(self.splitter.flush()) if self.splitter else []
        return parts + self._release_calls()

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return "tool_calls" if self.calls else engine_reason

    def _parts(self, pieces: list[Piece]) -> list[Part]:
        out: list[Part] = []
        for channel, text in pieces:
            if channel == "reasoning" or self.tools is None:
                out.append((channel, text))
            else:
                released = self._content(text)
                if released:
                    out.append(("content", released))
        return out

    def _content(self, text: str) -> str:
        """Content that is known not to be part of a tool call."""
        assert self.tools is not None
        self._held += text
        if self._in_call:
            return ""
        at = self._held.find(self.tools.start)
        if at >= 0:
            out, self._held, self._in_call = self._held[:at], self._held[at:], True
            return out
        keep = _partial_prefix(self._held, self.tools.start)
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep:]
        return out

    def _release_calls(self) -> list[Part]:
        held, self._held = self._held, ""
        if not held:
            return []
        parsed = self.tools.parse(held) if self.tools and self._in_call else None
        if parsed is None or not parsed[1]:
            return [("content", held)]  # malformed (or only a partial marker): the text as it was
        head, calls = parsed
        parts: list[Part] = [("content", head)] if head else []
        for call in calls:
            body = _call_json(call, len(self.calls))
            self.calls.append(body)
            parts.append(("tool_call", body))
        return parts


def model_reasons(setting: str, template: str | None) -> bool:
    """`[model] reasoning`: "auto" means the chat template knows `</think>` (R1's drops it from history)."""
    if setting == "auto":
        return bool(template) and THINK_END in (template or "")
    return setting == "deepseek_r1"


def new_chat_output(body: ChatCompletionRequest, tokenizer: TextTokenizer, prompt_ids: list[int],
                    reasoning: str) -> ChatOutput:
    splitter = None
    if model_reasons(reasoning, tokenizer.chat_template):
        tail = tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False)
        splitter = ReasoningSplitter(in_reasoning=prompt_opens_reasoning(tail))
    tools = format_for_template(tokenizer.chat_template) if offered_tools(body) else None
    return ChatOutput(splitter, tools)


def _call_json(call: ToolCall, index: int) -> dict[str, Any]:
    return {"index": index, "id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def _partial_prefix(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def whole_message(output: ChatOutput, text: str) -> dict[str, Any]:
    """The `message` of a whole (non-streamed) chat answer."""
    parts = output.push(text) + output.finish()
    content = "".join(t for kind, t in parts if kind == "content")
    message: dict[str, Any] = {"role": "assistant", "content": content}
    reasoning = "".join(t for kind, t in parts if kind == "reasoning")
    if reasoning:  # absent when the model did not reason: such answers are exactly as before
        message["reasoning_content"] = reasoning
    if output.calls:
        message["content"] = content or None
        message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in output.calls]
    return message


def stream_delta(part: Part) -> dict[str, Any]:
    """The `delta` of a stream chunk carrying one part."""
    kind, value = part
    if kind == "tool_call":
        return {"tool_calls": [value]}
    if kind == "reasoning":
        return {"reasoning_content": value}
    return {"content": value}
