"""`dsnode-version.json`: what one version folder of the store holds and where it came from.

Written last, into the staging folder, before the folder is renamed into place; read by `dsnode models
list`, by config resolution (`[model] path = "NAME@VERSION"`) and by whoever needs a node's model
version (A/B splits, `X-DSNode-Version`). Standard library only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

VERSION_MANIFEST = "dsnode-version.json"
FORMAT_VERSION = 1
_CHUNK = 1 << 20


class ManifestError(Exception):
    """A version folder without a readable manifest; the message names the file and why."""


@dataclass(frozen=True)
class FileRecord:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class VersionManifest:
    name: str
    version: str  # the folder name: a revision's commit (12 hex) or the content hash's first 12 hex
    source: dict[str, str]  # kind (huggingface | modelscope | local | convert), id or path, revision, commit…
    content_sha256: str  # over every file's path and sha256: the same bytes give the same hash, whatever the source
    files: dict[str, FileRecord]  # relative path → size and sha256 (the manifest itself excluded)
    format: str  # "huggingface" (a checkpoint folder) or "dsnode-onnx" (a `dsnode convert` output)
    quantization: str  # "none", "int8", "fp8", … as the folder's own config says
    architecture: str  # e.g. "Qwen2ForCausalLM"
    created_at: str  # ISO 8601, UTC
    created_by: str  # "dsnode 0.1.0"
    label: str | None = None  # an operator's name for the version ("2026-12"); NAME@LABEL resolves too
    format_version: int = field(default=FORMAT_VERSION)

    @property
    def size_bytes(self) -> int:
        return sum(record.bytes for record in self.files.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VersionManifest:
        files = {str(path): FileRecord(int(r["bytes"]), str(r["sha256"])) for path, r in data["files"].items()}
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            source={str(k): str(v) for k, v in data["source"].items()},
            content_sha256=str(data["content_sha256"]),
            files=files,
            format=str(data["format"]),
            quantization=str(data["quantization"]),
            architecture=str(data["architecture"]),
            created_at=str(data["created_at"]),
            created_by=str(data["created_by"]),
            label=None if data.get("label") is None else str(data["label"]),
            format_version=int(data["format_version"]),
        )


def read_manifest(folder: Path) -> VersionManifest:
    path = Path(folder) / VERSION_MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{folder}: no {VERSION_MANIFEST}; not a version of the model store") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable: {exc}") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        got = data.get("format_version") if isinstance(data, dict) else None
        raise ManifestError(f"{path}: format_version {got!r} is not one this dsnode reads ({FORMAT_VERSION})")
    try:
        return VersionManifest.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{path}: malformed ({type(exc).__name__}: {exc})") from None


def content_sha256(files: dict[str, FileRecord]) -> str:
    """One hash for a set of files, independent of where they came from or their order."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path}\0{files[path].sha256}\n".encode())
    return digest.hexdigest()


class FileHasher:
    """sha256 (what LFS and ModelScope publish) and git's blob sha1 (what the hub publishes for small
    files) in one pass over the bytes."""

    def __init__(self, size: int) -> None:
        self.sha256 = hashlib.sha256()
        self.git_sha1 = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        self.git_sha1.update(chunk)


def hash_file(path: Path) -> FileHasher:
    hasher = FileHasher(path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher


def describe_folder(folder: Path) -> tuple[str, str, str]:
    """(format, quantization, architecture) of a model folder, from its own config files."""
    config = _json(folder / "config.json")
    architectures = config.get("architectures") or ["?"]
    architecture = str(architectures[0])
    onnx = _json(folder / "manifest.json")
    if onnx.get("format") == "dsnode-onnx":
        return "dsnode-onnx", str(onnx.get("quantization", "?")), str(onnx.get("architecture", architecture))
    quantization = config.get("quantization_config") or {}
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    dtype = config.get("torch_dtype") or config.get("dtype")
    return "huggingface", str(method or (f"none ({dtype})" if dtype else "none")), architecture


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
