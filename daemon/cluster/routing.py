"""Where one request is served: here, or forwarded to an upstream. A pure function of what is known.

The rules (docs/cluster.md):
- a model this node serves is answered here when its prompt (counted with the local tokenizer) is at
  most `long_prompt_tokens` and prompt + max_tokens fits the local context limit;
- it is forwarded when the prompt is longer, when it doesn't fit here, or when the local model isn't
  ready — provided some upstream is known to serve the model (from the advertisements, healthy now
  or not; whether one can take it *now* is the balancer's question, and "none" is a 503, never a
  local attempt);
- a model only upstreams serve is always forwarded, without tokenizing the prompt;
- a request that already passed through this node (or too many nodes) is not forwarded again;
- anything else is a 404 that lists what exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Literal

RouteKind = Literal["local", "forward", "not_found", "loop"]


@dataclass(frozen=True)
class LocalModel:
    name: str
    max_context: int | None  # None until the engine has loaded
    ready: bool


@dataclass(frozen=True)
class RouteRequest:
    model: str
    prompt_tokens: int | None  # counted with the local tokenizer; None when the model isn't local
    max_tokens: int | None  # as requested; None means "the rest of the context"


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    reason: str  # for the request's log record
    context: int | None = None  # tokens an upstream must hold (prompt + completion), when known


def decide(
    request: RouteRequest,
    local: LocalModel,
    long_prompt_tokens: int,
    peer_models: Collection[str],
    may_forward: bool = True,
) -> Route:
    model = request.model
    peers_serve = may_forward and model in peer_models
    if model != local.name:
        if peers_serve:
            # no local tokenizer for it: the upstream checks the prompt; at least max_tokens must fit
            context = None if request.max_tokens is None else request.max_tokens + 1
            return Route("forward", f"model `{model}` is served only by upstreams", context)
        if model in peer_models:
            return Route("loop", "the request already passed through this node; not forwarded again")
        return Route("not_found", f"no node serves model `{model}`")

    prompt = request.prompt_tokens or 0
    needed = prompt + (request.max_tokens or 1)
    if not peers_serve:
        why = "no upstream serves it" if may_forward else "already forwarded to this node"
        return Route("local", f"model served locally ({why})", needed)
    if not local.ready:
        return Route("forward", "the local model is not ready", needed)
    if prompt > long_prompt_tokens:
        return Route("forward", f"prompt of {prompt} tokens > long_prompt_tokens ({long_prompt_tokens})", needed)
    if local.max_context is not None and needed > local.max_context:
        return Route(
            "forward",
            f"prompt {prompt} + completion {needed - prompt} tokens > local context limit ({local.max_context})",
            needed,
        )
    return Route("local", f"prompt of {prompt} tokens <= long_prompt_tokens ({long_prompt_tokens})", needed)
