"""Where one request is served: here, or forwarded to an upstream. A pure function of what is known.

The rules (docs/cluster.md):
- a model this node serves is answered here when its prompt (counted with the local tokenizer) is at
  most `long_prompt_tokens` and prompt + max_tokens fits the local context limit;
- it is forwarded when the prompt is longer, when it doesn't fit here, or when the local model isn't
  ready — provided some upstream is known to serve the model (from the advertisements, healthy now
  or not; whether one can take it *now* is the balancer's question);
- a long prompt that also fits here is forwarded with a *fallback*: should no upstream take it, this
  node serves it itself (slower, and the record says so); one that fits nowhere but upstreams gets
  the 503 ("none can take it now"), never a local attempt that would overrun the context;
- a request that no node can hold — prompt + completion over the local context limit and over every
  upstream's advertised limit for the model — is `too_long`: a final 400 with the largest limit
  there is, never a 503 that a client would retry;
- a model only upstreams serve is always forwarded, without tokenizing the prompt;
- a request that already passed through this node (or too many nodes) is not forwarded again;
- a request carrying token ids (a prompt of ids, `logit_bias`, `stop_token_ids`) for a model served
  here is served here when an upstream serving it uses another tokenizer (or does not say): an edge's
  distill and a central's full model share a name, not a vocabulary (`stay`: the reason);
- anything else is a 404 that lists what exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

RouteKind = Literal["local", "forward", "not_found", "loop", "too_long"]


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
    fallback: bool = False  # forward: if no upstream takes it, this node may serve it (it fits here)
    limit: int | None = None  # too_long: the largest context limit of any node that serves the model


def decide(
    request: RouteRequest,
    local: LocalModel,
    long_prompt_tokens: int,
    peer_models: Mapping[str, int | None],
    may_forward: bool = True,
    stay: str | None = None,
) -> Route:
    """`peer_models`: every model an upstream advertises → the largest context limit advertised for
    it (None: not known, e.g. still loading). `stay`: why a request for the local model must be served
    here (its token ids are this node's tokenizer's)."""
    model = request.model
    peers_serve = may_forward and model in peer_models
    if model != local.name:
        return _remote(request, peer_models, peers_serve)
    prompt = request.prompt_tokens or 0
    needed = prompt + (request.max_tokens or 1)
    if not peers_serve or stay is not None:
        why = stay or ("no upstream serves it" if may_forward else "already forwarded to this node")
        return Route("local", f"model served locally ({why})", needed)
    if not local.ready:
        return Route("forward", "the local model is not ready", needed)
    fits_here = local.max_context is not None and needed <= local.max_context
    peer_limit = peer_models[model]
    if not fits_here and peer_limit is not None and needed > peer_limit:
        limit = max(peer_limit, local.max_context or 0)
        return Route("too_long", f"{needed} tokens > every context limit (largest {limit})", needed, limit=limit)
    if prompt > long_prompt_tokens:
        return Route("forward", f"prompt of {prompt} tokens > long_prompt_tokens ({long_prompt_tokens})", needed,
                     fallback=fits_here)
    if not fits_here:
        return Route(
            "forward",
            f"prompt {prompt} + completion {needed - prompt} tokens > local context limit ({local.max_context})",
            needed,
        )
    return Route("local", f"prompt of {prompt} tokens <= long_prompt_tokens ({long_prompt_tokens})", needed)


def _remote(request: RouteRequest, peer_models: Mapping[str, int | None], peers_serve: bool) -> Route:
    """A model only upstreams serve: no local tokenizer for it, the upstream checks the prompt; at
    least max_tokens (and one prompt token) must fit."""
    model = request.model
    if peers_serve:
        context = None if request.max_tokens is None else request.max_tokens + 1
        limit = peer_models[model]
        if context is not None and limit is not None and context > limit:
            return Route("too_long", f"max_tokens {request.max_tokens} > every context limit (largest {limit})",
                         context, limit=limit)
        return Route("forward", f"model `{model}` is served only by upstreams", context)
    if model in peer_models:
        return Route("loop", "the request already passed through this node; not forwarded again")
    return Route("not_found", f"no node serves model `{model}`")
