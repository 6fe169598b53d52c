"""Chat answers rendered as the Responses API's: a whole chat completion → a response object, a chat
stream's chunks → the Responses event stream. The same `ResponsesRender` serves the local engine's
chunks and an upstream's relayed SSE events, so both routes answer alike.

Output items, in the order the model produces them: `reasoning` (R1's thinking, as `reasoning_text`
content), `message` (the answer, as `output_text`), `function_call` (one per tool call). A stream sends,
per item, `response.output_item.added`, its content part, the text deltas, their `.done` events and
`response.output_item.done`; between `response.created` / `response.in_progress` at the start and
`response.completed` (`response.incomplete` when the answer hit `max_output_tokens`, `response.failed`
when the engine failed) at the end. Every event carries its `sequence_number`; there is no `[DONE]`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from ..errors import APIError
from .request import ResponsesRequest

Keep = Callable[[dict[str, Any]], None]  # takes the finished response (to store it)


@dataclass
class _Item:
    kind: str  # "message" | "reasoning" | "function_call"
    id: str
    index: int  # output_index
    text: str = ""  # output or reasoning text, or a call's arguments
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    call_id: str = ""
    name: str = ""
    status: str = ""  # as a stream closed it ("": a whole answer's, from the finish reason)

    def body(self, status: str) -> dict[str, Any]:
        if self.kind == "message":
            return {"id": self.id, "type": "message", "status": status, "role": "assistant",
                    "content": [self.part()] if status != "in_progress" else []}
        if self.kind == "reasoning":
            return {"id": self.id, "type": "reasoning", "summary": [], "status": status,
                    "content": [self.part()] if status != "in_progress" else []}
        return {"id": self.id, "type": "function_call", "status": status, "call_id": self.call_id,
                "name": self.name, "arguments": self.text}

    def part(self, text: str | None = None) -> dict[str, Any]:
        text = self.text if text is None else text
        if self.kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [],
                "logprobs": self.logprobs if text else []}


class ResponsesRender:
    """One response: its id, the request's settings it repeats, and (streamed) where the output is."""

    passthrough = False

    def __init__(self, request: ResponsesRequest, keep: Keep | None = None) -> None:
        self.id = "resp_" + secrets.token_hex(24)
        self.created = int(time.time())
        self.request = request
        self.keep = keep
        self.final: dict[str, Any] | None = None  # the finished response
        self._sequence = 0
        self._items: list[_Item] = []
        self._open: _Item | None = None
        self._usage: dict[str, Any] | None = None
        self._finish: str | None = None

    # --- a whole answer -----------------------------------------------------------------------------
    def whole(self, body: dict[str, Any]) -> dict[str, Any]:
        choice = (body.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        logprobs = (choice.get("logprobs") or {}).get("content") or []
        if message.get("reasoning_content"):
            self._new("reasoning", message["reasoning_content"])
        if message.get("content") or not (message.get("tool_calls") or message.get("reasoning_content")):
            self._new("message", message.get("content") or "", logprobs)  # as a stream makes it
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            self._new("function_call", function.get("arguments") or "", call_id=call.get("id") or "",
                      name=function.get("name") or "")
        self._usage, self._finish = body.get("usage"), choice.get("finish_reason")
        return self._finished(self._status())

    # --- a stream -----------------------------------------------------------------------------------
    def opening(self) -> bytes:
        start = self.response("in_progress")
        return self._event("response.created", response=start) + self._event("response.in_progress", response=start)

    def chunk(self, piece: dict[str, Any]) -> bytes:
        if self.final is not None:
            return b""
        if piece.get("usage"):
            self._usage = piece["usage"]
        out = b""
        for choice in piece.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # the Responses API has one answer (a translated request asks for n = 1)
            delta = choice.get("delta") or {}
            logprobs = (choice.get("logprobs") or {}).get("content") or []
            if delta.get("reasoning_content"):
                out += self._text("reasoning", delta["reasoning_content"], [])
            if delta.get("content"):
                out += self._text("message", delta["content"], logprobs)
            elif logprobs and self._open is not None and self._open.kind == "message":
                self._open.logprobs.extend(logprobs)
            for call in delta.get("tool_calls") or ():
                out += self._call(call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return out

    def events(self, data: bytes) -> bytes:
        """An upstream's chat stream events, rendered."""
        out = b""
        for block in data.split(b"\n\n"):
            payload = b"".join(line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:"))
            if not payload:
                continue
            if payload == b"[DONE]":
                out += self.closing()
                continue
            try:
                piece = json.loads(payload)
            except ValueError:
                continue  # not an event of a chat stream: nothing a response can say
            if not isinstance(piece, dict):
                continue
            error = piece.get("error") if "choices" not in piece else None
            if isinstance(error, dict):
                out += self.failed(APIError(500, str(error.get("message")), type=str(error.get("type")),
                                            code=error.get("code")))
            else:
                out += self.chunk(piece)
        return out

    def failed(self, error: APIError) -> bytes:
        if self.final is not None:
            return b""
        out = self._close("incomplete")
        failure = {"code": error.code or "server_error", "message": error.message}
        return out + self._event("response.failed", response=self._finished("failed", failure))

    def closing(self) -> bytes:
        if self.final is not None:
            return b""
        status = self._status()
        out = self._close(status)
        if not self._items:  # an empty answer is still a message
            out += self._text("message", "", []) + self._close(status)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return out + self._event(kind, response=self._finished(status))

    # --- the response object ------------------------------------------------------------------------
    def response(self, status: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
        request = self.request
        done = status not in ("in_progress",)
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": False,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "metadata": request.metadata or {},
            "model": request.model,
            "output": [item.body(item.status or self._item_status(item)) for item in self._items] if done else [],
            "parallel_tool_calls": request.parallel_tool_calls,
            "previous_response_id": request.previous_response_id,
            "reasoning": request.reasoning or {"effort": None, "summary": None},
            "store": request.store,
            "temperature": 1.0 if request.temperature is None else request.temperature,
            "text": {"format": request.text_format()},
            "tool_choice": _dumped(request.tool_choice) or "auto",
            "tools": [_dumped(tool) for tool in request.tools or ()],
            "top_logprobs": request.top_logprobs or 0,
            "top_p": 1.0 if request.top_p is None else request.top_p,
            "truncation": "disabled",
            "usage": _usage(self._usage) if done and self._usage else None,
            "user": request.user,
        }

    def _finished(self, status: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
        self.final = self.response(status, error)
        if self.keep is not None:
            self.keep(self.final)
        return self.final

    def _status(self) -> str:
        return "incomplete" if self._finish == "length" else "completed"

    def _item_status(self, item: _Item) -> str:
        last = item is self._items[-1]
        return "incomplete" if last and self._finish == "length" and item.kind != "function_call" else "completed"

    # --- stream items -------------------------------------------------------------------------------
    def _new(self, kind: str, text: str = "", logprobs: list[dict[str, Any]] | None = None, call_id: str = "",
             name: str = "") -> _Item:
        prefix = {"message": "msg_", "reasoning": "rs_", "function_call": "fc_"}[kind]
        item = _Item(kind, prefix + secrets.token_hex(24), len(self._items), text, list(logprobs or ()), call_id,
                     name)
        self._items.append(item)
        return item

    def _text(self, kind: str, text: str, logprobs: list[dict[str, Any]]) -> bytes:
        out = b""
        if self._open is None or self._open.kind != kind:
            out += self._close("completed")
            item = self._open = self._new(kind)
            out += self._event("response.output_item.added", output_index=item.index, item=item.body("in_progress"))
            out += self._event("response.content_part.added", item_id=item.id, output_index=item.index,
                               content_index=0, part=item.part(""))
        item = self._open
        item.text += text
        item.logprobs.extend(logprobs)
        if not text:
            return out
        if kind == "reasoning":
            return out + self._event("response.reasoning_text.delta", item_id=item.id, output_index=item.index,
                                     content_index=0, delta=text)
        return out + self._event("response.output_text.delta", item_id=item.id, output_index=item.index,
                                 content_index=0, delta=text, logprobs=logprobs)

    def _call(self, call: dict[str, Any]) -> bytes:
        function = call.get("function") or {}
        arguments = function.get("arguments") or ""
        out = b""
        if call.get("id") or self._open is None or self._open.kind != "function_call":
            out += self._close("completed")
            item = self._open = self._new("function_call", call_id=call.get("id") or "", name=function.get("name") or "")
            out += self._event("response.output_item.added", output_index=item.index, item=item.body("in_progress"))
        item = self._open
        item.text += arguments
        if arguments:
            out += self._event("response.function_call_arguments.delta", item_id=item.id, output_index=item.index,
                               delta=arguments)
        return out

    def _close(self, status: str) -> bytes:
        item, self._open = self._open, None
        if item is None:
            return b""
        item.status = status
        out = b""
        if item.kind == "function_call":
            out += self._event("response.function_call_arguments.done", item_id=item.id, output_index=item.index,
                               name=item.name, arguments=item.text)
        else:
            done = "response.reasoning_text.done" if item.kind == "reasoning" else "response.output_text.done"
            extra = {} if item.kind == "reasoning" else {"logprobs": item.logprobs}
            out += self._event(done, item_id=item.id, output_index=item.index, content_index=0, text=item.text,
                               **extra)
            out += self._event("response.content_part.done", item_id=item.id, output_index=item.index,
                               content_index=0, part=item.part())
        return out + self._event("response.output_item.done", output_index=item.index, item=item.body(status))

    def _event(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        return b"event: " + kind.encode() + b"\ndata: " + data.encode() + b"\n\n"


def _dumped(value: Any) -> Any:
    """A setting as the request gave it."""
    return value.model_dump(by_alias=True, exclude_none=True) if isinstance(value, BaseModel) else value


def _usage(chat: dict[str, Any]) -> dict[str, Any]:
    """Chat usage → the Responses API's."""
    cached = (chat.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (chat.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": chat.get("prompt_tokens", 0),
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": chat.get("completion_tokens", 0),
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": chat.get("total_tokens", 0),
    }
