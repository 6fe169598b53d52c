"""A pull onto a disk that is, or becomes, full (a real tmpfs: root only, skipped elsewhere), and
`--convert int8 [--target ...]` through the real converter."""

from __future__ import annotations

import pytest
from dsnode.config import load_config
from dsnode.ops import models_convert
from dsnode.store import ModelStore
from dsnode.store import pull as pull_module

from tests.store.conftest import commit_of, files_under, models


def test_a_disk_too_small_is_refused_before_anything_is_fetched(small_disk, online):
    disk = small_disk(8)
    run = models(disk / "models", "pull", "acme/big", "--quiet")
    assert run.code == 1
    assert run.error_lines[0].startswith(f"dsnode models pull: error: {disk / 'models'}: not enough free space: "
                                         "24.0 MiB to pull, 8.0 MiB free")
    assert online.downloads("model.safetensors") == []
    assert files_under(disk) == []


def test_a_disk_that_fills_up_during_a_hub_pull_keeps_nothing(small_disk, online, monkeypatch):
    disk = small_disk(16)
    monkeypatch.setattr(pull_module, "check_free_space", lambda root, needed: root.mkdir(parents=True, exist_ok=True))
    run = models(disk / "models", "pull", "acme/big", "--quiet")
    assert run.code == 1
    assert run.error_lines == [f"dsnode models pull: error: {disk / 'models'}: the disk filled up while pulling; "
                               "the partial download was removed and nothing was installed"]
    assert files_under(disk) == []
    assert ModelStore(disk / "models").names() == []


def test_a_disk_that_fills_up_during_a_local_pull_keeps_nothing(small_disk, tmp_path, monkeypatch, dense_dir):
    disk = small_disk(2)
    monkeypatch.setattr(pull_module, "check_free_space", lambda root, needed: root.mkdir(parents=True, exist_ok=True))
    from dsnode.store import local

    monkeypatch.setattr(local, "check_free_space", pull_module.check_free_space)
    run = models(disk / "models", "pull", str(dense_dir), "--quiet")
    assert run.code == 1 and "the disk filled up while pulling" in run.stderr, run.stderr
    assert files_under(disk) == []


@pytest.mark.slow
def test_pull_with_convert_int8_installs_both_versions(tmp_path, online, monkeypatch):
    monkeypatch.setattr(models_convert, "NVIDIA_GPUS", tmp_path / "no-gpus")  # auto → cpu on any test host
    store = tmp_path / "models"
    run = models(store, "pull", "acme/tiny", "--convert", "int8")
    assert run.code == 0, run.stderr
    assert "--target auto: cpu" in run.stderr
    version = commit_of("tiny")[:12]
    converted = ModelStore(store).resolve("tiny-int8")
    assert converted.version == version
    assert (converted.manifest.format, converted.manifest.quantization) == ("dsnode-onnx", "int8")
    assert converted.manifest.source["from"] == f"tiny@{version}"
    assert ModelStore(store).resolve("tiny").manifest.format == "huggingface"  # the checkpoint stays
    node = tmp_path / "edge.toml"
    node.write_text(f'[node]\nrole = "edge"\n[model]\nname = "m"\npath = "tiny-int8"\nbackend = "onnx"\n'
                    f'[store]\nroot = "{store}"\n')
    assert load_config(node).model.path == converted.path
    assert files_under(store / ".partial") == []


@pytest.mark.slow
def test_pull_with_convert_for_cuda_installs_a_cuda_version_of_its_own(tmp_path, online):
    store = tmp_path / "models"
    run = models(store, "pull", "acme/tiny", "--convert", "int8", "--target", "cuda", "--quiet")
    assert run.code == 0, run.stderr
    assert 'serve it with [model] path = "tiny-int8-cuda"' in run.stdout
    converted = ModelStore(store).resolve("tiny-int8-cuda")
    assert converted.manifest.source["target"] == "cuda"
    from dsnode.edge.manifest import read_manifest

    assert read_manifest(converted.path).target == "cuda"
    assert ModelStore(store).names() == ["tiny", "tiny-int8-cuda"]


def test_a_target_without_convert_is_refused_before_anything_is_fetched(tmp_path, online):
    run = models(tmp_path / "models", "pull", "acme/tiny", "--target", "cuda", "--quiet")
    assert run.code == 1
    assert "--target cuda applies to --convert" in run.stderr
    assert online.downloads("model.safetensors") == []


@pytest.mark.parametrize(("providers", "gpus", "target", "why"), [
    (["CUDAExecutionProvider", "CPUExecutionProvider"], ["0000:00:1e.0"], "cuda", "CUDA provider and an NVIDIA GPU"),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], [], "cpu", "no NVIDIA GPU"),
    (["CPUExecutionProvider"], ["0000:00:1e.0"], "cpu", "without its CUDA provider"),
])
def test_auto_converts_for_what_this_host_serves_with(tmp_path, monkeypatch, providers, gpus, target, why):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: providers)
    gpu_dir = tmp_path / "gpus"
    gpu_dir.mkdir()
    for gpu in gpus:
        (gpu_dir / gpu).mkdir()
    monkeypatch.setattr(models_convert, "NVIDIA_GPUS", gpu_dir)
    said: list[str] = []
    assert models_convert.convert_target("auto", said.append) == target
    assert said and why in said[0]
    assert models_convert.convert_target("cpu", said.append) == "cpu"  # asked for: no detection
