"""Shared fixtures. The bundled models are built once per machine (cached) and shared by all tests.

A test that asks for a bundled model (`bundled`, `dense_dir`, `moe_dir`, directly or through another
fixture) is marked `model` here, so the fast tier (`-m "not model"`, `make test-fast`) never builds or
loads one; a test that needs torch, transformers or ONNX Runtime without a model says so itself with
`@pytest.mark.model` and `pytest.importorskip`, so the fast venv (which has none of them) collects it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.support.models import bundled_models  # noqa: E402

MODEL_FIXTURES = frozenset({"bundled", "dense_dir", "moe_dir"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def bundled():
    """The bundled tiny models (dense Qwen2 + DeepSeek-V3 MoE), built on first use."""
    return bundled_models()


@pytest.fixture(scope="session")
def dense_dir(bundled) -> Path:
    return bundled.dense


@pytest.fixture(scope="session")
def moe_dir(bundled) -> Path:
    return bundled.moe
