"""A soak: many concurrent clients against one `dsnode serve` process for a bounded time.

Sixteen clients, three API keys (at most 3 requests each at once), a fixed seed: streams read to the
end, whole answers, streams abandoned after the first event, and bad requests (malformed JSON, an
unknown model, too many tokens, a body over the limit, no key, a wrong key). Afterwards every request
is accounted for: each one the clients sent is in the node's log (`request`, or `unauthorized` for a
401) with the status the client saw (an abandoned stream: 499, or 200 if it ended first), and the log
holds nothing else; the node's in-flight count is back to 0, its open files back to where they were,
and its memory within a generous bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp
import pytest
import pytest_asyncio

from tests.support.nodes import ServeProcess, free_port, node_toml

pytestmark = pytest.mark.slow

MODEL = "tiny-dense"
DURATION_S = 20.0
CLIENTS = 16
SEED = 8
KEYS = {"alice": "sk-soak-alice-0123456789ab", "bob": "sk-soak-bob-0123456789abcd",
        "carol": "sk-soak-carol-0123456789a"}
NOT_A_KEY = "sk-soak-nobody-000000000000"
PER_KEY = 3
MAX_BODY = 64 * 1024
RSS_GROWTH_LIMIT_MIB = 200  # generous: a leak of a few KiB per request over ~1000s of requests shows
PROMPT_CACHE_MB = 32  # the prompt cache grows to its bound by design: a small one, so RSS growth still means a leak
FD_SLACK = 4
KINDS = {  # what a client does next, with its weight
    "stream": 5, "whole": 4, "abandon": 3, "bad_json": 1, "unknown_model": 1, "too_many_tokens": 1,
    "too_big": 1, "no_key": 1, "wrong_key": 1,
    "responses": 3, "responses_abandon": 1,  # the Responses API, streamed
    "n_choices": 2,  # three choices of a prompt long enough to be computed once and shared
}
EXPECTED = {  # the statuses each kind may end with (429: the key's 3 slots were in use)
    "stream": {200, 429}, "whole": {200, 429}, "abandon": {"abandoned", 429}, "bad_json": {400, 429},
    "unknown_model": {404, 429}, "too_many_tokens": {400, 429}, "too_big": {413, 429},
    "no_key": {401}, "wrong_key": {401},
    "responses": {200, 429}, "responses_abandon": {"abandoned", 429}, "n_choices": {200, 429},
}


@dataclass
class Sent:
    kind: str
    key: str
    outcome: int | str  # the HTTP status, or "abandoned"


@pytest_asyncio.fixture(scope="module")
async def node(tmp_path_factory, dense_dir):
    work = tmp_path_factory.mktemp("soak")
    (work / "keys").write_text("".join(f"{name}: {key}\n" for name, key in KEYS.items()))
    port = free_port()
    extra = f"""[auth]
api_keys_file = "keys"

[batching]
prompt_cache_mb = {PROMPT_CACHE_MB}

[limits]
max_concurrent_per_key = {PER_KEY}
max_tokens = 24
max_body_bytes = {MAX_BODY}
"""
    config = work / "node.toml"
    config.write_text(node_toml("soak-node", "central", port, MODEL, dense_dir, "transformers", extra=extra))
    process = ServeProcess("soak-node", config, port, work / "node.log").start()
    try:
        await asyncio.to_thread(process.wait_ready, 180)
        yield process
    finally:
        code = await asyncio.to_thread(process.stop)
        assert code == 0, process.log_tail()


# --- the node, from outside -----------------------------------------------------------------------
def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def in_flight(session: aiohttp.ClientSession, node: ServeProcess) -> float:
    async with session.get(node.url + "/metrics", headers=bearer(KEYS["alice"])) as response:
        text = await response.text()
    gauge = "dsnode_requests_in_flight "
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(gauge))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- one client -----------------------------------------------------------------------------------
async def one(session: aiohttp.ClientSession, url: str, kind: str, key: str, rng: random.Random,
              request_id: str) -> int | str:
    headers = {"X-Request-Id": request_id, "Content-Type": "application/json"}
    if kind != "no_key":
        headers.update(bearer(NOT_A_KEY if kind == "wrong_key" else key))
    body: dict = {"model": MODEL, "max_tokens": rng.randint(2, 16), "stream": kind in ("stream", "abandon"),
                  "messages": [{"role": "user", "content": f"Tell me about {rng.randrange(1000)}"}]}
    if kind == "unknown_model":
        body["model"] = "no-such-model"
    elif kind == "too_many_tokens":
        body["max_tokens"] = 10_000
    elif kind == "abandon":
        body.update(max_tokens=24, ignore_eos=True)
    if kind == "n_choices":
        body.update(n=3, stream=True, messages=[{"role": "user", "content": " ".join(
            f"Tell me about {rng.randrange(1000)}." for _ in range(6))}])
    if kind.startswith("responses"):
        return await one_response(session, url, kind, body, headers)
    data = json.dumps(body).encode()
    if kind == "bad_json":
        data = data[:-3]
    elif kind == "too_big":
        body["messages"][0]["content"] = "x" * MAX_BODY
        data = json.dumps(body).encode()
    async with session.post(url + "/v1/chat/completions", data=data, headers=headers) as response:
        if kind == "abandon" and response.status == 200:
            await response.content.readuntil(b"\n\n")
            response.close()  # gone after the first event
            return "abandoned"
        payload = await response.read()
        if response.status == 200 and body["stream"]:
            assert payload.endswith(b"data: [DONE]\n\n"), payload[-200:]
            assert b'"error"' not in payload, payload[-300:]
        elif response.status >= 400:
            error = json.loads(payload)["error"]
            assert set(error) == {"message", "type", "param", "code"}
            if response.status == 429:
                assert response.headers["Retry-After"] == "1"
        return response.status


async def one_response(session: aiohttp.ClientSession, url: str, kind: str, chat: dict,
                       headers: dict[str, str]) -> int | str:
    """A Responses API request for the same ask, streamed: read to its last event, or abandoned."""
    body = {"model": chat["model"], "input": chat["messages"][0]["content"], "stream": True,
            "max_output_tokens": 24 if kind == "responses_abandon" else chat["max_tokens"],
            "ignore_eos": kind == "responses_abandon"}
    async with session.post(url + "/v1/responses", json=body, headers=headers) as response:
        if kind == "responses_abandon" and response.status == 200:
            await response.content.readuntil(b"\n\n")
            response.close()
            return "abandoned"
        payload = await response.read()
        if response.status == 200:
            last = payload.rstrip().rsplit(b"\n\n", 1)[-1]
            assert last.startswith((b"event: response.completed", b"event: response.incomplete")), payload[-300:]
            assert b"response.failed" not in payload and b"[DONE]" not in payload
        return response.status


async def client(number: int, url: str, sent: dict[str, Sent], stop_at: float) -> None:
    rng = random.Random(SEED * 1000 + number)
    names = list(KEYS)
    kinds, weights = list(KINDS), list(KINDS.values())
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        i = 0
        while time.monotonic() < stop_at:
            kind = rng.choices(kinds, weights)[0]
            name = names[number % len(names)]
            request_id = f"soak-{number}-{i}"
            i += 1
            outcome = await one(session, url, kind, KEYS[name], rng, request_id)
            sent[request_id] = Sent(kind, name, outcome)
            if outcome == 429:  # Retry-After says 1s; an impatient client comes back sooner
                await asyncio.sleep(rng.uniform(0.05, 0.3))


# --- the soak -------------------------------------------------------------------------------------
async def test_many_clients_for_a_while_every_request_accounted_for_nothing_leaks(node):
    pid = node.process.pid
    async with aiohttp.ClientSession() as session:
        for _ in range(5):  # warm up: first-request allocations are not a leak
            async with session.post(node.url + "/v1/chat/completions", headers=bearer(KEYS["bob"]),
                                    json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                          "max_tokens": 8, "stream": True}) as response:
                assert response.status == 200
                await response.read()
        assert await in_flight(session, node) == 1  # this very scrape
    await asyncio.sleep(0.5)
    rss_before, files_before = rss_mib(pid), open_files(pid)

    sent: dict[str, Sent] = {}
    await asyncio.gather(*(client(n, node.url, sent, time.monotonic() + DURATION_S) for n in range(CLIENTS)))

    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(60):
            while await in_flight(session, node) > 1:
                await asyncio.sleep(0.1)
    async with asyncio.timeout(60):  # the clients' keep-alive connections are closed by now
        while open_files(pid) > files_before + FD_SLACK:
            await asyncio.sleep(0.1)
    rss_after, files_after = rss_mib(pid), open_files(pid)

    outcomes = Counter(str(s.outcome) for s in sent.values())
    by_kind = Counter(s.kind for s in sent.values())
    print(f"\nsoak: {len(sent)} requests in {DURATION_S:g}s from {CLIENTS} clients; "
          f"outcomes {dict(outcomes)}; kinds {dict(by_kind)}; RSS {rss_before:.0f} -> {rss_after:.0f} MiB; "
          f"open files {files_before} -> {files_after}")
    for request_id, s in sent.items():
        assert s.outcome in EXPECTED[s.kind], (request_id, s)
    assert outcomes["200"] > 50 and outcomes["abandoned"] > 5 and outcomes["429"] > 0
    assert all(by_kind[kind] > 3 for kind in ("responses", "n_choices"))

    logged = await logged_outcomes(node, set(sent))
    assert set(logged) == set(sent), (set(sent) - set(logged), set(logged) - set(sent))
    for request_id, s in sent.items():
        want = {499, 200} if s.outcome == "abandoned" else {s.outcome}
        assert logged[request_id] in want, (request_id, s, logged[request_id])
    text = node.log_text()
    assert not any(key in text for key in KEYS.values())

    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MIB, (rss_before, rss_after)
    assert files_after <= files_before + FD_SLACK


async def logged_outcomes(node: ServeProcess, sent: set[str]) -> dict[str, int]:
    """The status the node logged for each soak request, once every sent one is in its log (a node
    logs a request after its answer is sent, so the last ones may trail the clients) or 30 s passed.
    Also checks what each record says: logged once, the key's name and never the key, no errors."""
    deadline = time.monotonic() + 30
    while True:
        logged = _logged_outcomes(node)
        if sent <= set(logged) or time.monotonic() > deadline:
            return logged
        await asyncio.sleep(0.2)


def _logged_outcomes(node: ServeProcess) -> dict[str, int]:
    logged: dict[str, int] = {}
    for line in node.complete_log_lines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        if event.get("event") == "request" and event["request_id"].startswith("soak-"):
            assert event["request_id"] not in logged, event
            logged[event["request_id"]] = event["status"]
            assert event.get("user") in KEYS, event  # the key's name, never the key
        elif event.get("event") == "unauthorized":
            assert event["request_id"] not in logged, event
            logged[event["request_id"]] = 401
        assert event.get("level") not in ("error", "critical"), event
    return logged
