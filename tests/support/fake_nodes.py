"""A node for the fast tier: a real config, app and `Node` whose engine is a `FakeEngine`.

The config check wants `[model] path` to be a model folder of its backend's kind (a `config.json` for
transformers); `stub_model_dir` is such a folder with nothing else in it, since the fake engine reads
no weights. `fake_engine_for(config, tokenizer)` is what `build_engine(config)` would give a node with
this config, with the scripted runner in place of the model: the config's model name and `[batching]`,
and the bundled dense model's context (512), so limits and errors read as they do on the real model.

Use the fixture from a conftest: `from tests.support.fake_nodes import stub_model_dir  # noqa: F401`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from dsnode.config import Config
from dsnode.inference.tokenizer import TextTokenizer

from tests.support.engines import FakeEngine

MAX_CONTEXT = 512  # the bundled dense model's


def write_stub_model_folder(folder: Path) -> Path:
    """A folder `load_config` accepts as a Hugging Face model folder (backend transformers)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["FakeForCausalLM"]}) + "\n")
    return folder


def fake_engine_for(config: Config, tokenizer: TextTokenizer, **options: Any) -> FakeEngine:
    """The engine `build_engine(config)` would build, with a scripted runner (not loaded yet)."""
    options.setdefault("max_context", MAX_CONTEXT)
    return FakeEngine(tokenizer, batching=config.batching, name=config.model.name, **options)


@pytest.fixture(scope="session")
def stub_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_stub_model_folder(tmp_path_factory.mktemp("stub-model"))
