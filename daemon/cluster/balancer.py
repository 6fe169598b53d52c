"""The weighted balancer: nginx's smooth weighted round-robin over the upstreams that can take a request.

Pure logic: no I/O, no awaits, time passed in (monotonic seconds). The forwarder asks `pick` for a
peer and reports how it went (`failed` / `succeeded`); the advertisement poller reports what each peer
says about itself (`advertised` / `unreachable`).

A peer can take a request when
- passive health allows it: fewer than `max_fails` failures within `fail_timeout`, or the
  `fail_timeout` since the last failure has passed (nginx's `max_fails` / `fail_timeout`, same
  meaning, same bookkeeping as `ngx_http_upstream_round_robin.c`, including the effective weight that
  drops by `weight / max_fails` per failure and climbs back by 1 per pick);
- its last poll answered and its advertisement says ready;
- it serves the model, with a context limit that holds the request (when the request's size is known);
- this request has not tried it yet, and did not come through it (a forwarded hop);
- when the request's version is chosen (a split, `dsnode.cluster.splits`): it serves that version.

With an affinity key (`[routing] affinity = "prefix"`: requests whose prompts begin alike, such as the
turns of one conversation, carry the same key), the peer is chosen among those that can take the
request by weighted rendezvous hashing instead (nginx's `hash $key consistent`, by another method): each
peer scores `weight / -ln(h)`, `h` a hash of the key and its URL in (0, 1), and the highest wins. Keys
spread over the peers in proportion to their weights; a key stays on its peer while that peer can take
it, so the peer's prompt cache holds the conversation; a peer that goes away moves only its own keys,
and a request that fails over goes to the key's next-best peer.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Collection, Iterator, Mapping, Sequence

from ..config import RoutingSection, UpstreamSection
from ..versions import ServedVersion
from .state import UpstreamState

MAX_FIELD_CHARS = 256  # a name, a role or a reason from an advertisement is cut to this


@dataclass(eq=False)  # identity: `peer in tried` must not compare fields
class Peer:
    """One upstream: its configuration, nginx's round-robin fields, and what it advertises."""

    url: str
    weight: int
    max_fails: int
    fail_timeout: float
    current_weight: int = 0
    effective_weight: int = -1  # starts at `weight`
    fails: int = 0
    accessed: float = -math.inf  # when it last failed
    checked: float = -math.inf  # start of the current fail_timeout window
    # from its advertisement (the poller)
    reachable: bool | None = None  # did the last poll answer? None before the first
    ready: bool | None = None  # advertised readiness at the last answered poll
    name: str | None = None
    role: str | None = None
    models: dict[str, int | None] = field(default_factory=dict)  # model name → its context limit
    versions: dict[str, ServedVersion] = field(default_factory=dict)  # model name → the version it serves
    tokenizers: dict[str, str] = field(default_factory=dict)  # model name → its tokenizer's digest, if said
    advert: dict[str, Any] | None = None
    last_seen: float | None = None  # wall-clock time of the last answered poll
    last_error: str | None = None  # why it is not healthy (a failure, a poll, its readiness)
    last_failure: str | None = None  # the last failure counted toward max_fails
    binding: tuple[str, str] | None = None  # (boot id, name) its peer credentials are made for
    # counters
    forwarded: int = 0
    in_flight: int = 0

    def __post_init__(self) -> None:
        if self.effective_weight < 0:
            self.effective_weight = self.weight

    @property
    def label(self) -> str:
        return self.name or self.url

    def down(self, now: float) -> bool:
        """Passive health: taken out after max_fails failures, for fail_timeout seconds."""
        return bool(self.max_fails) and self.fails >= self.max_fails and now - self.checked <= self.fail_timeout

    def healthy(self, now: float) -> bool:
        return not self.down(now) and bool(self.reachable) and bool(self.ready)

    def fits(self, model: str, context: int | None) -> bool:
        if model not in self.models:
            return False
        limit = self.models[model]
        return context is None or limit is None or context <= limit

    def serves(self, model: str, version: str | None) -> bool:
        """It serves `model` in `version` (a split's key: an id or a label); any version for None."""
        if version is None:
            return model in self.models
        served = self.versions.get(model)
        return served is not None and served.matches(version)


class Balancer:
    def __init__(self, routing: RoutingSection) -> None:
        self.peers: list[Peer] = [_new_peer(u, routing) for u in routing.upstream]
        self._known: frozenset[str] | None = None  # known_models(), kept until an advert changes it
        self._version_ids: frozenset[str] | None = None  # known_version_ids(), the same way

    # --- configuration ----------------------------------------------------------------------------
    def configure(self, routing: RoutingSection) -> None:
        """New upstream list (a reload). Peers that stay keep their passive-health state and what they
        advertised; the rotation restarts, as nginx's does on reload. Requests in flight hold their
        `Peer` and finish on it whether or not it stays."""
        old = {p.url: p for p in self.peers}
        peers = []
        for section in routing.upstream:
            new = _new_peer(section, routing)
            kept = old.get(section.url)
            if kept is not None:
                penalty = kept.weight - kept.effective_weight  # still recovering from failures
                kept.weight, kept.max_fails, kept.fail_timeout = new.weight, new.max_fails, new.fail_timeout
                kept.effective_weight = max(0, new.weight - penalty)
                new = kept
            new.current_weight = 0
            peers.append(new)
        self.peers = peers
        self._known = self._version_ids = None

    # --- selection (nginx: ngx_http_upstream_get_peer) --------------------------------------------
    def pick(
        self,
        model: str,
        context: int | None,
        now: float,
        tried: Sequence[Peer] = (),
        exclude_names: Collection[str] = (),
        version: str | None = None,
        affinity: str | None = None,
    ) -> Peer | None:
        eligible = [peer for peer in self.peers
                    if self._eligible(peer, model, context, now, tried, exclude_names) and peer.serves(model, version)]
        if affinity is not None:
            best = max(eligible, key=lambda peer: rendezvous_score(affinity, peer), default=None)
        else:
            best = self._round_robin(eligible)
        if best is not None and now - best.checked > best.fail_timeout:
            best.checked = now  # a new window: a success in it clears the failures (nginx)
        return best

    @staticmethod
    def _round_robin(eligible: list[Peer]) -> Peer | None:
        best: Peer | None = None
        total = 0
        for peer in eligible:
            peer.current_weight += peer.effective_weight
            total += peer.effective_weight
            if peer.effective_weight < peer.weight:
                peer.effective_weight += 1
            if best is None or peer.current_weight > best.current_weight:
                best = peer
        if best is not None:
            best.current_weight -= total
        return best

    @staticmethod
    def _eligible(
        peer: Peer, model: str, context: int | None, now: float, tried: Sequence[Peer], exclude: Collection[str]
    ) -> bool:
        if peer in tried or not peer.healthy(now) or not peer.fits(model, context):
            return False
        return not (exclude and peer.name in exclude)

    # --- outcomes (nginx: ngx_http_upstream_free_round_robin_peer) --------------------------------
    def failed(self, peer: Peer, now: float, error: str) -> None:
        """A failure that counts toward max_fails (the forwarder decides which do: docs/cluster.md)."""
        peer.fails += 1
        peer.accessed = peer.checked = now
        peer.last_error = peer.last_failure = error
        if peer.max_fails:
            peer.effective_weight = max(0, peer.effective_weight - peer.weight // peer.max_fails)

    def succeeded(self, peer: Peer, now: float) -> None:
        if peer.accessed < peer.checked:
            peer.fails = 0

    # --- advertisements ---------------------------------------------------------------------------
    def advertised(self, url: str, advert: Mapping[str, Any], wall_time: float, now: float | None = None) -> None:
        """A peer's advertisement, field by field: a field of the wrong type counts as absent (a
        `ready` that is not `true` is not ready; a model entry without a string name is skipped).
        `now` (monotonic): while passive health keeps the peer out, its failure stays `last_error`."""
        peer = self.find(url)
        if peer is None:
            return  # removed by a reload while its poll was in flight
        peer.reachable, peer.ready = True, advert.get("ready") is True
        peer.name, peer.role = _str_or_none(advert.get("name")), _str_or_none(advert.get("role"))
        models = _models(advert.get("models"))
        if models.keys() != peer.models.keys():
            self._known = None
        peer.models = models
        versions = _versions(advert.get("models"))
        if versions != peer.versions:
            self._version_ids = None
        peer.versions = versions
        peer.tokenizers = _tokenizers(advert.get("models"))
        peer.advert = dict(advert)
        peer.last_seen = wall_time
        down = now is not None and peer.down(now)
        peer.last_error = (peer.last_failure if down else None) if peer.ready else _not_ready(advert)

    def unreachable(self, url: str, error: str) -> None:
        peer = self.find(url)
        if peer is not None:
            peer.reachable = False
            peer.last_error = error

    # --- views ------------------------------------------------------------------------------------
    def find(self, url: str) -> Peer | None:
        for peer in self.peers:
            if peer.url == url:
                return peer
        return None

    def known_models(self) -> frozenset[str]:
        """Every model some upstream has advertised (healthy now or not): a name here is never a 404."""
        if self._known is None:
            self._known = frozenset(name for peer in self.peers for name in peer.models)
        return self._known

    def known_version_ids(self) -> frozenset[str]:
        """The id of every version some upstream has advertised (the `version` metric label's values)."""
        if self._version_ids is None:
            self._version_ids = frozenset(v.id for peer in self.peers for v in peer.versions.values())
        return self._version_ids

    def served_versions(self) -> dict[str, list[ServedVersion]]:
        """Every advertised model → the versions upstreams (healthy now or not) serve of it."""
        served: dict[str, list[ServedVersion]] = {}
        for peer in self.peers:
            for name in peer.models:
                versions = served.setdefault(name, [])
                version = peer.versions.get(name)
                if version is not None and version not in versions:
                    versions.append(version)
        return served

    def tokenizers_of(self, model: str) -> set[str | None]:
        """The tokenizer digests the upstreams advertising `model` say they use (None: one that does not
        say: an older node, or a model still loading)."""
        return {peer.tokenizers.get(model) for peer in self.peers if model in peer.models}

    def model_limits(self, model: str | None = None, version: str | None = None) -> dict[str, int | None]:
        """Every advertised model → the largest context limit any upstream (healthy now or not)
        advertises for it; None when one of them does not say (its model is loading). With a
        version: only the upstreams that serve `model` in that version count for it."""
        limits: dict[str, int | None] = {}
        for peer in self.peers:
            for name, limit in peer.models.items():
                if version is not None and name == model and not peer.serves(model, version):
                    continue
                best = limits.get(name, 0)
                limits[name] = None if limit is None or best is None else max(best, limit)
        return limits

    def why_none(self, model: str, context: int | None, now: float, tried: Sequence[Peer] = (),
                 answered: Mapping[str, str] | None = None, version: str | None = None) -> str:
        """Why `pick` found nothing, peer by peer, for the 503 message and the log. `answered`: what
        tried peers (by URL) answered this request, when they did."""
        serving = [p for p in self.peers if p.serves(model, version)]
        if not serving:
            return f"no upstream serves the model `{model}`" + (f" in version {version}" if version else "")
        reasons = [f"{p.label}: {self._reason(p, model, context, now, tried, answered or {})}" for p in serving]
        return "; ".join(reasons)

    @staticmethod
    def _reason(peer: Peer, model: str, context: int | None, now: float, tried: Sequence[Peer],
                answered: Mapping[str, str]) -> str:
        if peer in tried:
            if peer.url in answered:
                return answered[peer.url]
            return f"failed for this request ({peer.last_error})" if peer.last_error else "tried"
        if peer.down(now):
            left = peer.fail_timeout - (now - peer.checked)
            last = f"; last error: {peer.last_failure}" if peer.last_failure else ""
            return (f"down after {peer.fails} failure(s) (max_fails={peer.max_fails}), retried in "
                    f"{max(0.0, left):.0f}s{last}")
        if not peer.reachable:
            return f"unreachable ({peer.last_error})"
        if not peer.ready:
            return peer.last_error or "not ready"
        if not peer.fits(model, context):
            return f"context limit {peer.models.get(model)} < {context} tokens needed"
        return "excluded (the request already passed through it)"

    def states(self, now: float) -> list[UpstreamState]:
        return [
            UpstreamState(
                url=p.url,
                weight=p.weight,
                effective_weight=0 if p.down(now) else p.effective_weight,
                healthy=p.healthy(now),
                name=p.name,
                role=p.role,
                ready=p.ready,
                last_seen=p.last_seen,
                last_error=p.last_error,
                fails=p.fails,
                forwarded=p.forwarded,
                advert=p.advert,
                reachable=p.reachable,
                in_flight=p.in_flight,
                down=p.down(now),
                max_fails=p.max_fails,
                fail_timeout=p.fail_timeout,
            )
            for p in self.peers
        ]


def rendezvous_score(key: str, peer: Peer) -> float:
    """Weighted rendezvous hashing: `weight / -ln(h)`, `h` uniform in (0, 1) from the key and the peer."""
    digest = hashlib.sha256(f"{key}\0{peer.url}".encode()).digest()
    h = ((int.from_bytes(digest[:8], "big") >> 12) + 0.5) / 2**52  # exact: strictly inside (0, 1)
    return peer.weight / -math.log(h)


def _new_peer(section: UpstreamSection, routing: RoutingSection) -> Peer:
    return Peer(
        url=section.url,
        weight=section.weight,
        max_fails=routing.max_fails if section.max_fails is None else section.max_fails,
        fail_timeout=routing.fail_timeout if section.fail_timeout is None else section.fail_timeout,
    )


def _model_entries(value: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """An advertisement's `models` list → (name, entry) for each entry that is an object with a name."""
    for entry in value if isinstance(value, list) else ():
        if isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry["name"]:
            yield entry["name"][:MAX_FIELD_CHARS], entry


def _models(value: Any) -> dict[str, int | None]:
    """An advertisement's `models` list → name → context limit (None while that model loads)."""
    out: dict[str, int | None] = {}
    for name, entry in _model_entries(value):
        limit = entry.get("max_context")
        good = isinstance(limit, int) and not isinstance(limit, bool) and limit > 0
        out[name] = limit if good else None
    return out


def _tokenizers(value: Any) -> dict[str, str]:
    """An advertisement's `models` list → name → the digest of the tokenizer it serves with (when said)."""
    said = ((name, _str_or_none(entry.get("tokenizer"))) for name, entry in _model_entries(value))
    return {name: digest for name, digest in said if digest is not None}


def _versions(value: Any) -> dict[str, ServedVersion]:
    """An advertisement's `models` list → name → the version it serves (entries without one: none)."""
    out: dict[str, ServedVersion] = {}
    for name, entry in _model_entries(value):
        version, label = _str_or_none(entry.get("version")), _str_or_none(entry.get("version_label"))
        if version is not None:
            out[name] = ServedVersion(version, label)
    return out


def _not_ready(advert: Mapping[str, Any]) -> str:
    ready, reason = advert.get("ready"), advert.get("reason")
    if not isinstance(ready, bool):
        return f"its advertisement's `ready` is not true or false (got {_shown(ready)})"
    return f"not ready: {reason[:MAX_FIELD_CHARS] if isinstance(reason, str) and reason else 'no reason given'}"


def _str_or_none(value: Any) -> str | None:
    return value[:MAX_FIELD_CHARS] if isinstance(value, str) and value else None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
