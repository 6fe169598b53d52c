"""What aiohttp answers and logs by itself, before any handler runs, made to look like the node.

A request head aiohttp's parser refuses (a control character, a space before a colon, obs-fold, a
line over 8190 bytes, an unknown Content-Encoding, no Host…) never reaches the app's middlewares:
aiohttp answers it with a text/plain 400 and logs a plain-text traceback that quotes the offending
line — an `Authorization: Bearer` key included. `Runner` (the `web.AppRunner` `dsnode serve` uses)
swaps in a request handler whose `handle_error` answers in OpenAI's error shape and logs one event,
`bad_http_request`, whose description never quotes what the client sent.

aiohttp offers no public hook for this; the swap uses `AppRunner._make_server` and `Server.__call__`
of the pinned version (constraints-cpu.txt), and `tests/e2e/test_protocol_errors.py` fails if an
upgrade changes them.
"""

from __future__ import annotations

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from ..logs import describe_http_error, exception_text
from .errors import protocol_error

log = structlog.get_logger("dsnode.api")


class Runner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        return server


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class _Handler(RequestHandler):
    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        description = describe(exc) if status < 500 else "internal error"
        if status >= 500:
            log.error("unhandled_error", path=_path(request), error=description,
                      traceback=exception_text(exc) if exc else None)
        elif isinstance(exc, BadHttpMethod) and self._request_count == 1:
            log.debug("bad_http_request", client=request.remote, status=status, error=description)
        else:
            log.warning("bad_http_request", client=request.remote, status=status, error=description)
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        error = protocol_error(status, description)
        response = web.json_response(error.body(), status=status)
        response.force_close()
        return response


def describe(exc: BaseException | None) -> str:
    """What was wrong with a request aiohttp refused, without quoting any of it."""
    return describe_http_error(exc) if exc is not None else "bad request"


def _path(request: BaseRequest) -> str | None:
    try:
        return request.path
    except Exception:  # a request whose URL did not parse
        return None
