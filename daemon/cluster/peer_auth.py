"""Node-to-node credentials: an HMAC over each peer request, keyed by the cluster secret, made for
one receiving node in one of its boots.

Every node of a cluster reads the same `[auth] cluster_secret_file`. A node that polls `/cluster`
or forwards a request signs it; the receiving node checks the signature before it trusts anything a
peer may claim: the hop list (`X-DSNode-Via`) and the client's identity (`X-DSNode-User`, the API
key's *name*, never the key). The secret itself never travels.

    X-DSNode-Peer: v2 <unix time> <nonce> <signature> <to boot> <to node, %-quoted> <from node>
    signature = base64url(HMAC-SHA256(secret, "\\n".join(["dsnode-peer-v2", method, path, time, nonce,
                          from node, to node, to boot, via, user, request id])))

A credential is accepted
- only by the node it was made for, in the boot it was made for: each node draws a random boot id
  when it starts, and a credential names both (so it is refused by every other node, and by the
  same node once restarted);
- within `max_clock_skew` seconds either side of the receiver's clock;
- once: the receiver remembers each nonce it accepted for as long as the credential is good. That
  memory lives as long as the boot id does, which is why a restart needs a new boot id.

A sender learns a node's boot id and name from the node itself: a credential for another boot (or
none known yet) is answered 401 with `X-DSNode-Peer-Challenge: <boot id> <node name>`, and the
sender signs once more for that. The challenge is public; it says nothing that helps forge a MAC.

The body is not signed (the request id, path and hop list are): someone who can rewrite traffic on
the wire can read it too, and that is what `[tls]` is for.

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
from urllib.parse import quote, unquote

from ..headers import PEER as HEADER
from ..headers import REQUEST_ID as REQUEST_ID_HEADER
from ..headers import USER as USER_HEADER
from ..headers import VIA as VIA_HEADER

VERSION = "v2"
MAX_REMEMBERED_NONCES = 500_000  # a bound on memory; peers, not strangers, fill it
UNKNOWN = "-"  # the receiving node's boot id or name, before the sender has learnt it

Binding = tuple[str, str]  # (boot id, node name) of a receiving node


class PeerRefused(Exception):
    """A peer credential that does not hold; the message is safe to send back and to log.
    `challenge`: it was made for another node or boot (or none): the sender may sign for this one."""

    def __init__(self, message: str, challenge: bool = False) -> None:
        super().__init__(message)
        self.challenge = challenge


def _message(method: str, path: str, stamp: str, nonce: str, sender: str, to: Binding, via: str, user: str,
             request_id: str) -> bytes:
    boot, node = to
    return "\n".join(("dsnode-peer-v2", method, path, stamp, nonce, sender, node, boot, via, user,
                      request_id)).encode()


def _mac(secret: bytes, message: bytes) -> str:
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def challenge_of(value: str | None) -> Binding | None:
    """The (boot id, node name) of an `X-DSNode-Peer-Challenge` header, if it is one."""
    if not value:
        return None
    boot, _, node = value.strip().partition(" ")
    return (boot, node) if boot and node else None


class PeerAuth:
    """Signs this node's peer requests and checks the ones it receives."""

    def __init__(self, secrets: tuple[bytes, ...], node: str, max_skew_s: float,
                 clock: Callable[[], float] = time.time, boot: str | None = None) -> None:
        if not secrets:
            raise ValueError("no cluster secret")
        self._secrets = secrets
        self.node = node
        self.boot = boot or os.urandom(9).hex()  # this process's: a restart draws another
        self.max_skew_s = max_skew_s
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it stops mattering

    @property
    def binding(self) -> Binding:
        """What a credential for this node must name."""
        return (self.boot, self.node)

    @property
    def challenge(self) -> str:
        """The `X-DSNode-Peer-Challenge` value: how a sender learns this node's binding."""
        return f"{self.boot} {self.node}"

    # --- the sending side ---------------------------------------------------------------------------
    def sign(self, method: str, path: str, via: str = "", user: str = "", request_id: str = "",
             to: Binding | None = None) -> str:
        """The `X-DSNode-Peer` value for one request to the node `to` (its boot id and name; None
        while unknown: the receiver then answers with its challenge)."""
        to = to or (UNKNOWN, UNKNOWN)
        stamp, nonce = str(int(self._clock())), os.urandom(9).hex()
        mac = _mac(self._secrets[0], _message(method, path, stamp, nonce, self.node, to, via, user, request_id))
        return f"{VERSION} {stamp} {nonce} {mac} {to[0]} {quote(to[1], safe='')} {self.node}"

    def headers(self, method: str, path: str, to: Binding | None = None) -> dict[str, str]:
        """Headers for a request that carries no hop list, user or request id (the advertisement poll)."""
        return {HEADER: self.sign(method, path, to=to)}

    # --- the receiving side -------------------------------------------------------------------------
    def verify(self, method: str, path: str, headers: Mapping[str, str]) -> str:
        """The sending node's name, if `headers` carry a good credential for this request, made for
        this node in this boot; else raises PeerRefused."""
        value = headers.get(HEADER)
        if not value:
            raise PeerRefused(f"no {HEADER} credential", challenge=True)
        parts = value.split(" ", 6)
        if parts[0] != VERSION:
            raise PeerRefused(f"a {HEADER} credential of another version ({parts[0][:8]!r}, this node takes "
                              f"{VERSION}): every node of a cluster needs the same dsnode version")
        if len(parts) != 7:
            raise PeerRefused(f"malformed {HEADER} credential")
        _, stamp, nonce, mac, boot, node, sender = parts
        sent = self._check_time(stamp)
        to = (boot, unquote(node))
        if to != self.binding:
            raise PeerRefused(f"the peer credential was made for {_shown(to)}, not for this node "
                              f"({self.node}, boot {self.boot}): a replay, or this node restarted", challenge=True)
        message = _message(method, path, stamp, nonce, sender, to, headers.get(VIA_HEADER, ""),
                           headers.get(USER_HEADER, ""), headers.get(REQUEST_ID_HEADER, ""))
        if not any(hmac.compare_digest(mac, _mac(secret, message)) for secret in self._secrets):
            raise PeerRefused("the peer credential does not match this node's cluster secret")
        self._remember(nonce, sent + self.max_skew_s, self._clock())
        return sender

    def remember_from(self, previous: "PeerAuth") -> None:
        """Take over the boot id and the nonces `previous` has seen (a reload makes a new PeerAuth;
        the process, and so the boot, is the same)."""
        self._seen = previous._seen
        self.boot = previous.boot

    def _check_time(self, stamp: str) -> float:
        try:
            sent = int(stamp)
        except ValueError:
            raise PeerRefused(f"malformed {HEADER} credential") from None
        now = self._clock()
        if abs(now - sent) > self.max_skew_s:
            raise PeerRefused(f"the peer credential is {now - sent:+.0f}s old; more than "
                              f"max_clock_skew ({self.max_skew_s:g}s): a replay, or clocks out of sync")
        return sent

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


def _shown(to: Binding) -> str:
    boot, node = to
    if to == (UNKNOWN, UNKNOWN):
        return "no node yet"
    return f"node {node[:64]!r} (boot {boot[:32]})"
