"""`dsnode models pull modelscope:OWNER/NAME` with modelscope-hub, MODELSCOPE_ENDPOINT pointed at the
fake hub (which serves the same repos the way ModelScope does)."""

from __future__ import annotations

import hashlib
import socket

import pytest
from dsnode.store import ModelStore
from dsnode.store.manifest import FileRecord, content_sha256

from tests.store.conftest import files_under, models


@pytest.fixture
def modelscope(monkeypatch, hub):
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
    monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
    return hub


def test_a_modelscope_pull_is_versioned_by_the_content_hash_it_publishes(tmp_path, modelscope, dense_dir):
    store = tmp_path / "models"
    run = models(store, "pull", "modelscope:acme/tiny", "--quiet")
    assert run.code == 0, run.stderr
    stored = ModelStore(store).resolve("tiny")
    files = {p.name: p.read_bytes() for p in dense_dir.iterdir() if p.is_file()}
    published = {name: FileRecord(len(data), hashlib.sha256(data).hexdigest()) for name, data in files.items()}
    assert stored.version == content_sha256(published)[:12]
    assert stored.manifest.source == {"kind": "modelscope", "id": "acme/tiny", "revision": "master",
                                      "endpoint": modelscope.url}
    assert all((stored.path / name).read_bytes() == data for name, data in files.items())
    assert sorted(modelscope.modelscope_downloads()) == sorted(files)  # .gitattributes skipped
    # the same bytes from a folder are the same version
    again = models(store, "pull", str(dense_dir), "--name", "tiny", "--quiet")
    assert again.code == 0 and "is already in the store" in again.stderr
    assert files_under(store / ".partial") == []


def test_a_modelscope_file_whose_hash_does_not_match_is_refused(tmp_path, modelscope):
    modelscope.faults.corrupt.add("model.safetensors")
    store = tmp_path / "models"
    run = models(store, "pull", "modelscope:acme/tiny", "--quiet")
    assert run.code == 1
    (line,) = run.error_lines
    assert line.startswith("dsnode models pull: error: modelscope:acme/tiny: [E2020] Hash mismatch for "
                           "model.safetensors") and "nothing was installed" in line, line
    assert ModelStore(store).names() == []
    assert not any(p.endswith("model.safetensors") for p in files_under(store))


def test_modelscope_bad_input_is_one_line(tmp_path, modelscope, monkeypatch):
    store = tmp_path / "models"
    for args, message in {("modelscope:acme/nope",): "modelscope:acme/nope: no such repo or revision 'master' at",
                          ("modelscope:acme/tiny", "--revision", "v9"): "no such repo or revision 'v9'",
                          ("modelscope:nope",): "modelscope:nope: not a repo id (owner/name)"}.items():
        run = models(store, "pull", *args, "--quiet")
        assert run.code == 1 and len(run.error_lines) == 1 and message in run.error_lines[0], (args, run.stderr)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{port}")
    run = models(store, "pull", "modelscope:acme/tiny", "--quiet")
    assert run.code == 1
    assert f"modelscope:acme/tiny: cannot reach http://127.0.0.1:{port} (MODELSCOPE_ENDPOINT)" in run.stderr, run.stderr
    assert files_under(store) == []
