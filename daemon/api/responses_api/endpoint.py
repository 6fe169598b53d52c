"""`/v1/responses`: a request turned into the chat request it stands for (served by the chat path,
`dsnode.api.completions`), and the stored responses' own routes: `GET` and `DELETE
/v1/responses/{id}`, `GET /v1/responses/{id}/input_items`."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..appkeys import NODE
from ..auth import IDENTITY
from ..errors import APIError, bad_request
from ..schemas import ChatCompletionRequest, parse_body
from .events import ResponsesRender
from .request import as_history, chat_request, input_messages, parse_responses
from .store import RESPONSE_STORE

CHAT_PATH = "/v1/chat/completions"  # where an upstream is asked (its answer is rendered here)
MAX_LIST = 100


@dataclass(frozen=True)
class Translated:
    raw: bytes  # the chat request's JSON, for an upstream
    body: ChatCompletionRequest
    render: ResponsesRender


def translate(request: web.Request, data: Any) -> Translated:
    """The chat request for a Responses API request, with the render that answers it (and stores the
    response when it asks for that)."""
    asked = parse_responses(data)
    store, scope = request.app[RESPONSE_STORE], request.get(IDENTITY) or ""
    history: list[dict[str, Any]] = []
    if asked.previous_response_id is not None:
        previous = store.get(scope, asked.previous_response_id)
        if previous is None:
            raise APIError(400, f"Previous response with id '{asked.previous_response_id}' not found: this node "
                           "keeps responses in memory until it restarts or needs the room ([limits] "
                           "stored_responses_mb), and only for the API key that made them.",
                           param="previous_response_id", code="previous_response_not_found")
        history = previous.history
    chat = chat_request(asked, history)
    body: ChatCompletionRequest = parse_body(ChatCompletionRequest, chat)  # its refusals: as_responses_error
    items = _input_items(data.get("input"))  # as the client sent them (validated above)
    limit = request.app[NODE].config.limits.stored_responses_mb * 1024 * 1024

    def keep(final: dict[str, Any]) -> None:
        if asked.store and limit:
            conversation = history + input_messages(asked.input) + as_history(final["output"])
            store.put(scope, final, items, conversation, limit)

    raw = json.dumps(chat, ensure_ascii=False).encode()
    return Translated(raw, body, ResponsesRender(asked, keep))


def _input_items(given: Any) -> list[dict[str, Any]]:
    """The input as items with ids, as `input_items` lists them."""
    if given is None:
        return []
    if isinstance(given, str):
        given = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": given}]}]
    out = []
    for item in given:
        item = {"type": "message", **item}
        if isinstance(item.get("content"), str):
            item["content"] = [{"type": "input_text", "text": item["content"]}]
        out.append({"id": "msg_" + secrets.token_hex(24), **item} if "id" not in item else item)
    return out


# --- stored responses -------------------------------------------------------------------------------
async def get_response(request: web.Request) -> web.Response:
    return web.json_response(_stored(request).response)


async def delete_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    if not request.app[RESPONSE_STORE].delete(request.get(IDENTITY) or "", response_id):
        raise _not_found(response_id)
    return web.json_response({"id": response_id, "object": "response", "deleted": True})


async def list_input_items(request: web.Request) -> web.Response:
    """OpenAI's list: newest first by default (`order=asc` for oldest), `limit` (1-100, default 20) and
    `after` (an item id) to page."""
    items = _stored(request).input_items
    query = request.query
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request(f"Invalid value for 'order': {order!r} (asc or desc).", "order", "invalid_value")
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIST:
        raise bad_request(f"Invalid value for 'limit': {query.get('limit')!r} (1 to {MAX_LIST}).", "limit",
                          "invalid_value")
    ordered = items if order == "asc" else items[::-1]
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise bad_request(f"Invalid value for 'after': no input item '{after}' in this response.", "after",
                              "invalid_value")
        ordered = ordered[ids.index(after) + 1:]
    page = ordered[:limit]
    return web.json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                              "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit})


def _stored(request: web.Request) -> Any:
    response_id = request.match_info["response_id"]
    stored = request.app[RESPONSE_STORE].get(request.get(IDENTITY) or "", response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"No response found with id '{response_id}'.", param="response_id", code="not_found")
