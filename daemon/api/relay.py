"""Pass an upstream's answer on to the client: a whole answer (Content-Length, or any answer to a
request that did not ask for a stream) as one body, read up to `[routing] max_answer_bytes`; a stream
as it arrives, each SSE event as soon as it is complete (and at most `max_event_bytes` long).

- a stream cut after tokens were sent, or an event over the limit → an error event and `data: [DONE]`;
- a whole answer cut mid-body → 502 `upstream_cut`; over the limit → 502 `upstream_answer_too_large`;
- the node stops and the drain deadline passes → an error event (`shutting_down`) and `data: [DONE]`.

What the upstream did wrong goes back to the forwarder, which counts it against the upstream.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import suppress
from typing import AsyncIterator

import structlog
from aiohttp import web

from .. import headers
from ..cluster.balancer import Peer
from ..cluster.pool import BodyCut, TooLarge
from ..cluster.pool import Response as PoolResponse
from ..config import RoutingSection
from ..record import RequestRecord
from .errors import APIError, shutting_down
from .render import PASS, Render
from .responses import DONE

log = structlog.get_logger("dsnode.forward")

# Response headers not passed back (aiohttp sets framing and date itself; the route is ours to say).
_DROP_RESPONSE = frozenset(
    "connection keep-alive transfer-encoding content-length date server x-dsnode-route x-request-id".split()
)


class Relays:
    """The requests being forwarded now, so a stop can end them with an error (not drop them)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[object]] = set()
        self.cutting = False  # the drain deadline passed: a cancellation now is the stop's

    def cut(self) -> int:
        """The drain deadline passed: end every forwarded request cleanly (an error event and
        `data: [DONE]` for a stream under way, 503 for one not answered yet). Returns how many."""
        self.cutting = True
        for task in self.tasks:
            task.cancel()
        return len(self.tasks)


RELAYS: web.AppKey[Relays] = web.AppKey("relays", Relays)


class UpstreamFault(APIError):
    """The upstream broke a whole answer: cut it, stalled, or sent more than `max_answer_bytes`.
    A 502 for the client, and a failure against the upstream (passive health)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(502, message, type="server_error", code=code)


async def relay(
    request: web.Request, response: PoolResponse, peer: Peer, record: RequestRecord, stream: bool,
    routing: RoutingSection, relays: Relays, render: Render,
) -> tuple[web.StreamResponse, str | None]:
    """The client's answer (through `render`), and what the upstream did wrong on the way (None:
    nothing). A whole answer it broke raises UpstreamFault; a stream it broke ends with an error event."""
    out_headers = response_headers(response.headers, record)
    if response.sized or not stream:  # a non-streamed request gets a whole answer, whatever the framing
        return await _relay_whole(request, response, peer, record, out_headers, routing, stream, render), None
    return await _relay_stream(request, response, peer, record, out_headers, routing, relays, render)


async def _relay_whole(request: web.Request, response: PoolResponse, peer: Peer, record: RequestRecord,
                       out_headers: list[tuple[str, str]], routing: RoutingSection, stream: bool,
                       render: Render) -> web.StreamResponse:
    try:
        data = await response.read(routing.first_token_timeout, routing.max_answer_bytes)
    except BodyCut as exc:
        response.close()
        raise UpstreamFault(f"The upstream {peer.label} stopped in the middle of its answer ({exc}).",
                            "upstream_cut") from None
    except TooLarge:
        response.close()
        raise UpstreamFault(f"The upstream {peer.label} answered more than this node's limit of "
                            f"{routing.max_answer_bytes} bytes (max_answer_bytes).", "upstream_answer_too_large") from None
    except BaseException:
        response.close()
        raise
    response.release()
    record.mark_token()
    note_usage(record, data)
    body: bytes | bytearray = data
    if not render.passthrough and response.status < 300:  # an answer, not a refusal: in the client's shape
        try:
            body = _rendered_whole(render, bytes(data), stream)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError):
            raise UpstreamFault(f"The upstream {peer.label} answered something that is not a chat completion.",
                                "upstream_bad_answer") from None
    whole = web.Response(body=body, status=response.status, headers=out_headers)
    # Sent here rather than by aiohttp after the handler returns: the request's log event and
    # metrics (Node.observe) then come after the client has its answer, not before it.
    await whole.prepare(request)
    await whole.write_eof()
    return whole


def _rendered_whole(render: Render, data: bytes, stream: bool) -> bytes:
    if stream:  # a stream the upstream sent with a length: its events
        return render.opening() + render.events(data)
    return json.dumps(render.whole(json.loads(data)), ensure_ascii=False).encode()


async def _relay_stream(request: web.Request, response: PoolResponse, peer: Peer, record: RequestRecord,
                        out_headers: list[tuple[str, str]], routing: RoutingSection,
                        relays: Relays, render: Render) -> tuple[web.StreamResponse, str | None]:
    out = web.StreamResponse(status=response.status, headers=out_headers)
    sent = _Sent()
    try:
        await out.prepare(request)
        if response.status < 300:
            await _write(out, render.opening())
        else:
            render = PASS  # a refusal streamed (an upstream's error events): as it came
        chunks = response.chunks(routing.first_token_timeout)
        ended, fault = await _pass_events(chunks, out, record, sent, routing.max_event_bytes, render)
    except (asyncio.CancelledError, ConnectionError) as exc:
        response.close()  # the client went away, or the stop's deadline: drop the upstream connection
        return await _stream_interrupted(exc, out, record, sent, relays, render), None
    except BaseException:
        response.close()
        raise
    if fault is None:
        response.release()
    else:
        response.close()
        log.warning("upstream_cut", request_id=record.request_id, upstream=peer.url, error=fault.message)
    if fault is not None and not ended:
        error = APIError(502, f"The upstream {peer.label} {fault.message}.", type="server_error", code=fault.code)
        record.status, record.error = error.status, error.message
        await _write(out, render.failed(error) + render.closing())
    elif not ended:
        await _write(out, render.closing())  # an upstream that ended without [DONE]: end the stream properly
    await out.write_eof()
    return out, None if fault is None else fault.message


async def _stream_interrupted(exc: BaseException, out: web.StreamResponse, record: RequestRecord, sent: "_Sent",
                              relays: Relays, render: Render) -> web.StreamResponse:
    """The client went away (raise on), or the stop's deadline passed (end the stream cleanly)."""
    if sent.done:  # the client has its whole answer ([DONE]); it only hung up before the end
        _uncancel(exc)
        return out
    if not (relays.cutting and isinstance(exc, asyncio.CancelledError) and out.prepared):
        raise exc
    _uncancel(exc)
    error = shutting_down()
    record.status, record.error = error.status, error.message
    with suppress(ConnectionError):
        await _write(out, render.failed(error) + render.closing())
        await out.write_eof()
    return out


class _Fault:
    """How a relayed stream went wrong on the upstream's side."""

    __slots__ = ("message", "code")

    def __init__(self, message: str, code: str) -> None:
        self.message = message  # completes "The upstream NAME ..."
        self.code = code


class _Sent:
    """How far a relayed stream got to the client."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False  # `data: [DONE]` was written


def _uncancel(exc: BaseException) -> None:
    task = asyncio.current_task()
    if isinstance(exc, asyncio.CancelledError) and task is not None:
        task.uncancel()


async def _pass_events(
    chunks: AsyncIterator[bytes], out: web.StreamResponse, record: RequestRecord, sent: _Sent, max_event: int,
    render: Render,
) -> tuple[bool, _Fault | None]:
    """Write whole SSE events as they arrive (a partial one waits for its end, so a cut never leaves
    half an event before the error event, and is held up to `max_event` bytes). Returns whether the
    stream ended with `data: [DONE]`, and what stopped it early, if anything did."""
    carry = b""
    tail = b""
    try:
        async for data in chunks:
            if carry:
                data, carry = carry + data, b""
            end = data.rfind(b"\n\n") + 2
            if end == 1:
                carry = data
                if len(carry) > max_event:
                    return tail.endswith(DONE), _Fault(f"sent an event of more than {max_event} bytes, this "
                                                       "node's limit (max_event_bytes)", "upstream_answer_too_large")
                continue
            if end < len(data):
                data, carry = data[:end], data[end:]
            record.mark_token()
            if b'"prompt_tokens"' in data:  # the usage chunk (stream_options.include_usage)
                note_usage(record, data)
            if b'data: {"error"' in data:  # the upstream's own error event (its engine failed mid-stream)
                record.stream_error = True
            await _write(out, data if render.passthrough else render.events(data))
            tail = data
            sent.done = data.endswith(DONE)
    except BodyCut as exc:
        return tail.endswith(DONE), _Fault(f"stopped in the middle of the stream ({exc})", "upstream_cut")
    if carry:
        await _write(out, carry if render.passthrough else render.events(carry))
        tail = carry
    return tail.endswith(DONE), None


async def _write(out: web.StreamResponse, data: bytes) -> None:
    if data:
        await out.write(data)


def response_headers(upstream: list[tuple[str, str]], record: RequestRecord) -> list[tuple[str, str]]:
    out = [(k, v) for k, v in upstream if k.lower() not in _DROP_RESPONSE]
    out.append((headers.ROUTE, "forwarded"))
    out.append((headers.REQUEST_ID, record.request_id))
    return out


async def read_refusal(response: PoolResponse, timeout: float, limit: int) -> bytes:
    """A refusal's body (an upstream's 5xx/429), to pass on if no other upstream takes the request;
    empty if it is cut or over `limit`."""
    try:
        data = await response.read(timeout, limit)
    except (BodyCut, TooLarge):
        response.close()
        return b""
    except BaseException:
        response.close()
        raise
    response.release()
    return bytes(data)


def note_usage(record: RequestRecord, data: bytes | bytearray) -> None:
    """Token counts for the log record, from the upstream's `usage` (the last one in `data`)."""
    at = data.rfind(b'"usage":')
    if at < 0:
        return
    text = data[at + 8:].decode("utf-8", "replace").lstrip()
    if not text.startswith("{"):
        return
    try:
        usage, _ = _DECODER.raw_decode(text)
        record.prompt_tokens = int(usage["prompt_tokens"])
        record.completion_tokens = int(usage["completion_tokens"])
        record.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    except (ValueError, KeyError, TypeError, AttributeError):
        pass


_DECODER = json.JSONDecoder()
