"""Answer a completion request through an upstream node.

The balancer picks a peer; the client's body goes on as the bytes it came in (never re-serialised),
with the request id and the list of nodes it passed through (`X-DSNode-Via`, so two nodes that list
each other can't pass a request back and forth); the answer is relayed as it arrives
(`dsnode.api.relay`).

Failure rules (docs/cluster.md):
- no connection, no answer within `first_token_timeout`, 5xx, or 429 before anything was sent to the
  client → the next peer (429 is not counted against the peer's health);
- nothing left to try → the last peer's 5xx/429 answer as it was, or 503 explaining why each peer
  could not take it;
- the node stops and the drain deadline passes → 503 before the answer started (`Relays.cut`, called
  by the server), an error event once it has.

With a cluster secret (`[auth] cluster_secret_file`) each forwarded request is signed
(`dsnode.cluster.peer_auth`): the peer credential stands for the client's API key, which is not sent
on; the key's name goes along in `X-DSNode-User`, covered by the signature.
"""

from __future__ import annotations

import asyncio
import functools
import time

import structlog
from aiohttp import web

from .. import headers
from ..cluster.balancer import Peer
from ..cluster.peer_auth import PeerAuth
from ..cluster.pool import Origin, UpstreamError
from ..cluster.routing import Route
from ..node import Node
from ..record import RequestRecord
from .auth import AUTH, IDENTITY
from .errors import APIError, shutting_down
from .relay import RELAYS, read_refusal, relay, response_headers
from .schemas import Body

log = structlog.get_logger("dsnode.forward")

# Request headers not passed on: hop-by-hop ones, framing, and those set here.
_DROP_REQUEST = frozenset(
    b"host content-length connection keep-alive transfer-encoding te trailer upgrade proxy-connection "
    b"proxy-authorization expect accept-encoding x-request-id x-dsnode-via x-dsnode-user "
    b"x-dsnode-peer".split()
)
_DROP_SIGNED = _DROP_REQUEST | {b"authorization"}  # signed: the peer credential replaces the client's key
_NODE = headers.NODE.lower()
_REQUEST_ID, _VIA, _USER, _PEER = (f"{name}: ".encode() for name in (headers.REQUEST_ID, headers.VIA, headers.USER,
                                                                     headers.PEER))


async def serve_forwarded(
    request: web.Request,
    node: Node,
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
    """The drain deadline passed: end every forwarded request cleanly. Returns how many."""
    return app[RELAYS].cut()


async def _forward(
    request: web.Request,
    node: Node,
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
                answer = await read_refusal(response, routing.first_token_timeout)
                if response.status >= 500:
                    balancer.failed(peer, time.monotonic(), f"answered HTTP {response.status}")
                log.warning("upstream_refused", request_id=record.request_id, upstream=peer.url,
                            status=response.status)
                refused = (peer, response.status, response.headers, answer)
                continue
            balancer.succeeded(peer, time.monotonic())
            record.upstream = peer.url
            record.node = response.header(_NODE) or peer.label
            record.admitted = time.monotonic()
            return await relay(request, response, peer, record, body.stream, routing.first_token_timeout,
                               request.app[RELAYS])
        finally:
            peer.in_flight -= 1
    return _after_every_peer(body, record, route, refused, balancer.why_none(body.model, route.context,
                                                                         time.monotonic(), tried))


def _after_every_peer(body: Body, record: RequestRecord, route: Route,
                      refused: tuple[Peer, int, list[tuple[str, str]], bytes] | None, why: str) -> web.Response:
    """Nothing left to try: the last refusal as it was (as nginx does), or 503 saying why."""
    if refused is not None:
        peer, status, upstream_headers, answer = refused
        record.upstream = peer.url
        record.node = next((v for k, v in upstream_headers if k.lower() == _NODE), peer.label)
        return web.Response(body=answer, status=status, headers=response_headers(upstream_headers, record))
    needed = f" with {route.context} tokens of context" if route.context else ""
    raise APIError(503, f"No upstream can take this request for model `{body.model}`{needed} now: {why}.",
                   type="service_unavailable", code="no_upstream", headers={"Retry-After": "5"})


def _request_tail(request: web.Request, request_id: str, via: tuple[str, ...], raw: bytes,
                  peers: PeerAuth | None) -> bytes:
    """Everything of the upstream request after the Host value: headers, blank line, body."""
    hops = ",".join(via)
    lines = [
        b"Content-Length: %d" % len(raw),
        _REQUEST_ID + request_id.encode(),
        _VIA + hops.encode(),
    ]
    drop = _DROP_REQUEST
    if peers is not None:  # signed; the client's identity goes on by name, its key stays here
        user = request.get(IDENTITY, "")
        if user:
            lines.append(_USER + user.encode())
        signature = peers.sign("POST", request.raw_path, hops, user, request_id)
        lines.append(_PEER + signature.encode())
        drop = _DROP_SIGNED
    lines += [name + b": " + value for name, value in request.raw_headers if name.lower() not in drop]
    return b"\r\n" + b"\r\n".join(lines) + b"\r\n\r\n" + raw


@functools.lru_cache(maxsize=256)
def _origin(url: str) -> Origin:
    return Origin.from_url(url)


