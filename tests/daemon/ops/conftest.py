"""A node over the fast tier's FakeEngine, on a real loopback port, for the ops commands to talk to."""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable

import pytest_asyncio
from dsnode.api.app import create_app
from dsnode.node import Node

from tests.daemon.api.conftest import fake_engines, make_node  # noqa: F401 - a fixture
from tests.support.fake_nodes import stub_model_dir  # noqa: F401 - a session fixture
from tests.support.tokenizer import fast_tokenizer, fast_tokenizer_dir  # noqa: F401 - session fixtures


@pytest_asyncio.fixture
async def node(tmp_path_factory, stub_model_dir, fake_engines) -> AsyncIterator[Node]:  # noqa: F811
    node = await make_node(tmp_path_factory.mktemp("ops-node"), stub_model_dir, fake_engines)
    yield node
    await node.engine.close()


@pytest_asyncio.fixture
async def server(aiohttp_server: Callable[..., Any], node: Node) -> Any:
    """The node's app on a real loopback port (the CLI tools talk HTTP to it)."""
    return await aiohttp_server(create_app(node))
