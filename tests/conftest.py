"""Shared fixtures. The bundled models are built once per machine (cached) and shared by all tests.

A test that asks for a bundled model (`bundled`, `dense_dir`, `moe_dir`, directly or through another
fixture) is marked `model` here, so the fast tier (`-m "not model"`, `make test-fast`) never builds or
loads one; a test that needs torch, transformers or ONNX Runtime without a model says so itself with
`@pytest.mark.model`. A test module that imports one of those heavy packages at its top, where it is
not installed (the fast venv), is not collected, and the run's summary says which modules and why.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.support.models import bundled_models  # noqa: E402

MODEL_FIXTURES = frozenset({"bundled", "dense_dir", "moe_dir"})
HEAVY = ("torch", "transformers", "onnxruntime", "onnx", "onnxscript", "deepspeed", "onnxruntime_genai")
_left_out: dict[str, str] = {}  # test module → the heavy package it imports that is not installed


def _missing_heavy_import(path: Path) -> str | None:
    """The first heavy package `path` imports at its top level that this venv lacks, if any."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        for name in names:
            top = name.split(".")[0]
            if top in HEAVY and importlib.util.find_spec(top) is None:
                return top
    return None


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    missing = _missing_heavy_import(collection_path)
    if missing is None:
        return None
    _left_out[str(collection_path.relative_to(Path(__file__).parent.parent))] = missing
    return True


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _left_out:
        terminalreporter.write_line(f"{len(_left_out)} test modules not collected: they import what this venv "
                                    f"lacks ({', '.join(f'{m}: {p}' for m, p in sorted(_left_out.items()))})")


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


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(megabytes)` → a fresh tmpfs of that size, unmounted afterwards."""
    mounted: list[Path] = []

    def mount(megabytes: float) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        size = f"size={int(megabytes * 1024)}k"
        run = subprocess.run(["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(where)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({run.stderr.strip() or 'not root'})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True)
