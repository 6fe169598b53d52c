"""Every failure becomes an HTTP answer here, and only here, in OpenAI's error shape:
`{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

import structlog
from aiohttp import web

from ..cluster.splits import SplitError
from ..inference.engine import ConstraintFailed, ContextLengthExceeded, EngineError, EngineNotReady, QueueFull
from ..inference.tokenizer import ChatTemplateError

log = structlog.get_logger("dsnode.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        close_connection: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.close_connection = close_connection  # the connection can't carry another request

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str, available: list[str]) -> APIError:
    names = ", ".join(sorted(available)) or "none"
    return APIError(
        404,
        f"The model `{model}` does not exist or is not served by this cluster (available: {names}).",
        param="model",
        code="model_not_found",
    )


# What engines say when close() ends their requests (BatchingEngine: the first from close(), the
# second from a request admitted while it closes): those requests were cut short by a stop.
ENGINE_SHUTDOWN_REASONS = frozenset({"the node is shutting down", "engine is shutting down"})


def shutting_down() -> APIError:
    """A request in flight that the stop cut short (the drain deadline passed)."""
    return APIError(503, "This request was cut short: the node is shutting down",
                    type="service_unavailable", code="shutting_down", headers={"Retry-After": "5"})


def client_gone() -> APIError:
    """The client closed the connection before its answer was written (nginx's 499; nobody reads it)."""
    return APIError(499, "client went away", code="client_closed_request")


def to_api_error(exc: BaseException) -> APIError:
    """The one switch from internal errors to HTTP."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ConnectionError):  # a write to a client that has just hung up
        return client_gone()
    if isinstance(exc, QueueFull):
        return APIError(
            429,
            str(exc),
            type="server_overloaded",
            code="queue_full",
            headers={"Retry-After": str(exc.retry_after_s)},
        )
    if isinstance(exc, ContextLengthExceeded):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, ChatTemplateError):
        return APIError(400, str(exc), param="messages", code="invalid_messages")
    if isinstance(exc, EngineNotReady):
        if exc.reason in ENGINE_SHUTDOWN_REASONS:
            return shutting_down()
        return APIError(
            503, f"The model is not ready: {exc.reason}", type="service_unavailable",
            code="not_ready", headers={"Retry-After": "5"},
        )
    if isinstance(exc, ConstraintFailed):
        return APIError(400, str(exc), param=exc.param, code="invalid_schema")
    if isinstance(exc, EngineError):
        return APIError(500, str(exc), type="server_error", code="engine_error")
    if isinstance(exc, SplitError):  # an operator's canary command that does not apply
        return APIError(409, str(exc), code="canary_refused")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return APIError(413, "The request body is too large.", code="request_too_large")
    if isinstance(exc, web.HTTPException):
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        kept = {name: exc.headers[name] for name in _KEPT_HEADERS if name in exc.headers}
        return APIError(exc.status, exc.reason, type=kind, code=_slug(exc.reason), headers=kept)
    return APIError(500, "Internal server error.", type="server_error", code="internal_error")


# what aiohttp's own error answers say that a client needs: a 405 lists the methods the path takes
# (RFC 9110 requires `Allow` there)
_KEPT_HEADERS = ("Allow",)


def protocol_error(status: int, description: str) -> APIError:
    """A request aiohttp's HTTP parser refused before any handler ran (`dsnode.api.protocol`), or a
    failure outside every middleware."""
    if status >= 500:
        return APIError(status, "Internal server error.", type="server_error", code="internal_error")
    return APIError(status, f"Bad HTTP request: {description}.", code="bad_http_request")


def error_response(error: APIError) -> web.Response:
    response = web.json_response(error.body(), status=error.status, headers=error.headers)
    if error.close_connection:
        response.force_close()
    return response


def sse_error_event(error: APIError) -> bytes:
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like pass through
        return error_response(to_api_error(exc))
    except APIError as exc:
        return error_response(exc)
    except (QueueFull, ContextLengthExceeded, ChatTemplateError, EngineError, SplitError) as exc:
        return error_response(to_api_error(exc))
    except ConnectionError:
        return error_response(client_gone())  # not a fault of ours; aiohttp drops the write quietly
    except Exception as exc:
        log.exception("unhandled_error", path=request.path, error=str(exc))
        return error_response(to_api_error(exc))


def _slug(reason: str) -> str:
    return reason.lower().replace(" ", "_")
