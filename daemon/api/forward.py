"""Answer a completion request through an upstream node.

The balancer picks a peer; the client's body goes on as the bytes this node parsed (decoded from its
Content-Encoding, never re-serialised), with the request id and the list of nodes it passed through
(`X-DSNode-Via`, so two nodes that list each other can't pass a request back and forth); the answer
is relayed as it arrives (`dsnode.api.relay`).

Failure rules (docs/cluster.md), and what counts toward `max_fails`:
- no connection, no answer within `first_token_timeout`, a broken head → the next peer; counted;
- 500/502/504 → the next peer; counted only once another peer served the same request (a request
  that every peer refuses is the request's fault); 503 and 429 → the next peer, never counted;
- a cut, a stall or an answer over the size limits once relaying → counted (too late to retry);
- nothing left to try → `NotForwarded`: the caller serves the request itself if it fits here (the
  fallback), or answers `not_forwarded` (the last 5xx/429 as it was, or 503 saying why);
- the node stops and the drain deadline passes → 503 before the answer started (`Relays.cut`, called
  by the server), an error event once it has.

With a cluster secret (`[auth] cluster_secret_file`) each forwarded request is signed
(`dsnode.cluster.peer_auth`) for the peer it goes to: the peer credential stands for the client's API
key, which is not sent on; the key's name goes along in `X-DSNode-User`, covered by the signature.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass

import structlog
from aiohttp import web

from .. import headers
from ..cluster.balancer import Balancer, Peer
from ..cluster.peer_auth import PeerAuth, challenge_of
from ..cluster.pool import Origin, Pool, UpstreamError
from ..cluster.pool import Response as PoolResponse
from ..cluster.routing import Route
from ..config import RoutingSection
from ..node import Node
from ..record import RequestRecord
from .affinity import affinity_key
from .auth import AUTH, IDENTITY
from .errors import APIError, shutting_down
from .relay import RELAYS, UpstreamFault, read_refusal, relay, response_headers
from .render import PASS, Render
from .schemas import Body

log = structlog.get_logger("dsnode.forward")

# Request headers not passed on: hop-by-hop ones, framing, those set here, and those that describe
# the body as the client encoded it (aiohttp undid its Content-Encoding: the upstream gets plain JSON).
_DROP_REQUEST = frozenset(
    b"host content-length connection keep-alive transfer-encoding te trailer upgrade proxy-connection "
    b"proxy-authorization expect accept-encoding x-request-id x-dsnode-via x-dsnode-user "
    b"x-dsnode-peer content-encoding content-md5 content-digest digest".split()
)
_DROP_SIGNED = _DROP_REQUEST | {b"authorization"}  # signed: the peer credential replaces the client's key
_NODE = headers.NODE.lower()
_VERSION = headers.VERSION.lower()
_CHALLENGE = headers.PEER_CHALLENGE.lower()
_BROKEN = frozenset({500, 502, 504})  # an upstream's own answers that say it is broken
_REQUEST_ID, _VIA, _USER, _PEER = (f"{name}: ".encode() for name in (headers.REQUEST_ID, headers.VIA, headers.USER,
                                                                     headers.PEER))


class NotForwarded(Exception):
    """No upstream took the request: why not, peer by peer, and the last refusal (5xx/429) to pass on
    as it was, if there was one. The caller serves it here instead, or answers `not_forwarded`."""

    def __init__(self, why: str, refused: "Refusal | None") -> None:
        super().__init__(why)
        self.why = why
        self.refused = refused


@dataclass(frozen=True)
class Refusal:
    peer: Peer
    status: int
    headers: list[tuple[str, str]]
    body: bytes


async def serve_forwarded(
    request: web.Request,
    node: Node,
    raw: bytes,
    body: Body,
    record: RequestRecord,
    route: Route,
    via: tuple[str, ...],
    version: str | None = None,
    path: str | None = None,
    render: Render = PASS,
) -> web.StreamResponse:
    """The upstream's answer, from one that serves `version` of the model when it is given (a split);
    raises NotForwarded when no upstream took the request. `path`: where the upstream is asked (the
    request's own by default), `render`: how its answer reaches the client."""
    relays = request.app[RELAYS]
    task = asyncio.current_task()
    assert task is not None
    relays.tasks.add(task)
    try:
        return await _forward(request, node, raw, body, record, route, via, version, path or request.raw_path,
                              render)
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


def not_forwarded(exc: NotForwarded, body: Body, record: RequestRecord, route: Route) -> web.Response:
    """Nothing left to try: the last refusal as it was (as nginx does), or 503 saying why."""
    if exc.refused is not None:
        refused = exc.refused
        record.upstream = refused.peer.url
        record.node = next((v for k, v in refused.headers if k.lower() == _NODE), refused.peer.label)
        record.version = next((v for k, v in refused.headers if k.lower() == _VERSION), None)
        return web.Response(body=refused.body, status=refused.status,
                            headers=response_headers(refused.headers, record))
    needed = f" with {route.context} tokens of context" if route.context else ""
    raise APIError(503, f"No upstream can take this request for model `{body.model}`{needed} now: {exc.why}.",
                   type="service_unavailable", code="no_upstream", headers={"Retry-After": "5"})


async def _forward(
    request: web.Request,
    node: Node,
    raw: bytes,
    body: Body,
    record: RequestRecord,
    route: Route,
    via: tuple[str, ...],
    version: str | None,
    path: str,
    render: Render,
) -> web.StreamResponse:
    upstreams, routing = node.upstreams, node.config.routing
    balancer, pool = upstreams.balancer, upstreams.pool
    if pool is None:
        raise NotForwarded("forwarding is not running on this node", None)
    hops = (*via, node.name)  # also never picked: this node, should it be listed as its own upstream
    outgoing = _Outgoing(request, path, record.request_id, hops, raw, request.app[AUTH].peers)
    tried: list[Peer] = []
    refused: list[Refusal] = []
    key = affinity_key(body) if routing.affinity == "prefix" else None
    while (peer := balancer.pick(body.model, route.context, time.monotonic(), tried, hops, version, key)) is not None:
        tried.append(peer)
        peer.forwarded += 1
        peer.in_flight += 1
        try:
            try:
                response = await outgoing.send(pool, peer, routing)
            except UpstreamError as exc:
                balancer.failed(peer, time.monotonic(), str(exc))
                log.warning("upstream_failed", request_id=record.request_id, upstream=peer.url, error=str(exc))
                continue
            if response.status >= 500 or response.status == 429:
                refused.append(await _refusal(peer, response, routing, record))
                continue
            if response.status < 400:  # another upstream served this request: their 5xx were their own
                _count_broken(balancer, refused)
            return await _relay_counted(request, response, peer, record, body, routing, balancer, render)
        finally:
            peer.in_flight -= 1
    answered = {r.peer.url: f"answered HTTP {r.status}" for r in refused}
    why = balancer.why_none(body.model, route.context, time.monotonic(), tried, answered, version)
    raise NotForwarded(why, refused[-1] if refused else None)


async def _refusal(peer: Peer, response: PoolResponse, routing: RoutingSection, record: RequestRecord) -> Refusal:
    answer = await read_refusal(response, routing.first_token_timeout, routing.max_answer_bytes)
    log.warning("upstream_refused", request_id=record.request_id, upstream=peer.url, status=response.status)
    return Refusal(peer, response.status, response.headers, answer)


def _count_broken(balancer: Balancer, refused: list[Refusal]) -> None:
    """5xx answers that say the upstream is broken (500, 502, 504) count against it only once another
    upstream has served the same request: a request that every upstream refuses is the request's
    fault, and must not take them out (503 and 429 say "busy"; readiness is the poller's to see)."""
    now = time.monotonic()
    for refusal in refused:
        if refusal.status in _BROKEN:
            balancer.failed(refusal.peer, now, f"answered HTTP {refusal.status}")


async def _relay_counted(request: web.Request, response: PoolResponse, peer: Peer, record: RequestRecord,
                         body: Body, routing: RoutingSection, balancer: Balancer, render: Render) -> web.StreamResponse:
    """Relay the answer; a cut, a stall or an answer over the size limits counts against the peer."""
    record.upstream = peer.url
    record.node = response.header(_NODE) or peer.label
    record.version = response.header(_VERSION)
    record.admitted = time.monotonic()
    try:
        out, fault = await relay(request, response, peer, record, body.stream, routing, request.app[RELAYS], render)
    except UpstreamFault as exc:
        balancer.failed(peer, time.monotonic(), exc.message)
        log.warning("upstream_cut", request_id=record.request_id, upstream=peer.url, error=exc.message)
        raise
    if fault is None:
        balancer.succeeded(peer, time.monotonic())
    else:
        balancer.failed(peer, time.monotonic(), fault)
    return out


class _Outgoing:
    """The upstream request as bytes: the same head and body for every attempt; with a cluster
    secret, a peer credential made for the upstream it goes to (the receiving node is signed)."""

    def __init__(self, request: web.Request, path: str, request_id: str, hops: tuple[str, ...], raw: bytes,
                 peers: PeerAuth | None) -> None:
        self.path = path
        self.start = b"POST " + self.path.encode() + b" HTTP/1.1\r\nHost: "
        self.via = ",".join(hops)
        self.request_id = request_id
        self.peers = peers
        self.user = request.get(IDENTITY, "") if peers is not None else ""
        self.raw = raw
        self.headers = _request_headers(request, request_id, self.via, self.user, raw, peers is not None)

    def bytes_for(self, peer: Peer, origin: Origin) -> bytes:
        head = self.start + origin.host_header + self.headers
        if self.peers is not None:  # signed; the client's identity goes on by name, its key stays here
            signature = self.peers.sign("POST", self.path, self.via, self.user, self.request_id, to=peer.binding)
            head += _PEER + signature.encode() + b"\r\n"
        return head + b"\r\n" + self.raw

    async def send(self, pool: Pool, peer: Peer, routing: RoutingSection) -> PoolResponse:
        """The upstream's response head. A peer that refuses the credential because it was made for
        another node or an earlier boot of it says which it is (`challenge_of`): once, sign for that."""
        origin = _origin(peer.url)
        response = await pool.request(origin, self.bytes_for(peer, origin), routing.connect_timeout,
                                      routing.first_token_timeout)
        if response.status != 401 or self.peers is None:
            return response
        binding = challenge_of(response.header(_CHALLENGE))
        if binding is None or binding == peer.binding:
            return response
        await read_refusal(response, routing.first_token_timeout, routing.max_answer_bytes)
        peer.binding = binding
        return await pool.request(origin, self.bytes_for(peer, origin), routing.connect_timeout,
                                  routing.first_token_timeout)


def _request_headers(request: web.Request, request_id: str, via: str, user: str, raw: bytes,
                     signed: bool) -> bytes:
    """The header lines after Host, each ending in CRLF (the peer credential goes after them)."""
    lines = [
        b"Content-Length: %d" % len(raw),
        _REQUEST_ID + request_id.encode(),
        _VIA + via.encode(),
    ]
    if user:
        lines.append(_USER + user.encode())
    drop = _DROP_SIGNED if signed else _DROP_REQUEST
    lines += [name + b": " + value for name, value in request.raw_headers if name.lower() not in drop]
    return b"\r\n" + b"\r\n".join(lines) + b"\r\n"


@functools.lru_cache(maxsize=256)
def _origin(url: str) -> Origin:
    return Origin.from_url(url)
