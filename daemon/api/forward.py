"""Answer a completion request through an upstream node.

The balancer picks a peer; the client's body goes on as the bytes it came in (never re-serialised),
with the request id and the list of nodes it passed through (`X-DSNode-Via`, so two nodes that list
each other can't pass a request back and forth); the answer comes back as it arrives: a whole answer
(Content-Length) as one body, a stream chunk by chunk, each SSE event as soon as it is complete.

Failure rules (docs/cluster.md):
- no connection, no answer within `first_token_timeout`, 5xx, or 429 before anything was sent to the
  client → the next peer (429 is not counted against the peer's health);
- nothing left to try → the last peer's 5xx/429 answer as it was, or 503 explaining why each peer
  could not take it;
- a stream cut after tokens were sent → an error event and `data: [DONE]`;
- a whole answer cut mid-body → 502;
- the node stops and the drain deadline passes → an error event (`shutting_down`) and `data: [DONE]`,
  or 503 before the answer started (`cut_forwarded`, called by the server).

With a cluster secret (`[auth] cluster_secret_file`) each forwarded request is signed
(`dsnode.cluster.peer_auth`): the peer credential stands for the client's API key, which is not sent
on; the key's name goes along in `X-DSNode-User`, covered by the signature.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
import time
from contextlib import suppress
from typing import TYPE_CHECKING, AsyncIterator

import aiohttp
import structlog
from aiohttp import web

from .. import headers
from ..cluster.balancer import Peer
from ..cluster.peer_auth import PeerAuth
from ..cluster.peers import Poller
from ..cluster.pool import BodyCut, Origin, Pool, UpstreamError
from ..cluster.pool import Response as PoolResponse
from ..cluster.routing import LocalModel, Route, RouteRequest, decide
from ..record import RequestRecord
from .auth import AUTH, IDENTITY
from .errors import APIError, shutting_down, sse_error_event
from .keys import NODE
from .responses import DONE
from .schemas import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from ..node import Node

log = structlog.get_logger("dsnode.forward")

Body = ChatCompletionRequest | CompletionRequest

VIA = "X-DSNode-Via"  # the nodes a forwarded request passed through, comma-separated
MAX_HOPS = 3  # a request that passed through this many nodes is not forwarded again
ADVERT_SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("advert_session")
POLLER: web.AppKey["asyncio.Task[None]"] = web.AppKey("poller")


class Relays:
    """The requests being forwarded now, so a stop can end them with an error (not drop them)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[object]] = set()
        self.cutting = False  # the drain deadline passed: a cancellation now is the stop's


RELAYS: web.AppKey[Relays] = web.AppKey("relays", Relays)

# Request headers not passed on: hop-by-hop ones, framing, and those set here.
_DROP_REQUEST = frozenset(
    b"host content-length connection keep-alive transfer-encoding te trailer upgrade proxy-connection "
    b"proxy-authorization expect accept-encoding x-request-id x-dsnode-via x-dsnode-user "
    b"x-dsnode-peer".split()
)
_DROP_SIGNED = _DROP_REQUEST | {b"authorization"}  # signed: the peer credential replaces the client's key
# Response headers not passed back (aiohttp sets framing and date itself; the route is ours to say).
_DROP_RESPONSE = frozenset(
    "connection keep-alive transfer-encoding content-length date server x-dsnode-route x-request-id".split()
)


# --- routing ----------------------------------------------------------------------------------------
def via_of(request: web.Request) -> tuple[str, ...]:
    value = request.headers.get(VIA)
    return tuple(n for n in (p.strip() for p in value.split(",")) if n) if value else ()


def choose_route(node: "Node", body: Body, prompt_tokens: int | None, via: tuple[str, ...]) -> Route:
    health = node.engine.health()
    local = LocalModel(node.config.model.name, node.engine.info.max_context if health.ready else None, health.ready)
    return decide(
        RouteRequest(body.model, prompt_tokens, body.requested_max_tokens()),
        local,
        node.config.routing.long_prompt_tokens,
        node.upstreams.known_models(),
        may_forward=node.name not in via and len(via) < MAX_HOPS,
    )


# --- forwarding -------------------------------------------------------------------------------------
async def serve_forwarded(
    request: web.Request,
    node: "Node",
    raw: bytes,
    body: Body,
    record: RequestRecord,
    route: Route,
    via: tuple[str, ...],
) -> web.StreamResponse:
    relays = request.app[RELAYS]
    task = asyncio.current_task()
    assert task is not None
    relays.tasks.add(task)
    try:
        return await _forward(request, node, raw, body, record, route, via)
    except asyncio.CancelledError:
        if not relays.cutting:
            raise  # the client went away
        task.uncancel()  # the stop's deadline, before the answer started: say so
        raise shutting_down() from None
    finally:
        relays.tasks.discard(task)


def cut_forwarded(app: web.Application) -> int:
    """The drain deadline passed: end every forwarded request cleanly (an error event and
    `data: [DONE]` for a stream under way, 503 for one not answered yet). Returns how many."""
    relays = app.get(RELAYS)
    if relays is None:  # the app never started
        return 0
    relays.cutting = True
    for task in relays.tasks:
        task.cancel()
    return len(relays.tasks)


async def _forward(
    request: web.Request,
    node: "Node",
    raw: bytes,
    body: Body,
    record: RequestRecord,
    route: Route,
    via: tuple[str, ...],
) -> web.StreamResponse:
    upstreams, routing = node.upstreams, node.config.routing
    balancer, pool = upstreams.balancer, upstreams.pool
    if pool is None:
        raise APIError(503, "Forwarding is not running on this node.", type="service_unavailable",
                       code="no_upstream", headers={"Retry-After": "5"})
    hops = (*via, node.name)  # also never picked: this node, should it be listed as its own upstream
    tail = _request_tail(request, record.request_id, hops, raw, request.app[AUTH].peers)
    start = b"POST " + request.raw_path.encode() + b" HTTP/1.1\r\nHost: "
    tried: list[Peer] = []
    refused: tuple[Peer, int, list[tuple[str, str]], bytes] | None = None
    while (peer := balancer.pick(body.model, route.context, time.monotonic(), tried, hops)) is not None:
        tried.append(peer)
        peer.forwarded += 1
        peer.in_flight += 1
        try:
            origin = _origin(peer.url)
            try:
                response = await pool.request(origin, start + origin.host_header + tail,
                                              routing.connect_timeout, routing.first_token_timeout)
            except UpstreamError as exc:
                balancer.failed(peer, time.monotonic(), str(exc))
                log.warning("upstream_failed", request_id=record.request_id, upstream=peer.url, error=str(exc))
                continue
            if response.status >= 500 or response.status == 429:
                answer = await _read_refusal(response, routing.first_token_timeout)
                if response.status >= 500:
                    balancer.failed(peer, time.monotonic(), f"answered HTTP {response.status}")
                log.warning("upstream_refused", request_id=record.request_id, upstream=peer.url,
                            status=response.status)
                refused = (peer, response.status, response.headers, answer)
                continue
            balancer.succeeded(peer, time.monotonic())
            record.upstream = peer.url
            record.node = response.header("x-dsnode-node") or peer.label
            record.admitted = time.monotonic()
            return await _relay(request, response, peer, record, body.stream, routing.first_token_timeout,
                                request.app[RELAYS])
        finally:
            peer.in_flight -= 1
    if refused is not None:  # every peer refused: pass on the last refusal, as nginx does
        peer, status, upstream_headers, answer = refused
        record.upstream = peer.url
        record.node = next((v for k, v in upstream_headers if k.lower() == "x-dsnode-node"), peer.label)
        return web.Response(body=answer, status=status, headers=_response_headers(upstream_headers, record))
    needed = f" with {route.context} tokens of context" if route.context else ""
    raise APIError(
        503,
        f"No upstream can take this request for model `{body.model}`{needed} now: "
        f"{balancer.why_none(body.model, route.context, time.monotonic(), tried)}.",
        type="service_unavailable",
        code="no_upstream",
        headers={"Retry-After": "5"},
    )


async def _relay(
    request: web.Request, response: PoolResponse, peer: Peer, record: RequestRecord, stream: bool,
    timeout: float, relays: Relays,
) -> web.StreamResponse:
    out_headers = _response_headers(response.headers, record)
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
        _note_usage(record, data)
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
                _note_usage(record, data)
            await out.write(data)
            tail = data
            sent.done = data.endswith(DONE)
    except BodyCut as exc:
        return tail.endswith(DONE), exc
    if carry:
        await out.write(carry)
        tail = carry
    return tail.endswith(DONE), None


def _request_tail(request: web.Request, request_id: str, via: tuple[str, ...], raw: bytes,
                  peers: PeerAuth | None) -> bytes:
    """Everything of the upstream request after the Host value: headers, blank line, body."""
    hops = ",".join(via)
    lines = [
        b"Content-Length: %d" % len(raw),
        b"X-Request-Id: " + request_id.encode(),
        b"X-DSNode-Via: " + hops.encode(),
    ]
    drop = _DROP_REQUEST
    if peers is not None:  # signed; the client's identity goes on by name, its key stays here
        user = request.get(IDENTITY, "")
        if user:
            lines.append(b"X-DSNode-User: " + user.encode())
        signature = peers.sign("POST", request.raw_path, hops, user, request_id)
        lines.append(b"X-DSNode-Peer: " + signature.encode())
        drop = _DROP_SIGNED
    lines += [name + b": " + value for name, value in request.raw_headers if name.lower() not in drop]
    return b"\r\n" + b"\r\n".join(lines) + b"\r\n\r\n" + raw


def _response_headers(upstream: list[tuple[str, str]], record: RequestRecord) -> list[tuple[str, str]]:
    out = [(k, v) for k, v in upstream if k.lower() not in _DROP_RESPONSE]
    out.append((headers.ROUTE, "forwarded"))
    out.append((headers.REQUEST_ID, record.request_id))
    return out


async def _read_refusal(response: PoolResponse, timeout: float) -> bytes:
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


def _note_usage(record: RequestRecord, data: bytes) -> None:
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


@functools.lru_cache(maxsize=256)
def _origin(url: str) -> Origin:
    return Origin.from_url(url)


# --- lifecycle: the app's cleanup context -----------------------------------------------------------
async def upstreams_context(app: web.Application) -> AsyncIterator[None]:
    """The node's one client session (advertisement polls), its forwarding pool and the poller: made
    when the app starts, closed when it stops."""
    node = app[NODE]
    trust = _trust(node)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=trust or True))
    node.upstreams.pool = Pool(trust)
    app[ADVERT_SESSION] = session
    app[RELAYS] = Relays()
    poller = Poller(node.upstreams, session, lambda: node.config.routing, sign=app[AUTH].peer_headers)
    app[POLLER] = asyncio.get_running_loop().create_task(poller.run(), name="dsnode-poller")
    try:
        yield
    finally:
        app[POLLER].cancel()
        with suppress(asyncio.CancelledError):
            await app[POLLER]
        pool, node.upstreams.pool = node.upstreams.pool, None
        if pool is not None:
            await pool.close()
        await session.close()


def _trust(node: "Node") -> ssl.SSLContext | None:
    """Trust for https:// upstreams: `[tls] ca_file`, else (None) the system store."""
    ca_file = node.config.tls.ca_file
    return None if ca_file is None else ssl.create_default_context(cafile=str(ca_file))
