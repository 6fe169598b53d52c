"""A real node (transformers engine, bundled dense model) shared by every ops test."""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable

import pytest_asyncio
from dsnode.api.app import create_app
from dsnode.node import Node

from tests.daemon.api.conftest import make_node


@pytest_asyncio.fixture(scope="package")
async def node(tmp_path_factory, dense_dir) -> AsyncIterator[Node]:
    node = await make_node(tmp_path_factory.mktemp("ops-node"), dense_dir)
    yield node
    await node.engine.close()


@pytest_asyncio.fixture
async def server(aiohttp_server: Callable[..., Any], node: Node) -> Any:
    """The node's app on a real loopback port (the CLI tools talk HTTP to it)."""
    return await aiohttp_server(create_app(node))
