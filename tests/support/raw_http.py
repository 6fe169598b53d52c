"""Reading HTTP/1.1 requests off a raw stream, for the tests' own hand-written servers."""

from __future__ import annotations

import asyncio


def content_length(head: bytes) -> int:
    """The Content-Length of a request head (0 without one)."""
    return next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                 if line.lower().startswith(b"content-length:")), 0)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of the next request; raises IncompleteReadError or ConnectionError when the peer
    closes."""
    head = await reader.readuntil(b"\r\n\r\n")
    return head, await reader.readexactly(content_length(head))
