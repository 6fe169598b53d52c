"""How an answer made in chat completions' (or completions') shape reaches the client.

The local engine and an upstream both answer in the shape of the endpoint they were asked on; a
`Render` turns that into what the client asked for. For `/v1/chat/completions` and `/v1/completions`
it passes everything through (`PASS`); `/v1/responses` asks the chat path and renders its chunks as
Responses API events (`dsnode.api.responses_api.events`).
"""

from __future__ import annotations

from typing import Any, Protocol

from .errors import APIError, sse_error_event
from .responses import DONE, sse


class Render(Protocol):
    passthrough: bool  # True: the bytes are the client's already (a relayed answer goes on as it came)

    def opening(self) -> bytes:
        """What a stream starts with, before the first chunk."""

    def chunk(self, piece: dict[str, Any]) -> bytes:
        """A stream chunk."""

    def events(self, data: bytes) -> bytes:
        """An upstream's whole SSE events (`data: ...` lines, `data: [DONE]` included)."""

    def failed(self, error: APIError) -> bytes:
        """The stream failed: what says so (`closing` follows)."""

    def closing(self) -> bytes:
        """The stream ended well (after the usage chunk, if any)."""

    def whole(self, body: dict[str, Any]) -> dict[str, Any]:
        """A whole (non-streamed) answer."""


class PassThrough:
    """Chat completions and completions: the client's own shape."""

    passthrough = True

    def opening(self) -> bytes:
        return b""

    def chunk(self, piece: dict[str, Any]) -> bytes:
        return sse(piece)

    def events(self, data: bytes) -> bytes:
        return data

    def failed(self, error: APIError) -> bytes:
        return sse_error_event(error)

    def closing(self) -> bytes:
        return DONE

    def whole(self, body: dict[str, Any]) -> dict[str, Any]:
        return body


PASS: Render = PassThrough()
