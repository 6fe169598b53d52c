"""API keys, peer credentials and per-key concurrency, on a node over the fast tier's FakeEngine behind
the aiohttp test client (a real loopback socket, so the official `openai` client can talk to it)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest
import pytest_asyncio
from dsnode.api.app import create_app
from dsnode.api.auth import AUTH
from dsnode.api.openapi import openapi_bytes
from dsnode.cluster.peer_auth import PeerAuth, PeerRefused, challenge_of
from dsnode.cluster.peers import Poller
from dsnode.cluster.upstreams import Upstreams
from dsnode.config import ConfigError, RoutingSection, UpstreamSection, load_config
from dsnode.inference.engine import Engine
from dsnode.node import Node
from dsnode.probe import probe_host
from dsnode.secrets import KeyFileError, SecretFileError, read_api_keys, read_cluster_secrets
from dsnode.server import NodeServer
from structlog.testing import capture_logs

from tests.daemon.cluster.fakes import MODEL as REMOTE_MODEL
from tests.daemon.cluster.fakes import FakeUpstream
from tests.support.engines import DEFAULT_REPLY, FakeEngine
from tests.support.fake_nodes import fake_engine_for

from .conftest import MODEL, config_text

ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-fedcba9876543210"
CAROL = "sk-carol-00aa11bb22cc33dd"
CAROL_HASH = hashlib.sha256(CAROL.encode()).hexdigest()
SECRET = "cluster-secret-" + "5" * 40
OTHER_SECRET = "cluster-secret-" + "6" * 40
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


# --- fixtures -------------------------------------------------------------------------------------
@pytest_asyncio.fixture
async def engine(tmp_path_factory, stub_model_dir, fast_tokenizer) -> AsyncIterator[FakeEngine]:
    path = tmp_path_factory.mktemp("engine") / "dsnode.toml"
    path.write_text(config_text(stub_model_dir))
    engine = fake_engine_for(load_config(path), fast_tokenizer)
    await engine.load()
    yield engine
    await engine.close()


def keys_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys"
    path.write_text(text)
    return path


def auth_toml(keys: Path | None = None, secret: Path | None = None, limits: str = "") -> str:
    lines = ["[auth]"]
    if keys is not None:
        lines.append(f'api_keys_file = "{keys}"')
    if secret is not None:
        lines.append(f'cluster_secret_file = "{secret}"')
    return "\n".join(lines) + ("\n[limits]\n" + limits if limits else "") + "\n"


@pytest.fixture
def node_with(tmp_path, stub_model_dir, engine, aiohttp_client):
    """`await node_with(extra_toml, engine=...)` → (node, test client); records land in node.records."""

    async def make(extra: str, engine_: Engine | None = None, name: str = "dsnode.toml",
                   routing: str = "") -> tuple[Node, Any]:
        path = tmp_path / name
        path.write_text(config_text(stub_model_dir, extra=routing + "\n" + extra))
        node = Node(load_config(path), engine_ or engine, probe_host())
        node.records = []  # type: ignore[attr-defined]
        node.observers.append(node.records.append)  # type: ignore[attr-defined]
        return node, await aiohttp_client(create_app(node))

    return make


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def error_of(response: Any) -> dict[str, Any]:
    body = await response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- the key file ---------------------------------------------------------------------------------
def test_a_key_file_names_its_keys_or_fingerprints_them(tmp_path):
    keys = read_api_keys(keys_file(tmp_path, f"""# who may ask
alice: {ALICE}
{BOB}

carol: sha256:{CAROL_HASH}
sha256:{hashlib.sha256(b"sk-anonymous-hashed-key-1").hexdigest().upper()}
"""))
    assert keys.identify(ALICE) == "alice"
    assert keys.identify(BOB) == "sha256:" + hashlib.sha256(BOB.encode()).hexdigest()[:8]
    assert keys.identify(CAROL) == "carol"
    assert keys.identify("sk-anonymous-hashed-key-1") == "sha256:" + \
        hashlib.sha256(b"sk-anonymous-hashed-key-1").hexdigest()[:8]
    assert keys.identify(ALICE + "x") is None and keys.identify("") is None and len(keys) == 4


@pytest.mark.parametrize("line, why", [
    ("short-key", "at least 16 characters"),
    ("alice:sk-no-space-after-the-colon", "expected `KEY`, `sha256:HEX` or `NAME: KEY`"),
    ("two words-in-one-line-here", "expected `KEY`"),
    ("sha256:abcd", "a hashed key is sha256: and 64 hex digits"),
    ("bob: sha256:zz", "a hashed key is sha256: and 64 hex digits"),
    (f"{ALICE}\n{ALICE}", "the same key is listed twice"),
    (f"x: {ALICE}\nx: {BOB}", "the name 'x' is used twice"),
    ("# nothing but a comment", "holds no key"),
])
def test_a_bad_key_file_names_the_line_never_the_key(tmp_path, model_dir_for_config, line, why):
    path = keys_file(tmp_path, line + "\n")
    with pytest.raises(KeyFileError) as info:
        read_api_keys(path)
    assert any(why in p for p in info.value.problems), info.value.problems
    config = tmp_path / "dsnode.toml"
    config.write_text(config_text(model_dir_for_config, extra=auth_toml(path)))
    with pytest.raises(ConfigError) as failed:
        load_config(config)
    problems = [str(p) for p in failed.value.problems]
    assert any(f"auth.api_keys_file: {path}: " in p and why in p for p in problems), problems
    for secret in ("short-key", "sk-no-space-after", "words-in-one-line", "abcd", ALICE, BOB):
        assert secret not in " ".join(problems)


@pytest.fixture
def model_dir_for_config(stub_model_dir):
    return stub_model_dir


def test_a_cluster_secret_file_needs_a_long_secret_and_signs_with_the_first(tmp_path):
    path = tmp_path / "secret"
    path.write_text("too-short\n")
    with pytest.raises(SecretFileError, match="line 1: a secret needs at least 32 characters"):
        read_cluster_secrets(path)
    path.write_text(f"# rotation: the first signs, both verify\n{SECRET}\n{OTHER_SECRET}\n")
    assert read_cluster_secrets(path) == (SECRET.encode(), OTHER_SECRET.encode())


# --- the peer credential (pure) -------------------------------------------------------------------
def test_a_peer_credential_covers_the_request_and_is_good_once():
    now = [1_800_000_000.0]
    sender = PeerAuth((SECRET.encode(),), "edge-1", 30, clock=lambda: now[0])
    receiver = PeerAuth((OTHER_SECRET.encode(), SECRET.encode()), "central-1", 30, clock=lambda: now[0])
    to = receiver.binding
    sent = {"X-DSNode-Via": "edge-1", "X-DSNode-User": "alice", "X-Request-Id": "r1",
            "X-DSNode-Peer": sender.sign("POST", "/v1/completions", "edge-1", "alice", "r1", to=to)}
    assert receiver.verify("POST", "/v1/completions", sent) == "edge-1"
    with pytest.raises(PeerRefused, match="already used"):
        receiver.verify("POST", "/v1/completions", sent)  # a captured header, replayed
    for changed in ({"X-DSNode-User": "mallory"}, {"X-DSNode-Via": ""}, {"X-Request-Id": "r2"}):
        forged = {**sent, "X-DSNode-Peer": sender.sign("POST", "/v1/completions", "edge-1", "alice", "r1", to=to),
                  **changed}
        with pytest.raises(PeerRefused, match="does not match"):
            receiver.verify("POST", "/v1/completions", forged)
    fresh = {**sent, "X-DSNode-Peer": sender.sign("POST", "/v1/completions", "edge-1", "alice", "r1", to=to)}
    with pytest.raises(PeerRefused, match="does not match"):
        receiver.verify("POST", "/v1/chat/completions", fresh)  # another path
    stranger = PeerAuth((b"y" * 40,), "laptop", 30, clock=lambda: now[0])
    with pytest.raises(PeerRefused, match="does not match"):
        receiver.verify("GET", "/cluster", stranger.headers("GET", "/cluster", to))
    old = sender.headers("GET", "/cluster", to)
    now[0] += 31
    with pytest.raises(PeerRefused, match="more than max_clock_skew"):
        receiver.verify("GET", "/cluster", old)
    for bad in ("", "v1", "v2 1 2 3 x", "v1 notanumber n m x"):
        with pytest.raises(PeerRefused):
            receiver.verify("GET", "/cluster", {"X-DSNode-Peer": bad})


# --- API keys over HTTP ---------------------------------------------------------------------------
async def test_no_key_or_a_wrong_key_is_401_in_openai_shape(tmp_path, node_with):
    keys = keys_file(tmp_path, f"alice: {ALICE}\n")
    node, client = await node_with(auth_toml(keys))
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="dsnode"'
    assert (await error_of(response))["code"] == "missing_api_key"
    response = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(BOB))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    error = await error_of(response)
    assert error["code"] == "invalid_api_key" and BOB not in json.dumps(error)
    basic = {"Authorization": f"Basic {ALICE}"}
    response = await client.post("/v1/chat/completions", json=CHAT, headers=basic)
    assert response.status == 401
    assert node.records == []  # refused before any work


async def test_the_official_client_with_a_key_plain_or_hashed(tmp_path, node_with):
    keys = keys_file(tmp_path, f"alice: {ALICE}\ncarol: sha256:{CAROL_HASH}\n{BOB}\n")
    node, client = await node_with(auth_toml(keys))
    base = str(client.make_url("/v1"))
    for key in (ALICE, CAROL, BOB):
        async with openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0) as sdk:
            answer = await sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, user="end-user-7")
            content = answer.choices[0].message.content
            assert content and DEFAULT_REPLY.startswith(content)  # the scripted reply, cut at max_tokens
            assert answer.usage is not None and answer.usage.completion_tokens == 2
    async with openai.AsyncOpenAI(base_url=base, api_key="sk-not-a-key-of-this-node", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as info:
            await sdk.models.list()
    assert info.value.code == "invalid_api_key"
    # the key's name, or its fingerprint, is who asked; never the key, nor what the client claims
    bob = "sha256:" + hashlib.sha256(BOB.encode()).hexdigest()[:8]
    assert [r.user for r in node.records] == ["alice", "carol", bob]


async def test_probes_and_the_api_document_are_open_the_rest_needs_a_key(tmp_path, node_with):
    node, client = await node_with(auth_toml(keys_file(tmp_path, f"{ALICE}\n")))
    for path in ("/health", "/ready", "/openapi.json"):
        assert (await client.get(path)).status == 200, path
    for path in ("/metrics", "/v1/models", "/cluster"):
        assert (await client.get(path)).status == 401, path
        assert (await client.get(path, headers=bearer(ALICE))).status == 200, path
    document = await (await client.get("/openapi.json")).json()
    assert document["security"] == [{"bearer": []}]
    assert document["paths"]["/health"]["get"]["security"] == []


async def test_without_auth_nothing_is_asked_and_no_middleware_runs(node_with):
    node, client = await node_with("")
    assert not client.app[AUTH].installed
    response = await client.post("/v1/chat/completions", json={**CHAT, "user": "end-user-7"})
    assert response.status == 200
    assert node.records[-1].user == "end-user-7"  # OpenAI's own `user` field, as before
    document = await client.get("/openapi.json")
    assert document.status == 200 and document.content_type == "application/json"
    assert await document.read() == openapi_bytes(bearer=False)  # the document of tests/e2e/test_fuzz.py


async def test_a_reload_rereads_the_key_file_even_if_the_config_did_not_change(tmp_path, stub_model_dir,
                                                                              engine, aiohttp_client):
    keys = keys_file(tmp_path, f"alice: {ALICE}\n")
    path = tmp_path / "dsnode.toml"
    path.write_text(config_text(stub_model_dir, extra=auth_toml(keys)))
    server = NodeServer(load_config(path), engine=engine)
    client = await aiohttp_client(server.app)
    assert (await client.get("/v1/models", headers=bearer(ALICE))).status == 200
    assert (await client.get("/v1/models", headers=bearer(BOB))).status == 401
    with capture_logs() as logs:
        keys.write_text(f"bob: {BOB}\n")  # alice's key is revoked, bob's added; dsnode.toml untouched
        assert await server.reload()
        assert (await client.get("/v1/models", headers=bearer(BOB))).status == 200
        assert (await client.get("/v1/models", headers=bearer(ALICE))).status == 401
        keys.write_text("alice: short\n")  # a broken key file: the reload is refused, bob's key stays
        assert not await server.reload()
        assert (await client.get("/v1/models", headers=bearer(BOB))).status == 200
    refused = [e for e in logs if e["event"] == "config_reload_failed"]
    assert refused and "auth.api_keys_file" in str(refused[0]["problems"])
    assert ALICE not in repr(logs) and BOB not in repr(logs) and "short" not in repr(logs)


async def test_turning_auth_on_needs_a_restart(tmp_path, stub_model_dir, engine, aiohttp_client):
    path = tmp_path / "dsnode.toml"
    path.write_text(config_text(stub_model_dir))
    server = NodeServer(load_config(path), engine=engine)
    client = await aiohttp_client(server.app)
    path.write_text(config_text(stub_model_dir, extra=auth_toml(keys_file(tmp_path, f"{ALICE}\n"))))
    with capture_logs() as logs:
        assert await server.reload()
    assert any(e["event"] == "config_reload_needs_restart" and "auth" in e["sections"] for e in logs)
    assert server.config.auth.api_keys_file is None  # kept, as the other restart-only settings
    assert (await client.get("/v1/models")).status == 200


async def test_keys_never_reach_the_logs(tmp_path, node_with):
    with capture_logs() as logs:
        node, client = await node_with(auth_toml(keys_file(tmp_path, f"alice: {ALICE}\n{BOB}\n")))
        await client.post("/v1/chat/completions", json=CHAT, headers=bearer(ALICE))
        await client.post("/v1/chat/completions", json=CHAT, headers=bearer(BOB))
        await client.post("/v1/chat/completions", json=CHAT, headers=bearer(CAROL))  # refused
        await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=bearer(ALICE[:-1]))
    text = repr(logs)
    assert "alice" in text and "unauthorized" in text
    for secret in (ALICE, BOB, CAROL, ALICE[:-1]):
        assert secret not in text


# --- per-key concurrency --------------------------------------------------------------------------
async def until(predicate: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_concurrent_requests_per_key_are_capped_with_429(tmp_path, node_with, engine):
    keys = keys_file(tmp_path, f"alice: {ALICE}\nbob: {BOB}\n")
    node, client = await node_with(auth_toml(keys, limits="max_concurrent_per_key = 2\n"))
    stream = {**CHAT, "stream": True}
    engine.hold()  # the first request gets its first token; nothing more is generated until resume()
    first = await client.post("/v1/chat/completions", json=stream, headers=bearer(ALICE))
    await first.content.readline()
    second = asyncio.ensure_future(client.post("/v1/chat/completions", json=stream, headers=bearer(ALICE)))
    await until(lambda: len(engine.requests) == 2)
    refused = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(ALICE))
    assert refused.status == 429 and refused.headers["Retry-After"] == "1"
    assert (await error_of(refused))["code"] == "too_many_concurrent_requests"
    other = asyncio.ensure_future(client.post("/v1/chat/completions", json=stream, headers=bearer(BOB)))
    await until(lambda: len(engine.requests) == 3)  # another key is not held back by alice's
    second.cancel()  # a client that goes away gives its slot back
    await asyncio.gather(second, return_exceptions=True)
    await until(lambda: client.app[AUTH].busy.get("alice") == 1)
    assert engine.aborted == [engine.requests[1].request_id]  # and its place in the engine
    engine.resume()
    assert (await first.read()).endswith(b"data: [DONE]\n\n")
    assert (await (await other).read()).endswith(b"data: [DONE]\n\n")
    again = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(ALICE))
    assert again.status == 200
    assert client.app[AUTH].busy == {}
    assert [r.status for r in node.records if r.user == "alice"].count(429) == 1


# --- peers ----------------------------------------------------------------------------------------
async def test_cluster_needs_the_peer_credential_and_a_poller_without_it_is_refused(tmp_path, node_with):
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    node, client = await node_with(auth_toml(secret=secret))
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200  # no API keys: open
    refused = await client.get("/cluster")
    assert refused.status == 401 and (await error_of(refused))["code"] == "missing_peer_credential"
    peer = PeerAuth((SECRET.encode(),), "edge-9", 30)
    challenged = await client.get("/cluster", headers=peer.headers("GET", "/cluster"))  # for no node yet
    assert challenged.status == 401
    to = challenge_of(challenged.headers["X-DSNode-Peer-Challenge"])
    assert to == client.app[AUTH].peers.binding
    assert (await client.get("/cluster", headers=peer.headers("GET", "/cluster", to))).status == 200
    stranger = PeerAuth((OTHER_SECRET.encode(),), "laptop", 30)
    refused = await client.get("/cluster", headers=stranger.headers("GET", "/cluster", to))
    assert refused.status == 401 and (await error_of(refused))["code"] == "invalid_peer_credential"

    url = str(client.make_url("")).rstrip("/")
    routing = RoutingSection(upstream=(UpstreamSection(url=url),))
    async with aiohttp.ClientSession() as session:  # the poller as an edge runs it, with and without
        for sign, reachable in ((None, False), (stranger.headers, False), (peer.headers, True)):
            upstreams = Upstreams(routing)
            await Poller(upstreams.balancer, upstreams.changed, session, lambda: routing, sign=sign).poll(url, 5.0)
            state = upstreams.states()[0]
            assert state.reachable is reachable, state
            if not reachable:
                assert "HTTP 401: the peer refused this node's cluster credential" in state.last_error


async def test_a_request_claiming_to_be_forwarded_needs_a_good_credential(tmp_path, node_with):
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    node, client = await node_with(auth_toml(keys_file(tmp_path, f"alice: {ALICE}\n"), secret))
    for claim in ({"X-DSNode-Via": "edge-1"}, {"X-DSNode-User": "alice"}):  # with a good key, even
        response = await client.post("/v1/chat/completions", json=CHAT, headers={**bearer(ALICE), **claim})
        assert response.status == 401 and (await error_of(response))["code"] == "invalid_peer_credential"
    peer = PeerAuth((SECRET.encode(),), "edge-1", 30)
    to = client.app[AUTH].peers.binding
    signed = {"X-DSNode-Via": "edge-1", "X-DSNode-User": "alice", "X-Request-Id": "fwd-1",
              "X-DSNode-Peer": peer.sign("POST", "/v1/chat/completions", "edge-1", "alice", "fwd-1", to=to)}
    response = await client.post("/v1/chat/completions", json=CHAT, headers=signed)  # the peer vouches
    assert response.status == 200
    assert node.records[-1].user == "alice" and node.records[-1].request_id == "fwd-1"
    replayed = await client.post("/v1/chat/completions", json=CHAT, headers=signed)
    assert replayed.status == 401
    client.app[AUTH].reload(node.config, node.config)  # SIGHUP: the files are read again...
    replayed = await client.post("/v1/chat/completions", json=CHAT, headers=signed)
    assert replayed.status == 401  # ...and the nonces seen before are still remembered


async def test_a_signed_forward_carries_the_key_name_not_the_key(tmp_path, node_with):
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    receiver = PeerAuth((SECRET.encode(),), "central-a", 30)
    central = await FakeUpstream("central-a", verifier=receiver).start()  # it challenges, then checks
    try:
        routing = f'[routing]\npoll_interval = 0.1\n\n[[routing.upstream]]\nurl = "{central.url}"\n'
        node, client = await node_with(auth_toml(keys_file(tmp_path, f"alice: {ALICE}\n"), secret),
                                       routing=routing)
        await until(lambda: any(s.healthy for s in node.upstream_states()))
        response = await client.post("/v1/completions", json={"model": REMOTE_MODEL, "prompt": "Hi"},
                                     headers={**bearer(ALICE), "X-Request-Id": "req-7"})
        assert response.status == 200 and response.headers["X-DSNode-Route"] == "forwarded"
        got = central.received[-1]
        assert got.header("Authorization") is None  # the client's key stays on this node
        assert got.header("X-DSNode-User") == "alice"
        assert central.verified[-1] == "node-under-test"  # the credential held, made for central-a
        assert node.records[-1].user == "alice"
        central.script.append("chat")  # a Responses API request goes on as the chat request, signed for that path
        response = await client.post("/v1/responses", json={"model": REMOTE_MODEL, "input": "Hi"},
                                     headers=bearer(ALICE))
        assert response.status == 200 and (await response.json())["object"] == "response"
        got = central.received[-1]
        assert got.head.startswith(b"POST /v1/chat/completions ") and got.header("X-DSNode-User") == "alice"
        assert central.verified[-1] == "node-under-test"
    finally:
        await central.stop()


async def test_the_per_key_cap_holds_on_the_forwarded_path_too(tmp_path, node_with):
    central = await FakeUpstream("central-a", script=["hang"]).start()
    try:
        routing = (f'[routing]\npoll_interval = 0.1\nfirst_token_timeout = 30\n\n'
                   f'[[routing.upstream]]\nurl = "{central.url}"\n')
        node, client = await node_with(auth_toml(keys_file(tmp_path, f"alice: {ALICE}\n"),
                                                 limits="max_concurrent_per_key = 1\n"), routing=routing)
        await until(lambda: any(s.healthy for s in node.upstream_states()))
        ask = {"model": REMOTE_MODEL, "prompt": "Hi"}
        first = asyncio.ensure_future(client.post("/v1/completions", json=ask, headers=bearer(ALICE)))
        await until(lambda: len(central.received) == 1)  # being forwarded: the peer does not answer
        refused = await client.post("/v1/completions", json=ask, headers=bearer(ALICE))
        assert refused.status == 429 and (await error_of(refused))["code"] == "too_many_concurrent_requests"
        assert len(central.received) == 1  # refused here, never forwarded
        first.cancel()  # the client gives up: its slot comes back
        await until(lambda: client.app[AUTH].busy == {})
        assert (await client.post("/v1/completions", json=ask, headers=bearer(ALICE))).status == 200
    finally:
        await central.stop()


async def test_each_key_and_cache_salt_has_a_prompt_cache_of_its_own(tmp_path, node_with, engine):
    """A cached prefix shows (cached_tokens, a shorter TTFT): a request may take only prefixes that its
    own key computed, with the same `cache_salt` (vLLM's parameter); without keys, one scope per salt."""
    node, client = await node_with(auth_toml(keys_file(tmp_path, f"alice: {ALICE}\nbob: {BOB}\n")))
    scopes = []
    for key, salt in ((ALICE, None), (ALICE, "tenant-7"), (BOB, None)):
        body = {**CHAT, **({"cache_salt": salt} if salt else {})}
        response = await client.post("/v1/chat/completions", json=body, headers=bearer(key))
        assert response.status == 200, await response.text()
        scopes.append(engine.requests[-1].cache_scope)
    assert scopes == [json.dumps(["alice", ""]), json.dumps(["alice", "tenant-7"]), json.dumps(["bob", ""])]
    response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "cache_salt": ""},
                                 headers=bearer(ALICE))
    assert response.status == 400 and (await error_of(response))["param"] == "cache_salt"
    _, open_client = await node_with("", name="open.toml")
    assert (await open_client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"})).status == 200
    assert engine.requests[-1].cache_scope == json.dumps(["", ""])
