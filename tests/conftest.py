"""Shared fixtures. The bundled models are built once per machine (cached) and shared by all tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.support.models import bundled_models  # noqa: E402


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
