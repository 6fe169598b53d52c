"""API keys, peer credentials and per-key concurrency: who may ask, and how much at once.

`[auth] api_keys_file`: one key per line; `#` starts a comment.

    # name: key                      a named key: logs say `alice`
    alice: sk-live-4b1f0c6e9a2d47d8b3e5
    # name: sha256:<hex>             the same, stored hashed (printf %s KEY | sha256sum)
    ci: sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    # a bare key, or a bare hash: logs say `sha256:9f86d081` (the first 8 hex digits of its hash)
    sk-live-0d5c2a7e91f34b66a8c1

A request then needs `Authorization: Bearer <key>` (what OpenAI clients send) on every endpoint but
the probes (`/health`, `/ready`) and the API description (`/openapi.json`); else 401 in OpenAI's
error shape with `WWW-Authenticate: Bearer`. A key is looked up by its SHA-256, so the lookup time
says nothing about any key; keys are never logged: the request record's `user` is the key's name, or
its fingerprint.

A request from another node (`X-DSNode-Peer`, see `dsnode.cluster.peer_auth`) needs no key: the peer
credential stands for it, and the identity the peer signed (`X-DSNode-User`) is the request's. With a
cluster secret configured, a request that claims to have passed through a node (`X-DSNode-Via`,
`X-DSNode-User`) without a good peer credential is refused. `/cluster` needs a peer credential or an
API key (with neither configured it stays open).

The middleware is installed only when `[auth]` names a file at start; the key and secret files are
re-read on every reload (SIGHUP), whether or not the config file changed.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, ContextManager, Iterator

import structlog
from aiohttp import web

from .. import headers as names
from ..cluster.peer_auth import Binding, PeerAuth, PeerRefused
from ..secrets import ApiKeys, SecretsFileError
from .errors import APIError, Handler

if TYPE_CHECKING:
    from ..config import Config
    from ..record import RequestRecord

log = structlog.get_logger("dsnode.auth")

OPEN_PATHS = frozenset({"/health", "/ready", "/openapi.json"})  # probes and the API's description

IDENTITY: web.RequestKey[str] = web.RequestKey("dsnode_identity", str)  # key name / fingerprint
PEER: web.RequestKey[str] = web.RequestKey("dsnode_peer", str)  # the node that sent it, if a peer did


# --- the node's auth state --------------------------------------------------------------------------
class Auth:
    """The keys and the peer credential in force, swapped whole on reload, and the per-key
    concurrency counts (kept across reloads)."""

    def __init__(self, keys: ApiKeys | None, peers: PeerAuth | None) -> None:
        self.keys = keys
        self.peers = peers
        self.busy: dict[str, int] = {}  # identity -> requests being served now
        self.installed = False  # the middleware is in the app (create_app decides, once)

    @classmethod
    def from_config(cls, config: "Config") -> "Auth":
        """Raises SecretsFileError (already reported by the config check at load)."""
        secrets = config.secrets()
        peers = None
        if secrets.cluster is not None:
            peers = PeerAuth(secrets.cluster, config.node.name, config.auth.max_clock_skew)
        keys = secrets.api_keys
        return cls(keys, peers)

    @property
    def enabled(self) -> bool:
        return self.keys is not None or self.peers is not None

    def reload(self, old: "Config", new: "Config") -> None:
        """A `NodeServer` reloader: re-read both files, even if the config text is the same (a new
        key, a rotated secret). A file that went bad since the config check keeps the old one."""
        try:
            fresh = Auth.from_config(new)
        except SecretsFileError as exc:
            log.error("auth_reload_failed", problems=exc.problems, detail="the previous keys stay")
            return
        if self.enabled and not fresh.enabled:
            log.warning("auth_disabled", detail="[auth] names no file any more: requests need no key")
        if fresh.peers is not None and self.peers is not None:
            fresh.peers.remember_from(self.peers)  # a reload is no chance to replay a credential
        self.keys, self.peers = fresh.keys, fresh.peers
        log.info("auth_reloaded", api_keys=None if fresh.keys is None else len(fresh.keys),
                 cluster_secret=fresh.peers is not None)

    def needs_restart(self, old: "Config", new: "Config") -> bool:
        """Turning `[auth]` on for a node that started without it: its middleware is not there (the
        node then keeps the old `[auth]`, as for the other restart-only settings)."""
        return not self.installed and new.auth != old.auth and \
            (new.auth.api_keys_file is not None or new.auth.cluster_secret_file is not None)

    def peer_headers(self, method: str, path: str, to: Binding | None = None) -> dict[str, str]:
        """Headers for this node's own peer requests (the advertisement poll) to the node `to`."""
        return {} if self.peers is None else self.peers.headers(method, path, to)

    @contextmanager
    def slot(self, identity: str, limit: int) -> Iterator[None]:
        """One of `identity`'s `limit` concurrent requests, or 429 when all are taken."""
        busy = self.busy.get(identity, 0)
        if busy >= limit:
            raise APIError(
                429, f"Too many concurrent requests for this API key ({busy} of {limit} in use); "
                "retry when one has finished.", type="rate_limit_error",
                code="too_many_concurrent_requests", headers={"Retry-After": "1"},
            )
        self.busy[identity] = busy + 1
        try:
            yield
        finally:
            left = self.busy[identity] - 1
            if left:
                self.busy[identity] = left
            else:
                del self.busy[identity]


AUTH: web.AppKey[Auth] = web.AppKey("auth", Auth)
_FREE: ContextManager[None] = nullcontext()


def admit(request: web.Request, limit: int | None, record: "RequestRecord") -> ContextManager[None]:
    """The request's identity into its record, and its per-key concurrency slot (`with` it)."""
    identity = request.get(IDENTITY)
    if identity is None:
        return _FREE
    record.user = identity
    if limit is None:
        return _FREE
    return request.app[AUTH].slot(identity, limit)


# --- the middleware ---------------------------------------------------------------------------------
@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if path in OPEN_PATHS:
        return await handler(request)
    auth = request.app[AUTH]
    headers = request.headers
    if auth.peers is not None and (names.PEER in headers or names.VIA in headers or names.USER in headers):
        try:
            request[PEER] = auth.peers.verify(request.method, request.raw_path, headers)
        except PeerRefused as exc:
            challenge = auth.peers.challenge if exc.challenge else None
            raise _refused(request, str(exc), "invalid_peer_credential", challenge=challenge) from None
        user = headers.get(names.USER)
        if user:
            request[IDENTITY] = user
        return await handler(request)
    if auth.keys is None:
        if path == "/cluster" and auth.peers is not None:
            raise _refused(request, "GET /cluster needs the cluster credential (a peer node's, or "
                           "`dsnode status --secret-file`).", "missing_peer_credential",
                           challenge=auth.peers.challenge)
        return await handler(request)
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _refused(request, "You didn't provide an API key. Send it as `Authorization: Bearer KEY`.",
                       "missing_api_key")
    identity = auth.keys.identify(token.strip())
    if identity is None:
        raise _refused(request, "Incorrect API key provided.", "invalid_api_key", invalid=True)
    request[IDENTITY] = identity
    return await handler(request)


def _refused(request: web.Request, message: str, code: str, invalid: bool = False,
             challenge: str | None = None) -> APIError:
    """401. `challenge`: this node's peer binding, for a peer whose credential was made for another
    node or boot (`X-DSNode-Peer-Challenge`)."""
    log.warning("unauthorized", path=request.path, method=request.method, client=request.remote,
                code=code, reason=message, request_id=_request_id(request))
    bearer = 'Bearer realm="dsnode", error="invalid_token"' if invalid else 'Bearer realm="dsnode"'
    extra = {names.PEER_CHALLENGE: challenge} if challenge else {}
    return APIError(401, message, code=code, headers={"WWW-Authenticate": bearer, **extra})


def _request_id(request: web.Request) -> str | None:
    given = request.headers.get(names.REQUEST_ID, "")
    return given if given and len(given) <= 128 and given.isprintable() else None
