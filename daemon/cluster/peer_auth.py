"""Node-to-node credentials: an HMAC over each peer request, keyed by the cluster secret.

Every node of a cluster reads the same `[auth] cluster_secret_file`. A node that polls `/cluster`
or forwards a request signs it; the receiving node checks the signature before it trusts anything a
peer may claim: the hop list (`X-DSNode-Via`) and the client's identity (`X-DSNode-User`, the API
key's *name*, never the key). The secret itself never travels.

    X-DSNode-Peer: v1 <unix time> <nonce> <signature> <node name>
    signature = base64url(HMAC-SHA256(secret, "\\n".join(["dsnode-peer-v1", method, path, time, nonce,
                                                            node, via, user, request id])))

A signature is good for `max_clock_skew` seconds either side of the receiver's clock, and each nonce
is accepted once per node within that window, so a captured header cannot be replayed. The body is
not signed (the request id, path and hop list are): someone who can rewrite traffic on the wire can
read it too, and that is what `[tls]` is for.

The secret file holds one secret per line (`#` comments); the first signs, every one verifies, so a
cluster can rotate its secret without a moment where nodes disagree (add the new one second
everywhere, reload; move it first, reload; remove the old one, reload).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections import OrderedDict
from typing import Callable, Mapping

from ..headers import PEER as HEADER
from ..headers import REQUEST_ID as REQUEST_ID_HEADER
from ..headers import USER as USER_HEADER
from ..headers import VIA as VIA_HEADER

VERSION = "v1"
MAX_REMEMBERED_NONCES = 500_000  # a bound on memory; peers, not strangers, fill it


class PeerRefused(Exception):
    """A peer credential that does not hold; the message is safe to send back and to log."""


def _message(method: str, path: str, stamp: str, nonce: str, node: str, via: str, user: str,
             request_id: str) -> bytes:
    return "\n".join(("dsnode-peer-v1", method, path, stamp, nonce, node, via, user, request_id)).encode()


def _mac(secret: bytes, message: bytes) -> str:
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class PeerAuth:
    """Signs this node's peer requests and checks the ones it receives."""

    def __init__(self, secrets: tuple[bytes, ...], node: str, max_skew_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        if not secrets:
            raise ValueError("no cluster secret")
        self._secrets = secrets
        self.node = node
        self.max_skew_s = max_skew_s
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it stops mattering

    # --- the sending side ---------------------------------------------------------------------------
    def sign(self, method: str, path: str, via: str = "", user: str = "", request_id: str = "") -> str:
        """The `X-DSNode-Peer` value for one request (sent with exactly these via/user/request id)."""
        stamp, nonce = str(int(self._clock())), os.urandom(9).hex()
        mac = _mac(self._secrets[0], _message(method, path, stamp, nonce, self.node, via, user, request_id))
        return f"{VERSION} {stamp} {nonce} {mac} {self.node}"

    def headers(self, method: str, path: str) -> dict[str, str]:
        """Headers for a request that carries no hop list, user or request id (the advertisement poll)."""
        return {HEADER: self.sign(method, path)}

    # --- the receiving side -------------------------------------------------------------------------
    def verify(self, method: str, path: str, headers: Mapping[str, str]) -> str:
        """The sending node's name, if `headers` carry a good credential for this request; else
        raises PeerRefused."""
        value = headers.get(HEADER)
        if not value:
            raise PeerRefused(f"no {HEADER} credential")
        parts = value.split(" ", 4)
        if len(parts) != 5 or parts[0] != VERSION:
            raise PeerRefused(f"malformed {HEADER} credential")
        _, stamp, nonce, mac, node = parts
        try:
            sent = int(stamp)
        except ValueError:
            raise PeerRefused(f"malformed {HEADER} credential") from None
        now = self._clock()
        if abs(now - sent) > self.max_skew_s:
            raise PeerRefused(f"the peer credential is {now - sent:+.0f}s old; more than "
                              f"max_clock_skew ({self.max_skew_s:g}s): a replay, or clocks out of sync")
        message = _message(method, path, stamp, nonce, node, headers.get(VIA_HEADER, ""),
                           headers.get(USER_HEADER, ""), headers.get(REQUEST_ID_HEADER, ""))
        if not any(hmac.compare_digest(mac, _mac(secret, message)) for secret in self._secrets):
            raise PeerRefused("the peer credential does not match this node's cluster secret")
        self._remember(nonce, sent + self.max_skew_s, now)
        return node

    def remember_from(self, previous: "PeerAuth") -> None:
        """Take over the nonces `previous` has seen (a reload makes a new PeerAuth)."""
        self._seen = previous._seen

    def _remember(self, nonce: str, until: float, now: float) -> None:
        seen = self._seen
        if nonce in seen:
            raise PeerRefused("the peer credential was already used (a replay)")
        seen[nonce] = until
        while seen:  # nonces are added in about the order they expire: drop from the front
            oldest, expiry = next(iter(seen.items()))
            if expiry >= now and len(seen) <= MAX_REMEMBERED_NONCES:
                break
            seen.popitem(last=False)
