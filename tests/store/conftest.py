"""The fake hub, repos made of the bundled tiny model (or of random bytes, where only the size matters),
and `dsnode models …` run in this process with the environment an operator's shell would have."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.store.fakehub import FakeHub, Repo

BIG_BYTES = 24 * 2**20  # more than huggingface_hub's 10 MiB write chunk, so a cut file keeps a prefix


@dataclass(frozen=True)
class CliRun:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if "error:" in line]


def commit_of(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def repo_from_folder(folder: Path, commit_seed: str) -> Repo:
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return Repo({**files, ".gitattributes": b"*.safetensors filter=lfs\n"}, commit_of(commit_seed), ("main", "v1"))


@pytest.fixture(scope="session")
def fake_hub():
    hub = FakeHub().start()
    yield hub
    hub.stop()


@pytest.fixture
def hub(fake_hub, dense_dir):
    """The hub with `acme/tiny` (the bundled dense model) and `acme/big` (its config and tokenizer,
    24 MiB of random weights); faults and the request log reset for each test."""
    fake_hub.repos.clear()
    fake_hub.requests.clear()
    fake_hub.faults.corrupt.clear()
    fake_hub.faults.drop_after.clear()
    fake_hub.faults.stall_after.clear()
    fake_hub.repos["acme/tiny"] = repo_from_folder(dense_dir, "tiny")
    big = {name: (dense_dir / name).read_bytes() for name in ("config.json", "tokenizer.json")}
    big["model.safetensors"] = random.Random(7).randbytes(BIG_BYTES)
    fake_hub.repos["acme/big"] = Repo(big, commit_of("big"))
    return fake_hub


@pytest.fixture
def online(monkeypatch, hub):
    """An operator's shell: HF_ENDPOINT names the hub, no offline switch (the test session sets one)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return hub


def dsnode(*args: str) -> CliRun:
    from dsnode.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return CliRun(code, out.getvalue(), err.getvalue())


def models(store: Path, *args: str) -> CliRun:
    """`dsnode models ARGS --store STORE`, with no node config of this host in the way."""
    return dsnode("models", *args, "--store", str(store), "--config", str(store.parent / "no-such-node.toml"))


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def child_env(hub_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    return {**env, "HF_ENDPOINT": hub_url}
