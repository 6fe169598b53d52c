"""A real `dsnode serve` on a model from the store (`[model] path = "NAME"`), logging JSON: every line
of its output, stderr included, is one JSON event; no library progress bar in between."""

from __future__ import annotations

import json

import pytest

from tests.store.conftest import models
from tests.support.nodes import ServeProcess, free_port, node_toml, write_config

pytestmark = pytest.mark.slow


def test_serve_resolves_a_store_name_and_logs_only_json(tmp_path, dense_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)  # the node must turn them off itself
    store = tmp_path / "models"
    assert models(store, "pull", str(dense_dir), "--name", "tiny", "--quiet").code == 0
    port = free_port()
    config = write_config(tmp_path / "node.toml", node_toml("n1", "central", port, "tiny", "tiny", "transformers",
                                                             extra=f'[store]\nroot = "{store}"\n'))
    node = ServeProcess("n1", config, port, tmp_path / "n1.log")
    try:
        node.start().wait_ready()
    finally:
        node.stop()
    lines = [line for line in node.log_text().splitlines() if line.strip()]
    assert lines
    not_json = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            not_json.append(line)
    assert not_json == [], "\n".join(not_json[:5])
    assert any(str(store / "tiny") in line for line in lines if '"event": "config"' in line or "model" in line)
