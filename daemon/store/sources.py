"""What `dsnode models pull SOURCE` was given: a hub repo id, `modelscope:` + id, or a local folder or
archive. An existing path always means the local thing (write `./owner/name` for a folder that looks
like a repo id, and it is one anyway)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .layout import StoreError

REPO_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".zip")
MODELSCOPE_PREFIX = "modelscope:"
HUGGINGFACE_PREFIXES = ("hf:", "huggingface:")


@dataclass(frozen=True)
class Source:
    kind: str  # "huggingface" | "modelscope" | "folder" | "archive"
    location: str  # repo id, or an absolute path

    @property
    def default_name(self) -> str:
        """The store name when --name is not given: the repo's or folder's last part, lower case."""
        last = self.location.rstrip("/").rsplit("/", 1)[-1]
        for suffix in ARCHIVE_SUFFIXES:
            if self.kind == "archive" and last.lower().endswith(suffix):
                last = last[: -len(suffix)]
        return re.sub(r"[^a-z0-9._-]+", "-", last.lower()).strip("-._") or "model"


def parse_source(text: str, cwd: Path) -> Source:
    if text.startswith(MODELSCOPE_PREFIX):
        return _repo("modelscope", text[len(MODELSCOPE_PREFIX):], text)
    for prefix in HUGGINGFACE_PREFIXES:
        if text.startswith(prefix):
            return _repo("huggingface", text[len(prefix):], text)
    path = (cwd / text).expanduser()
    if path.is_dir():
        return Source("folder", str(path.resolve()))
    if path.is_file():
        if not text.lower().endswith(ARCHIVE_SUFFIXES):
            raise StoreError(f"{path}: not a model folder or an archive ({', '.join(ARCHIVE_SUFFIXES)})")
        return Source("archive", str(path.resolve()))
    if REPO_ID_RE.fullmatch(text):
        return Source("huggingface", text)
    raise StoreError(f"{text}: no such folder or archive, and not a hub repo id (owner/name, "
                     f"or modelscope:owner/name)")


def _repo(kind: str, repo_id: str, text: str) -> Source:
    if not REPO_ID_RE.fullmatch(repo_id):
        raise StoreError(f"{text}: not a repo id (owner/name)")
    return Source(kind, repo_id)
