"""One record per request: filled in while it is served, then logged (and counted) exactly once.

It is made, filled and read on every request, so it is a slotted dataclass and `fields()` builds the
log event's dict in one pass (docs/performance.md)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

# uuid.UUID(bytes=..., version=4): the version nibble 4, the RFC 4122 variant bits 10
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_request_id() -> str:
    """A random UUID4 as 32 hex digits: what `uuid.uuid4().hex` gives, for less than half its cost."""
    return "%032x" % ((int.from_bytes(os.urandom(16), "big") & _UUID4_CLEAR) | _UUID4_SET)


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    endpoint: str  # "chat" | "completion"
    node: str  # the node that generated the answer
    route: str = "local"  # "local" | "forwarded"
    model: str = ""
    stream: bool = False
    status: int = 200
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those the serving node's prompt cache gave
    completion_tokens: int = 0
    finish_reason: str | None = None
    upstream: str | None = None  # forwarded: the peer that served it
    route_reason: str = ""
    error: str | None = None
    client: str | None = None
    user: str | None = None  # the client's identity (API key name), never the key
    version: str | None = None  # the model version that generated the answer (X-DSNode-Version)
    split: str | None = None  # how a split chose the version: "sticky (<source>)" or "shares"
    stream_error: bool = False  # a relayed stream carried an error event
    started: float = field(default_factory=time.monotonic)
    admitted: float | None = None  # engine accepted it (local) / upstream answered headers
    queued_s: float | None = None  # local: time in the engine's waiting queue (from the first Delta)
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished: float | None = None

    def mark_token(self) -> None:
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
        self.token_times.append(now)

    def done(self, status: int | None = None, error: str | None = None) -> None:
        if status is not None:
            self.status = status
        if error is not None:
            self.error = error
        self.finished = time.monotonic()

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def duration_s(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def fields(self) -> dict[str, Any]:
        """The structured fields of the per-request log event."""
        started, first = self.started, self.first_token
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "route": self.route,
            "node": self.node,
            "model": self.model,
            "stream": self.stream,
            "status": self.status,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "duration_ms": round(((self.finished or time.monotonic()) - started) * 1000, 1),
            "ttft_ms": None if first is None else round((first - started) * 1000, 1),
        }
        # the optional ones, only when set (same order as ever)
        if self.cached_tokens:
            out["cached_tokens"] = self.cached_tokens
        if self.upstream:
            out["upstream"] = self.upstream
        if self.route_reason:
            out["route_reason"] = self.route_reason
        if self.error:
            out["error"] = self.error
        if self.client:
            out["client"] = self.client
        if self.user:
            out["user"] = self.user
        if self.version:
            out["version"] = self.version
        if self.split:
            out["split"] = self.split
        return out
