"""Finished responses kept in memory (`store`, on by default as in OpenAI's API): for a next turn's
`previous_response_id`, and for `GET` / `DELETE /v1/responses/{id}`.

Each response is kept with the conversation it ends (as chat messages: the history it continued, its
input, its output), so a next turn sends only its new input. Responses belong to the API key that made
them: another key finds nothing (404), as with the prompt cache. The store is bounded by
`[limits] stored_responses_mb` (read at every store, so a reload applies); the least recently used
responses go first, and it is lost when the node restarts (a client that needs more sends the history
as `input`, which works everywhere).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Stored:
    scope: str  # the API key's name ("" without keys)
    response: dict[str, Any]
    input_items: list[dict[str, Any]]  # the request's input, as items (GET .../input_items)
    history: list[dict[str, Any]]  # the conversation up to and including this response, as chat messages
    nbytes: int


class ResponseStore:
    def __init__(self) -> None:
        self._kept: OrderedDict[str, Stored] = OrderedDict()
        self.nbytes = 0

    def put(self, scope: str, response: dict[str, Any], input_items: list[dict[str, Any]],
            history: list[dict[str, Any]], limit_bytes: int) -> bool:
        """Keep a finished response; False when it is bigger than the whole store."""
        nbytes = len(json.dumps([response, input_items, history], ensure_ascii=False).encode())
        self.delete(scope, response["id"])
        if nbytes > limit_bytes:
            self._trim(limit_bytes)
            return False
        self._kept[response["id"]] = Stored(scope, response, input_items, history, nbytes)
        self.nbytes += nbytes
        self._trim(limit_bytes)
        return True

    def get(self, scope: str, response_id: str) -> Stored | None:
        stored = self._kept.get(response_id)
        if stored is None or stored.scope != scope:
            return None
        self._kept.move_to_end(response_id)
        return stored

    def delete(self, scope: str, response_id: str) -> bool:
        stored = self._kept.get(response_id)
        if stored is None or stored.scope != scope:
            return False
        del self._kept[response_id]
        self.nbytes -= stored.nbytes
        return True

    def __len__(self) -> int:
        return len(self._kept)

    def _trim(self, limit_bytes: int) -> None:
        while self.nbytes > limit_bytes and self._kept:
            _, oldest = self._kept.popitem(last=False)
            self.nbytes -= oldest.nbytes


RESPONSE_STORE: web.AppKey[ResponseStore] = web.AppKey("responses", ResponseStore)
