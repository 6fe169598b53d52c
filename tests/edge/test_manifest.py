"""The manifest check: a converted folder that was altered, or written by another format version, is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from dsnode.edge.manifest import ManifestError, read_manifest, verify_files

from tests.edge.conftest import onnx_engine


@pytest.fixture
def copy(int8_dir, tmp_path) -> Path:
    return Path(shutil.copytree(int8_dir, tmp_path / "model"))


def refusal(folder: Path) -> str:
    with pytest.raises(ManifestError) as error:
        verify_files(folder, read_manifest(folder))
    return str(error.value)


def test_an_intact_copy_verifies(copy):
    verify_files(copy, read_manifest(copy))


def test_a_changed_byte_is_refused(copy):
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    assert refusal(copy) == f"{copy / 'model.onnx'}: checksum does not match manifest.json; the file was changed"


def test_a_resized_or_missing_file_is_refused(copy):
    with open(copy / "tokenizer_config.json", "a") as f:
        f.write(" ")
    assert "bytes, the manifest says" in refusal(copy)
    (copy / "tokenizer_config.json").unlink()
    assert refusal(copy) == f"{copy / 'tokenizer_config.json'}: listed in manifest.json but missing"


def test_an_unknown_format_version_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ManifestError, match="format_version 99 is not supported .* convert the model again"):
        read_manifest(copy)


def test_no_or_broken_manifest_is_refused(copy):
    (copy / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="unreadable"):
        read_manifest(copy)
    (copy / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ManifestError, match="not a dsnode ONNX manifest"):
        read_manifest(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no manifest.json; not a converted ONNX model"):
        read_manifest(copy)


async def test_the_engine_refuses_a_tampered_model_and_says_why(copy):
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-10] ^= 0x01
    (copy / "model.onnx").write_bytes(bytes(data))
    engine = onnx_engine(copy)
    with pytest.raises(ManifestError):
        await engine.load()
    health = engine.health()
    assert not health.ready and "model.onnx: checksum does not match" in health.reason


async def test_weights_hashed_while_the_session_opens_still_refuse_a_changed_byte(copy, monkeypatch):
    """The weight file's checksum is checked beside the session's opening (a 7B's 8 GB): a changed
    byte there still fails the load naming the file, and an intact copy loads."""
    from dsnode.edge import onnx_engine as module

    monkeypatch.setattr(module, "HASHED_ALONGSIDE_BYTES", 1)  # the bundled model's 1 MB weights go alongside
    data = bytearray((copy / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0x01  # a weight, not a structure onnxruntime parses: the session opens
    (copy / "model.onnx.data").write_bytes(bytes(data))
    engine = onnx_engine(copy)
    with pytest.raises(ManifestError):
        await engine.load()
    assert "model.onnx.data: checksum does not match" in engine.health().reason
    data[len(data) // 2] ^= 0x01
    (copy / "model.onnx.data").write_bytes(bytes(data))
    engine = onnx_engine(copy)
    await engine.load()
    try:
        assert engine.health().ready
    finally:
        await engine.close()
