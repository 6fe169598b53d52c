"""A real node whose upstreams are scripted fakes on real sockets. Its own engine is the fast tier's
FakeEngine (the real BatchingEngine on a scripted runner): these tests forward, they never ask it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest_asyncio
from dsnode.api.app import create_app
from dsnode.config import load_config
from dsnode.node import Node
from dsnode.probe import probe_host

from tests.support.engines import FakeEngine
from tests.support.fake_nodes import fake_engine_for, stub_model_dir  # noqa: F401 - a session fixture
from tests.support.tokenizer import fast_tokenizer, fast_tokenizer_dir  # noqa: F401 - session fixtures

from .fakes import FakeUpstream

LOCAL_MODEL = "tiny-dense"
# The poller polls every upstream once at start (`edge` waits for that) and not again during a test:
# what a test's requests find out (a refused connection, a timeout) is then never overwritten by a
# poll that happened to run in between, nor is a peer's down-ness noticed by the poller first.
POLL_INTERVAL_S = 3600


def node_config(tmp: Path, model_dir: Path, upstreams: list[tuple[str, int]], routing: str = "") -> Path:
    entries = "".join(f'\n[[routing.upstream]]\nurl = "{url}"\nweight = {w}\n' for url, w in upstreams)
    path = tmp / "edge.toml"
    path.write_text(f"""[node]
name = "edge-under-test"
role = "edge"
listen = "127.0.0.1:0"

[model]
name = "{LOCAL_MODEL}"
path = "{model_dir}"
backend = "transformers"
threads = 1

[routing]
long_prompt_tokens = 16
poll_interval = {POLL_INTERVAL_S}
poll_timeout = 2.0
connect_timeout = 1.0
first_token_timeout = 5.0
{routing}
{entries}
""")
    return path


@pytest_asyncio.fixture
async def engine(tmp_path_factory, stub_model_dir, fast_tokenizer) -> AsyncIterator[FakeEngine]:  # noqa: F811
    """The node's local model, which these tests never ask for."""
    config = load_config(node_config(tmp_path_factory.mktemp("engine"), stub_model_dir, []))
    engine = fake_engine_for(config, fast_tokenizer)
    await engine.load()
    yield engine
    await engine.close()
    assert engine.requests == [], "a request meant for the upstreams was served locally"


@pytest_asyncio.fixture
async def fakes() -> AsyncIterator[Callable[..., Awaitable[FakeUpstream]]]:
    started: list[FakeUpstream] = []

    async def make(name: str, **kwargs: Any) -> FakeUpstream:
        fake = await FakeUpstream(name, **kwargs).start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        await fake.stop()


@pytest_asyncio.fixture
async def edge(tmp_path, stub_model_dir, engine,  # noqa: F811 - the session fixture imported above
               aiohttp_client) -> Callable[..., Awaitable[tuple[Node, Any]]]:
    """`await edge([(url, weight), ...], routing="...")` → (node, test client), once every upstream
    that should be healthy has been polled."""

    async def make(upstreams: list[tuple[str, int]], routing: str = "", wait_healthy: int | None = None):
        config = load_config(node_config(tmp_path, stub_model_dir, upstreams, routing))
        node = Node(config, engine, probe_host())
        client = await aiohttp_client(create_app(node))
        want = len(upstreams) if wait_healthy is None else wait_healthy
        for _ in range(200):
            if sum(s.reachable is not None for s in node.upstream_states()) == len(upstreams) and \
                    sum(s.healthy for s in node.upstream_states()) >= want:
                break
            await asyncio.sleep(0.02)
        return node, client

    return make


@pytest_asyncio.fixture
async def local_node(tmp_path, stub_model_dir, fast_tokenizer, aiohttp_client):  # noqa: F811
    """`await local_node(extra_model="", routing="", upstreams=[])` → (node, client, engine)."""
    engines = []

    async def make(extra_model: str = "", routing: str = "", upstreams=(), debug: str = ""):
        path = node_config(tmp_path, stub_model_dir, list(upstreams), routing)
        text = path.read_text().replace('threads = 1\n', f'threads = 1\n{extra_model}\n', 1)
        path.write_text(text + (f"\n[debug]\n{debug}\n" if debug else ""))
        config = load_config(path)
        engine = fake_engine_for(config, fast_tokenizer)
        await engine.load()
        engines.append(engine)
        node = Node(config, engine, probe_host())
        client = await aiohttp_client(create_app(node))
        for _ in range(200):
            if all(s.healthy for s in node.upstream_states()):
                break
            await asyncio.sleep(0.02)
        return node, client, engine

    yield make
    for engine in engines:
        await engine.close()
