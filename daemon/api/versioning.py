"""Model versions on the request path (docs/versions.md): which version of its model a request gets
when `[routing.split]` shares the model among versions, which versions to try next if that one fails
before its first token, and what each attempt tells the canary rule.

Who a request is for (sticky: the same user always gets the same version while the shares stay), in
this order: the `X-DSNode-Split-Key` header, the OpenAI `user` field, the API key's name. A request
with none of them follows the shares exactly (smooth weighted round-robin).

The node the client asked decides; a forwarded request (one with `X-DSNode-Via`) is not split again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
from aiohttp import web

from .. import headers
from ..cluster.canary import Outcome
from ..cluster.splits import Choice, Decision
from ..node import Node, Serving
from ..record import RequestRecord
from .auth import IDENTITY
from .schemas import Body

log = structlog.get_logger("dsnode.canary")

MAX_SPLIT_KEY = 256
BROKEN = frozenset({500, 502, 504})  # answers that count as a version's errors (503, 429: busy, not broken)


class TryNextVersion(Exception):
    """The version tried failed before the request's first token: the next one may serve it."""

    def __init__(self, version: str, why: str) -> None:
        super().__init__(why)
        self.version = version
        self.why = why


@dataclass(frozen=True)
class VersionPlan:
    choice: Choice | None  # None: no split applies to this request
    attempts: tuple[str | None, ...]  # the versions to try, in order; (None,): any version

    @property
    def model(self) -> str | None:
        return None if self.choice is None else self.choice.model


NO_SPLIT = VersionPlan(None, (None,))


def split_user(request: web.Request, body: Body) -> tuple[str | None, str]:
    """(who the request is for, where that came from), or (None, "") for an unsticky request."""
    given = request.headers.get(headers.SPLIT_KEY, "").strip()
    if given:
        return given[:MAX_SPLIT_KEY], "header"
    if body.user:
        return body.user[:MAX_SPLIT_KEY], "user"
    identity = request.get(IDENTITY)
    if identity:
        return identity, "api key"
    return None, ""


def plan_versions(node: Node, request: web.Request, body: Body, via: tuple[str, ...],
                  record: RequestRecord) -> VersionPlan:
    """The versions this request may be served by, the split's choice first; versions no node
    serves now are left out (and a split none of whose versions is served applies to nothing)."""
    if via or body.model not in node.splits.models:
        return NO_SPLIT
    user, source = split_user(request, body)
    choice = node.splits.choose(body.model, user)
    if choice is None:
        return NO_SPLIT
    served = tuple(key for key in choice.order if serves(node, body.model, key))
    if not served:
        return NO_SPLIT
    record.split = f"sticky ({source})" if choice.sticky else "shares"
    return VersionPlan(choice, served)


def serves(node: Node, model: str, version: str) -> bool:
    """Some node known here serves `model` in `version` (this one, or an upstream that advertised it)."""
    if model == node.config.model.name and node.served.matches(version):
        return True
    return any(peer.serves(model, version) for peer in node.upstreams.balancer.peers)


def local_serves(serving: Serving, model: str, version: str | None) -> bool:
    return model == serving.model and (version is None or serving.version.matches(version))


# --- what an attempt tells the canary rule ----------------------------------------------------------
def note_outcome(node: Node, plan: VersionPlan, version: str | None, record: RequestRecord, started: float,
                 error: bool) -> None:
    """One attempt on `version` ended: its outcome into the version's window (a rollback, if it brings one)."""
    if plan.choice is None or version is None:
        return
    now = time.monotonic()
    first = record.first_token
    ttft = first - started if first is not None and first >= started and not error else None
    outcome = Outcome(now, error, ttft, None if error else _tpot(record))
    decision = node.splits.observe(plan.choice.model, version, outcome, time.time())
    if decision is not None:
        log_decision(decision)


def failed(record: RequestRecord) -> bool:
    """An answer that was sent, but broken: a 5xx, or a stream that ended in an error event."""
    return record.status in BROKEN or record.stream_error


def _tpot(record: RequestRecord) -> float | None:
    times = record.token_times
    tokens = record.completion_tokens or len(times)
    if len(times) < 2 or tokens < 2:
        return None
    return (times[-1] - times[0]) / (tokens - 1)


def log_decision(decision: Decision) -> None:
    """`canary_rolled_back` / `canary_promoted`, with the figures that led to it."""
    figures = {"canary": decision.canary.as_json() if decision.canary else None,
               "baseline_figures": decision.baseline_figures.as_json() if decision.baseline_figures else None}
    rolled_back = decision.action == "rolled_back"
    emit = log.warning if rolled_back else log.info
    emit("canary_rolled_back" if rolled_back else "canary_promoted", model=decision.model, version=decision.version,
         baseline=decision.baseline, by=decision.by, reasons=list(decision.reasons), **figures)
