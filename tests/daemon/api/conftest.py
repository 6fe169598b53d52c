"""A node behind the aiohttp test client. `node` and `client` are the fast tier's: the real app over a
`FakeEngine` (the real `BatchingEngine` on a scripted runner) with the bundled tokenizer, answering
`DEFAULT_REPLY` unless a test scripts another answer. `test_completions.py` swaps in the real
transformers engine on the bundled dense model, and `reference`, its greedy tokens straight from
transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import pytest_asyncio
from dsnode.api.app import create_app
from dsnode.config import Config, load_config
from dsnode.inference.backends import build_engine
from dsnode.inference.engine import Engine
from dsnode.node import Node
from dsnode.probe import probe_host

from tests.support.engines import FakeEngine
from tests.support.fake_nodes import fake_engine_for, stub_model_dir  # noqa: F401 - a session fixture
from tests.support.tokenizer import fast_tokenizer, fast_tokenizer_dir  # noqa: F401 - session fixtures

MODEL = "tiny-dense"

EngineBuilder = Callable[[Config], Engine]


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


async def make_node(tmp_path: Path, model_dir: Path, build: EngineBuilder = build_engine,
                    **kwargs: Any) -> Node:
    """A node with the test config and the engine `build` makes of it, loaded (the real backend's by
    default; `fake_engines` for the fast tier's)."""
    path = tmp_path / "dsnode.toml"
    path.write_text(config_text(model_dir, **kwargs))
    config = load_config(path)
    engine = build(config)
    await engine.load()
    return Node(config, engine, probe_host())


@pytest.fixture
def fake_engines(fast_tokenizer) -> EngineBuilder:  # noqa: F811 - the session fixture imported above
    """`build` for `make_node`: a FakeEngine for the config, as build_engine would make the real one."""
    return lambda config: fake_engine_for(config, fast_tokenizer)


@pytest_asyncio.fixture
async def node(tmp_path, stub_model_dir, fake_engines) -> AsyncIterator[Node]:  # noqa: F811
    node = await make_node(tmp_path, stub_model_dir, fake_engines)
    yield node
    await node.engine.close()


@pytest.fixture
def engine(node: Node) -> FakeEngine:
    """The node's FakeEngine, to script its answers, hold it, or fail its steps."""
    assert isinstance(node.engine, FakeEngine)
    return node.engine


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
