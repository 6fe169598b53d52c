"""`[routing] affinity = "prefix"` through a real node to scripted upstreams: a conversation's turns go
to one upstream (its prompt cache holds them), conversations spread by weight, a failed upstream's
conversations fail over; and the key itself (pure)."""

from __future__ import annotations

import json
from collections import Counter

from dsnode.api.affinity import affinity_key
from dsnode.api.schemas import ChatCompletionRequest, CompletionRequest

from .fakes import MODEL


def chat(*contents: str, system: str | None = None, tools: list | None = None) -> dict:
    roles = ["user", "assistant"] * len(contents)
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": role, "content": c} for role, c in zip(roles, contents)]
    return {"model": MODEL, "messages": messages, "max_tokens": 4, **({"tools": tools} if tools else {})}


def key(body: dict) -> str:
    schema = ChatCompletionRequest if "messages" in body else CompletionRequest
    return affinity_key(schema.model_validate(body))


def test_the_key_is_a_conversations_opening():
    turn1 = chat("What is MLA?", system="Be brief.")
    turn3 = chat("What is MLA?", "Multi-head latent attention.", "And MoE?", system="Be brief.")
    assert key(turn1) == key(turn3)  # later turns keep the opening
    assert key(chat("What is MoE?", system="Be brief.")) != key(turn1)
    assert key(chat("What is MLA?", system="Be terse.")) != key(turn1)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert key(chat("What is MLA?", system="Be brief.", tools=[tool])) != key(turn1)
    assert key({**turn1, "model": "other"}) != key(turn1)
    assert key({**turn1, "temperature": 0.1, "max_tokens": 9}) == key(turn1)  # sampling is not the prompt
    story = "Once upon a time " * 16  # 272 characters: a first turn; later turns append to it
    assert key({"model": MODEL, "prompt": story}) == key({"model": MODEL, "prompt": story + " a dragon" * 99})
    assert key({"model": MODEL, "prompt": story[:100]}) != key({"model": MODEL, "prompt": story})
    assert key({"model": MODEL, "prompt": [list(range(70)) + [1]]}) == key({"model": MODEL, "prompt": list(range(600))})
    mine = {"prompt_cache_key": "user-42"}  # OpenAI's parameter: the client's own key
    assert key({**turn1, **mine}) == key({**chat("Something else"), **mine}) != key(turn1)


async def post(client, body: dict):
    response = await client.post("/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return response.status, response.headers.get("X-DSNode-Node")


async def test_a_conversation_stays_on_one_upstream_and_conversations_spread(fakes, edge):
    a, b = await fakes("central-a"), await fakes("central-b")
    _, client = await edge([(a.url, 1), (b.url, 1)], routing='affinity = "prefix"')
    served = Counter()
    for n in range(24):
        nodes = set()
        for turn in range(1, 4):  # the history grows; the opening does not
            contents = [f"question {n}"] + [f"turn {t}" for t in range(1, 2 * turn - 1)]
            status, node = await post(client, chat(*contents))
            assert status == 200
            nodes.add(node)
        assert len(nodes) == 1, f"conversation {n} moved: {nodes}"
        served[nodes.pop()] += 1
    assert set(served) == {"central-a", "central-b"} and min(served.values()) >= 5


async def test_without_affinity_the_turns_take_turns(fakes, edge):
    a, b = await fakes("central-a"), await fakes("central-b")
    _, client = await edge([(a.url, 1), (b.url, 1)])
    nodes = [(await post(client, chat("question", *["turn"] * (2 * t))))[1] for t in range(4)]
    assert Counter(nodes) == {"central-a": 2, "central-b": 2}  # nginx's round-robin, as before


async def test_a_conversation_whose_upstream_fails_goes_to_its_next_best(fakes, edge):
    a, b = await fakes("central-a"), await fakes("central-b")
    _, client = await edge([(a.url, 1), (b.url, 1)], routing='affinity = "prefix"')
    openings = {}
    for n in range(12):
        openings[n] = (await post(client, chat(f"question {n}")))[1]
    on_a = [n for n, served in openings.items() if served == "central-a"]
    assert on_a
    await a.stop()
    for n in on_a:
        assert await post(client, chat(f"question {n}", "answer", "next")) == (200, "central-b")
    for n, served in openings.items():  # b's conversations did not move
        if served == "central-b":
            assert (await post(client, chat(f"question {n}", "answer", "next")))[1] == "central-b"
