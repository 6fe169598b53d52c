"""A real node (transformers engine on the bundled dense model) behind the aiohttp test client."""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import pytest_asyncio
from dsnode.api.app import create_app
from dsnode.config import load_config
from dsnode.inference.backends import build_engine
from dsnode.node import Node
from dsnode.probe import probe_host

MODEL = "tiny-dense"


def config_text(model_dir: Path, extra: str = "", batching: str = "") -> str:
    return f"""[node]
name = "node-under-test"
role = "central"
listen = "127.0.0.1:0"

[model]
name = "{MODEL}"
path = "{model_dir}"
backend = "transformers"
threads = 1

[batching]
max_batch_tokens = 4096
{batching}
{extra}
"""


async def make_node(tmp_path: Path, model_dir: Path, **kwargs: Any) -> Node:
    path = tmp_path / "dsnode.toml"
    path.write_text(config_text(model_dir, **kwargs))
    config = load_config(path)
    engine = build_engine(config)
    await engine.load()
    return Node(config, engine, probe_host())


@pytest_asyncio.fixture(scope="module")
async def node(tmp_path_factory, dense_dir) -> AsyncIterator[Node]:
    node = await make_node(tmp_path_factory.mktemp("node"), dense_dir)
    yield node
    await node.engine.close()


@pytest_asyncio.fixture
async def client(aiohttp_client: Callable[..., Any], node: Node) -> Any:
    return await aiohttp_client(create_app(node))


@pytest.fixture(scope="module")
def reference(dense_dir):
    """Greedy continuations straight from transformers, to compare the server's answers with."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(dense_dir)).eval()

    def greedy(ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(ids):].tolist()

    return greedy
