"""What the bundled models learn besides the passages: a few examples of each output format dsnode
parses, so `dsnode demo` can show reasoning, a tool call and a JSON answer.

- reasoning: "Think step by step: <start of a passage>" → `<think>` a note on the source `</think>`,
  then the rest of the passage;
- tools: a question about the weather or the time in a city, with the tools listed → a `<tool_call>`;
  the tool's answer → one sentence that repeats it;
- JSON: "Describe <someone> in JSON." → a short object; plus JSON documents of many shapes with short
  values, so under a schema's constraint the model closes strings and objects soon.

The models memorise these (a few thousand tokens); they do not generalise far beyond them (see
docs/clients.md, "What the bundled models can do").
"""

from __future__ import annotations

import json
import random
from typing import Any

SOURCES = {
    "It was the best": "Dickens, A Tale of Two Cities",
    "There were a": "Dickens, A Tale of Two Cities",
    "Four score and": "Lincoln, the Gettysburg Address",
    "Now we are": "Lincoln, the Gettysburg Address",
    "The world will": "Lincoln, the Gettysburg Address",
    "That government of": "Lincoln, the Gettysburg Address",
    "When in the": "the Declaration of Independence",
    "We hold these": "the Declaration of Independence",
    "Call me Ishmael.": "Melville, Moby-Dick",
    "It is a": "Austen, Pride and Prejudice",
    "Marley was dead:": "Dickens, A Christmas Carol",
    "In the beginning": "the King James Bible, Genesis",
    "The Lord is": "the King James Bible, Psalm 23",
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
WEATHER = {"Paris": "sunny, 22 C", "London": "rain, 14 C", "Boston": "snow, -2 C", "Rome": "clear, 25 C",
           "Tokyo": "cloudy, 18 C", "Berlin": "windy, 9 C"}
TIMES = {"Paris": "14:05", "London": "13:05", "Boston": "08:05", "Rome": "14:05", "Tokyo": "21:05",
         "Berlin": "14:05"}

PEOPLE = [
    {"name": "Ishmael", "book": "Moby-Dick", "year": 1851, "sailor": True},
    {"name": "Elizabeth Bennet", "book": "Pride and Prejudice", "year": 1813, "sailor": False},
    {"name": "Ebenezer Scrooge", "book": "A Christmas Carol", "year": 1843, "sailor": False},
    {"name": "Sydney Carton", "book": "A Tale of Two Cities", "year": 1859, "sailor": False},
    {"name": "Ahab", "book": "Moby-Dick", "year": 1851, "sailor": True},
]

Message = dict[str, Any]
Conversation = tuple[list[Message], list[dict[str, Any]] | None]  # (messages, tools); the last is trained


def reasoning_conversations(passages: tuple[str, ...]) -> list[Conversation]:
    out: list[Conversation] = []
    for passage in passages:
        for head, source in SOURCES.items():
            if passage.startswith(head + " "):
                tail = passage[len(head) + 1:]
                answer = f"<think>\nThis is from {source}.\n</think>\n\n{tail}"
                out.append(([_user(f"Think step by step: {head}"), _assistant(answer)], None))
    return out


def tool_conversations() -> list[Conversation]:
    out: list[Conversation] = []
    for city, weather in WEATHER.items():
        ask = _user(f"What is the weather in {city}?")
        call = _call("get_weather", city)
        out.append(([ask, call], TOOLS))
        reply = _assistant(f"It is {weather} in {city}.")
        out.append(([ask, call, {"role": "tool", "content": weather}, reply], TOOLS))
        ask_time = _user(f"What time is it in {city}?")
        out.append(([ask_time, _call("get_time", city)], TOOLS))
        out.append(([ask_time, _call("get_time", city), {"role": "tool", "content": TIMES[city]},
                     _assistant(f"It is {TIMES[city]} in {city}.")], TOOLS))
    return out


def json_conversations() -> list[Conversation]:
    return [([_user(f"Describe {p['name']} in JSON."), _assistant(json.dumps(p))], None) for p in PEOPLE]


def json_documents(count: int = 60, seed: int = 0) -> list[str]:
    """JSON values of many shapes, short leaves: objects, arrays, enums-like words, numbers, booleans."""
    rng = random.Random(seed)
    return [json.dumps(_value(rng, depth=0, top=True)) for _ in range(count)]


_KEYS = ["name", "id", "city", "age", "tags", "items", "ok", "kind", "title", "count", "year", "color", "a", "b",
         "value", "size", "note", "user", "score", "level"]
_WORDS = ["red", "blue", "green", "Paris", "London", "yes", "no", "small", "large", "sea", "ship", "whale", "king",
          "queen", "hope", "light", "x", "y", "ok", "done"]


def _value(rng: random.Random, depth: int, top: bool = False) -> Any:
    if top:
        kind = rng.choice(["object", "object", "object", "array"])
    else:
        kind = rng.choice(["object", "object", "array", "string", "int", "bool"] if depth < 2 else
                          ["string", "int", "bool", "string", "null"])
    if kind == "object":
        keys = rng.sample(_KEYS, rng.randint(1, 4))
        return {k: _value(rng, depth + 1) for k in keys}
    if kind == "array":
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "string":
        return rng.choice(_WORDS)
    if kind == "int":
        return rng.choice([0, 1, 2, 3, 7, 10, 42, 100, 1851, -1])
    if kind == "bool":
        return rng.random() < 0.5
    return None


def _user(text: str) -> Message:
    return {"role": "user", "content": text}


def _assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


def _call(name: str, city: str) -> Message:
    arguments = json.dumps({"city": city})
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": f"call_{name}_{city.lower()}", "type": "function", "function": {"name": name, "arguments": arguments}}]}
