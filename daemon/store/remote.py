"""What a hub publishes about one revision of a repo, in the form the pull verifies against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

# Files a node never needs: git plumbing, other frameworks' copies of the weights, originals.
SKIPPED = (".gitattributes", "*.gguf", "*.h5", "*.msgpack", "*.ot", "original/*", "flax_model*", "tf_model*")
# Weights in pickle form are skipped when the repo has safetensors too (the same weights, twice).
PICKLED_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "consolidated*")


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the repo root, "/"-separated
    size: int
    sha256: str | None  # what the hub publishes for LFS files (and ModelScope for every file)
    git_sha1: str | None = None  # the git blob id: what the hub publishes for small, non-LFS files


# fetch(file, part, tqdm class): make `part` hold the whole file, resuming from what it already holds
Fetch = Callable[[RemoteFile, Path, Any], None]


@dataclass(frozen=True)
class Listing:
    version: str  # the store version this revision becomes
    source: dict[str, str]  # for the manifest: kind, id, revision, commit, endpoint
    files: tuple[RemoteFile, ...]
    skipped: tuple[str, ...]
    fetch: Fetch
    # where the bytes come from, for messages: "https://huggingface.co (HF_ENDPOINT)"
    where: str


def select_files(files: list[RemoteFile]) -> tuple[list[RemoteFile], list[str]]:
    """(files to pull in pull order, names skipped): config.json first, so the architecture is known
    before any weights arrive; then small files; the big ones last."""
    has_safetensors = any(f.path.endswith(".safetensors") for f in files)
    keep: list[RemoteFile] = []
    skipped: list[str] = []
    for f in files:
        if _matches(f.path, SKIPPED) or (has_safetensors and _matches(f.path, PICKLED_WEIGHTS)):
            skipped.append(f.path)
        else:
            keep.append(f)
    keep.sort(key=lambda f: (f.path != "config.json", f.size, f.path))
    return keep, skipped


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    name = Path(path).name
    return any(fnmatch(path, p) or fnmatch(name, p) for p in patterns)
