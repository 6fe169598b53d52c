"""Pass an upstream's answer on to the client as it arrives: a whole answer (Content-Length) as one
body, a stream chunk by chunk, each SSE event as soon as it is complete.

- a stream cut after tokens were sent → an error event and `data: [DONE]`;
- a whole answer cut mid-body → 502;
- the node stops and the drain deadline passes → an error event (`shutting_down`) and `data: [DONE]`.
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
from ..cluster.pool import BodyCut
from ..cluster.pool import Response as PoolResponse
from ..record import RequestRecord
from .errors import APIError, shutting_down, sse_error_event
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


async def relay(
    request: web.Request, response: PoolResponse, peer: Peer, record: RequestRecord, stream: bool,
    timeout: float, relays: Relays,
) -> web.StreamResponse:
    out_headers = response_headers(response.headers, record)
    if response.sized:
        try:
            data = await response.read(timeout)
        except BodyCut as exc:
            response.close()
            raise APIError(502, f"The upstream {peer.label} stopped in the middle of its answer ({exc}).",
                           type="server_error", code="upstream_cut") from None
        except BaseException:
            response.close()
            raise
        response.release()
        record.mark_token()
        note_usage(record, data)
        whole = web.Response(body=data, status=response.status, headers=out_headers)
        # Sent here rather than by aiohttp after the handler returns: the request's log event and
        # metrics (Node.observe) then come after the client has its answer, not before it.
        await whole.prepare(request)
        await whole.write_eof()
        return whole
    out = web.StreamResponse(status=response.status, headers=out_headers)
    sent = _Sent()
    try:
        await out.prepare(request)
        ended, cut = await _pass_events(response.chunks(timeout), out, record, sent)
    except (asyncio.CancelledError, ConnectionError) as exc:
        response.close()  # the client went away, or the stop's deadline: drop the upstream connection
        if sent.done:  # the client has its whole answer ([DONE]); it only hung up before the end
            _uncancel(exc)
            return out
        if not (relays.cutting and isinstance(exc, asyncio.CancelledError) and out.prepared):
            raise
        _uncancel(exc)
        error = shutting_down()
        record.status, record.error = error.status, error.message
        with suppress(ConnectionError):
            await out.write(sse_error_event(error) + DONE)
            await out.write_eof()
        return out
    except BaseException:
        response.close()
        raise
    if cut is None:
        response.release()
    else:
        response.close()
        log.warning("upstream_cut", request_id=record.request_id, upstream=peer.url, error=str(cut))
    if cut is not None and not ended:
        error = APIError(502, f"The upstream {peer.label} stopped in the middle of the stream ({cut}).",
                         type="server_error", code="upstream_cut")
        record.status, record.error = error.status, error.message
        await out.write(sse_error_event(error) + DONE)
    elif not ended and stream:
        await out.write(DONE)  # an upstream that ended without [DONE]: end the stream properly
    await out.write_eof()
    return out


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
    chunks: AsyncIterator[bytes], out: web.StreamResponse, record: RequestRecord, sent: _Sent
) -> tuple[bool, BodyCut | None]:
    """Write whole SSE events as they arrive (a partial one waits for its end, so a cut never leaves
    half an event before the error event). Returns whether the stream ended with `data: [DONE]`, and
    the cut that stopped it, if one did."""
    carry = b""
    tail = b""
    try:
        async for data in chunks:
            if carry:
                data, carry = carry + data, b""
            end = data.rfind(b"\n\n") + 2
            if end == 1:
                carry = data
                continue
            if end < len(data):
                data, carry = data[:end], data[end:]
            record.mark_token()
            if b'"prompt_tokens"' in data:  # the usage chunk (stream_options.include_usage)
                note_usage(record, data)
            await out.write(data)
            tail = data
            sent.done = data.endswith(DONE)
    except BodyCut as exc:
        return tail.endswith(DONE), exc
    if carry:
        await out.write(carry)
        tail = carry
    return tail.endswith(DONE), None


def response_headers(upstream: list[tuple[str, str]], record: RequestRecord) -> list[tuple[str, str]]:
    out = [(k, v) for k, v in upstream if k.lower() not in _DROP_RESPONSE]
    out.append((headers.ROUTE, "forwarded"))
    out.append((headers.REQUEST_ID, record.request_id))
    return out


async def read_refusal(response: PoolResponse, timeout: float) -> bytes:
    try:
        data = await response.read(timeout)
    except BodyCut:
        response.close()
        return b""
    except BaseException:
        response.close()
        raise
    response.release()
    return data


def note_usage(record: RequestRecord, data: bytes) -> None:
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
    except (ValueError, KeyError, TypeError):
        pass


_DECODER = json.JSONDecoder()
