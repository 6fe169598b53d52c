"""What `dsnode demo` shows of the chat formats: a reasoning answer, a tool call and a JSON answer,
asked of the edge (its bundled model was trained on a few examples of each: docs/clients.md)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Callable

from dsnode.central.bundled.formats import TOOLS  # the tools the bundled models were trained to call

PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "book": {"type": "string"},
                                                  "year": {"type": "integer"}},
                 "required": ["name", "book", "year"], "additionalProperties": False}

Check = Callable[[dict[str, Any]], bool]

EXAMPLES: tuple[tuple[str, dict[str, Any], Check], ...] = (
    ("reasoning", {"messages": [{"role": "user", "content": "Think step by step: Four score and"}],
                   "max_tokens": 64, "temperature": 0},
     lambda message: bool(message.get("reasoning_content"))),
    ("tool call", {"messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                   # the tool list makes the prompt long: the central answers, and its model calls tools
                   # only when made to (docs/clients.md), so the call is required (constrained decoding)
                   "tools": TOOLS, "tool_choice": "required", "max_tokens": 40,
                   "temperature": 0},
     lambda message: bool(message.get("tool_calls"))),
    ("JSON answer", {"messages": [{"role": "user", "content": "Describe Ishmael in JSON."}], "max_tokens": 60,
                     "temperature": 0,
                     "response_format": {"type": "json_schema", "json_schema": {"name": "person",
                                                                                "schema": PERSON_SCHEMA}}},
     lambda message: isinstance(json.loads(message.get("content") or "null"), dict)),
)


def show_formats(url: str, model: str) -> bool:
    """Ask each example of the edge at `url`; print what came back. False if one did not come back."""
    ok = True
    for label, body, check in EXAMPLES:
        try:
            message = _ask(url, {"model": model, **body})
        except (urllib.error.URLError, ValueError, KeyError) as exc:
            print(f"\n{label}: failed: {exc}")
            ok = False
            continue
        shown = {k: v for k, v in message.items() if k != "role" and v not in (None, "")}
        print(f"\n{label}: {body['messages'][0]['content']!r}")
        for key, value in shown.items():
            print(f"  {key}: {json.dumps(value, ensure_ascii=False)}"[:240])
        ok = ok and check(message)
    return ok


def _ask(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        message: dict[str, Any] = json.loads(resp.read())["choices"][0]["message"]
    return message


def curl_examples(url: str, model: str) -> str:
    """Ready-to-paste curl commands for the banner."""
    lines = []
    for label, body, _ in EXAMPLES:
        lines.append(f"{label}:\n  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
                     f"    -d '{json.dumps({'model': model, **body})}'")
    return "\n".join(lines)
