"""An HTTP/1.x response head, parsed: the status, the headers as received, and how the body is framed.
Pure: bytes in, facts out (the pool's connection protocol acts on them)."""

from __future__ import annotations

from dataclasses import dataclass


class ProtocolError(Exception):
    """The upstream's answer is not HTTP/1.x as we can read it."""


@dataclass(frozen=True)
class Head:
    status: int
    headers: list[tuple[str, str]]  # (name, value) as received
    length: int | None  # Content-Length, if given
    chunked: bool  # Transfer-Encoding: chunked (then `length` does not apply)
    keep_alive: bool  # the connection may carry another request afterwards


def parse_head(head: bytes) -> Head | None:
    """The head up to (not including) its blank line; None for an interim 1xx answer."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ProtocolError(f"bad status line {lines[0][:60]!r}")
    status = int(code)
    if 100 <= status < 200:
        return None
    headers: list[tuple[str, str]] = []
    length: int | None = None
    chunked = False
    keep_alive = version == "HTTP/1.1"
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"bad header line {line[:60]!r}")
        value = value.strip()
        headers.append((name, value))
        key = name.lower()
        if key == "content-length":
            if not value.isdigit():
                raise ProtocolError(f"bad Content-Length {value[:20]!r}")
            length = int(value)
        elif key == "transfer-encoding":
            chunked = "chunked" in value.lower()
        elif key == "connection":
            keep_alive = keep_alive and "close" not in value.lower()
    return Head(status, headers, length, chunked, keep_alive)
