"""A completion request's body: read (bounded in time), decoded, parsed (bounded in depth).

What comes out is what this node checked and what a forward sends on: the body as JSON bytes after
any `Content-Encoding` was undone (aiohttp decodes gzip, deflate and, where installed, br/zstd), so
an upstream gets exactly the bytes that the headers sent with them describe. Anything that is not
JSON this node and its upstreams can hold — invalid UTF-8, lone surrogate escapes, nesting more than
`MAX_BODY_DEPTH` levels deep, integers beyond Python's 4300 digits, a body that does not match its
`Content-Encoding` — is a 400 here, never a 500 here or further on.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from .. import safejson
from .errors import APIError, bad_request

MAX_BODY_DEPTH = 64  # an OpenAI request nests about 6 deep; a json_schema a few dozen


async def read_json(request: web.Request, timeout: float) -> tuple[bytes, object]:
    """The body (decoded from its Content-Encoding) and its JSON. A body still arriving after
    `timeout` seconds (a client trickling it) is refused with 408."""
    raw = await read_body(request, timeout)
    return raw, parse_json(raw)


async def read_body(request: web.Request, timeout: float) -> bytes:
    try:
        if request.content.is_eof():  # all here already (the usual case): no timer to arm
            return await request.read()
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise APIError(408, f"The request body did not arrive within {timeout:g}s.", code="body_timeout") from None
    except RequestPayloadError:
        # The rest of the body can't be parsed either: answer, then close the connection (and tell
        # aiohttp not to read on, which would fail again and be logged as an unhandled error).
        request.content.feed_eof()
        raise APIError(400, _unreadable(request), code="invalid_body", close_connection=True) from None


def parse_json(raw: bytes) -> object:
    """JSON text in UTF-8 (RFC 8259; a leading BOM is allowed), within `MAX_BODY_DEPTH`."""
    try:
        return safejson.loads(raw, MAX_BODY_DEPTH)
    except safejson.JSONRefused as exc:
        raise bad_request(str(exc), param=_short(exc.path), code=exc.code) from None


def _unreadable(request: web.Request) -> str:
    encoding = request.headers.get("Content-Encoding")
    if encoding:
        return f"The request body cannot be decoded as its Content-Encoding ({_short(encoding)}) says."
    return "The request body cannot be read: its framing (Content-Length or chunked encoding) is broken."


def _short(text: str | None, limit: int = 100) -> str | None:
    if text is None:
        return None
    text = text.encode("ascii", "backslashreplace").decode()
    return text if len(text) <= limit else text[:limit - 3] + "..."
