"""The affinity key of a request (`[routing] affinity = "prefix"`): what the balancer keeps on one
upstream so that the upstream's prompt cache holds it. Pure.

A chat client resends a conversation whole every turn, so what does not change from turn to turn is
its beginning: the messages up to the first user message (the system prompt and the first question).
The key is a digest of those, the model and the tools (rendered into the prompt's start). A text
completion's key is its first prompt's first `PREFIX_CHARS` characters (or `PREFIX_TOKENS` token ids):
few, so that a prompt growing turn by turn keeps its key from its first turn on (a first turn shorter
than that costs little to compute again). Prompts that begin alike get the same key, and that is what
is wanted: they share a cached prefix. A request's `prompt_cache_key` (OpenAI's parameter) is its key
instead, when it gives one.
"""

from __future__ import annotations

import hashlib
import json

from .schemas import Body, ChatCompletionRequest

PREFIX_CHARS = 256
PREFIX_TOKENS = 64


def affinity_key(body: Body) -> str:
    if body.prompt_cache_key is not None:  # the client's own (OpenAI's parameter)
        return hashlib.sha256(json.dumps([body.model, body.prompt_cache_key]).encode()).hexdigest()
    if isinstance(body, ChatCompletionRequest):
        first_user = next((i for i, m in enumerate(body.messages) if m.role == "user"), len(body.messages) - 1)
        opening = [m.model_dump(mode="json", exclude_none=True) for m in body.messages[: first_user + 1]]
        tools = [t.model_dump(mode="json", exclude_none=True) for t in body.tools or ()]
        start: object = {"messages": opening, "tools": tools}
    else:
        first = body.prompts()[0]
        start = first[:PREFIX_CHARS] if isinstance(first, str) else first[:PREFIX_TOKENS]
    text = json.dumps([body.model, start], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
