"""`dsnode models pull OWNER/NAME` against the fake hub, with HF_ENDPOINT pointed at it: what lands in
the store, what the hub was asked, and what is left when a pull is cut, refused or cannot start."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dsnode.config import load_config
from dsnode.store import ModelStore

from tests.store.conftest import BIG_BYTES, child_env, commit_of, files_under, models

CHUNK = 10 * 2**20  # huggingface_hub writes what arrives in 10 MiB pieces


def node_config(tmp_path: Path, store: Path, ref: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\nrole = "central"\n[model]\nname = "m"\npath = "{ref}"\nbackend = "transformers"\n'
                    f'[store]\nroot = "{store}"\n')
    return path


def test_a_clean_pull_installs_a_verified_version(tmp_path, online, dense_dir):
    store = tmp_path / "models"
    run = models(store, "pull", "acme/tiny", "--quiet")
    assert run.code == 0, run.stderr
    version = commit_of("tiny")[:12]
    assert run.stdout.splitlines()[0] == f"installed tiny@{version} at {store / 'tiny' / version} (current)"

    stored = ModelStore(store).resolve("tiny")
    assert stored.version == version and stored.current
    m = stored.manifest
    assert m.source == {"kind": "huggingface", "id": "acme/tiny", "revision": "main", "commit": commit_of("tiny"),
                        "endpoint": online.url}
    assert (m.format, m.architecture) == ("huggingface", "Qwen2ForCausalLM")
    expected = sorted(p.name for p in dense_dir.iterdir() if p.is_file())
    assert sorted(m.files) == expected  # .gitattributes skipped
    for name in expected:
        data = (dense_dir / name).read_bytes()
        assert (stored.path / name).read_bytes() == data
        assert m.files[name].sha256 == hashlib.sha256(data).hexdigest()
    assert sorted(len(online.downloads(name)) for name in expected) == [1] * len(expected)
    assert files_under(store / ".partial") == []

    config = load_config(node_config(tmp_path, store, "tiny"))
    assert config.model.path == stored.path
    assert config.model_version is not None and config.model_version.version == version


def test_a_second_pull_of_the_same_revision_downloads_nothing(tmp_path, online):
    store = tmp_path / "models"
    assert models(store, "pull", "acme/tiny", "--quiet").code == 0
    online.requests.clear()
    again = models(store, "pull", "acme/tiny", "--revision", "v1", "--quiet")
    assert again.code == 0 and "is already in the store" in again.stderr
    assert [r for r in online.requests if "/resolve/" in r.path] == []


def test_a_dropped_connection_is_resumed_with_a_range_request(tmp_path, online):
    online.faults.drop_after["model.safetensors"] = CHUNK + 5 * 2**20
    store = tmp_path / "models"
    run = models(store, "pull", "acme/big", "--quiet")
    assert run.code == 0, run.stderr
    first, second = online.downloads("model.safetensors")
    assert first.range is None and second.range == f"bytes={CHUNK}-"
    assert second.sent == BIG_BYTES - CHUNK
    stored = ModelStore(store).resolve("big")
    assert (stored.path / "model.safetensors").read_bytes() == online.repos["acme/big"].files["model.safetensors"]


def test_a_pull_interrupted_with_ctrl_c_resumes_where_it_stopped(tmp_path, online):
    """A real `dsnode` process, stopped by SIGINT in the middle of the weights; the same command again
    fetches only the rest, and nothing is in the store in between."""
    online.faults.stall_after["model.safetensors"] = CHUNK + 5 * 2**20
    store = tmp_path / "models"
    command = [sys.executable, "-m", "dsnode.cli", "models", "pull", "acme/big", "--quiet", "--store", str(store),
               "--config", str(tmp_path / "none.toml")]
    child = subprocess.Popen(command, env=child_env(online.url), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    part = store / ".partial" / "big" / commit_of("big")[:12] / "incoming" / "model.safetensors"
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size >= CHUNK) and time.monotonic() < deadline:
        assert child.poll() is None, child.communicate()
        time.sleep(0.05)
    assert part.stat().st_size == CHUNK
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "interrupted; run the same command again to resume" in err
    assert ModelStore(store).names() == []  # nothing a node could load
    assert models(store, "list").stdout.count("interrupted pull:") == 1

    rerun = subprocess.run(command, env=child_env(online.url), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "(2 already here)" in rerun.stderr  # config.json and tokenizer.json were verified before the cut
    last = online.downloads("model.safetensors")[-1]
    assert last.range == f"bytes={CHUNK}-" and last.sent == BIG_BYTES - CHUNK
    stored = ModelStore(store).resolve("big")
    assert stored.manifest.files["model.safetensors"].sha256 == hashlib.sha256(
        online.repos["acme/big"].files["model.safetensors"]).hexdigest()
    assert files_under(store / ".partial") == []


def test_a_file_whose_hash_does_not_match_is_refused(tmp_path, online):
    online.faults.corrupt.add("model.safetensors")
    store = tmp_path / "models"
    run = models(store, "pull", "acme/tiny", "--quiet")
    assert run.code == 1
    (line,) = run.error_lines
    assert line.startswith("dsnode models pull: error: model.safetensors: sha256 ")
    assert f"does not match the {online.repos['acme/tiny'].sibling('model.safetensors')['lfs']['sha256'][:16]}" in line
    assert "nothing was installed" in line
    assert ModelStore(store).names() == []
    assert not any(p.endswith("model.safetensors") for p in files_under(store))  # the bad bytes are gone

    online.faults.corrupt.clear()
    online.requests.clear()
    assert models(store, "pull", "acme/tiny", "--quiet").code == 0
    fetched = [r.path.rsplit("/", 1)[1] for r in online.requests if "/resolve/" in r.path]
    assert fetched == ["model.safetensors"]  # the verified small files were kept


def test_a_small_file_is_checked_against_its_git_blob_id(tmp_path, online):
    online.faults.corrupt.add("tokenizer.json")
    run = models(tmp_path / "models", "pull", "acme/tiny", "--quiet")
    assert run.code == 1 and "tokenizer.json: git blob id" in run.stderr, run.stderr


def test_no_network_names_the_endpoint(tmp_path, online, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    store = tmp_path / "models"
    run = models(store, "pull", "acme/tiny", "--quiet")
    assert run.code == 1
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith(f"dsnode models pull: error: acme/tiny: cannot reach http://127.0.0.1:{port} (HF_ENDPOINT)")
    assert files_under(store) == []


def test_offline_mode_is_named(tmp_path, online, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    run = models(tmp_path / "models", "pull", "acme/tiny")
    assert run.code == 1 and "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set" in run.stderr, run.stderr


def test_bad_sources_are_one_line_each_and_leave_nothing(tmp_path, online):
    store = tmp_path / "models"
    cases = {
        ("acme/nope",): f"acme/nope: no such model repo at {online.url} (HF_ENDPOINT)",
        ("acme/tiny", "--revision", "v9"): f"acme/tiny: no revision 'v9' at {online.url} (HF_ENDPOINT)",
        ("not a repo",): "not a repo: no such folder or archive, and not a hub repo id",
        ("acme/tiny", "--name", "a/b"): "--name 'a/b': letters, digits and . _ - only",
    }
    for args, message in cases.items():
        run = models(store, "pull", *args, "--quiet")
        assert run.code == 1, args
        assert run.stderr.strip().splitlines() == [run.error_lines[0]], run.stderr
        assert message in run.stderr, (args, run.stderr)
    assert files_under(store) == []


def test_an_unsupported_architecture_is_refused_before_the_weights_come(tmp_path, online):
    repo = online.repos["acme/big"]
    repo.files["config.json"] = json.dumps({"architectures": ["BertModel"], "model_type": "bert"}).encode()
    store = tmp_path / "models"
    run = models(store, "pull", "acme/big", "--quiet")
    assert run.code == 1
    assert run.error_lines == ["dsnode models pull: error: acme/big: unsupported architecture BertModel: dsnode "
                               "serves causal language models (…ForCausalLM); nothing was installed"]
    assert online.downloads("model.safetensors") == []
    assert files_under(store) == []


def test_a_repo_without_config_json_is_refused_before_any_download(tmp_path, online):
    del online.repos["acme/big"].files["config.json"]
    store = tmp_path / "models"
    run = models(store, "pull", "acme/big", "--quiet")
    assert run.code == 1
    assert run.error_lines == [f"dsnode models pull: error: acme/big: no config.json at {online.url} (HF_ENDPOINT); "
                               "not a Hugging Face model folder (dsnode serves causal language models)"]
    assert [r for r in online.requests if "/resolve/" in r.path] == []
    assert files_under(store) == []
