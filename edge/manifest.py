"""`manifest.json`: what a converted ONNX model folder is, and the proof that its files are intact.

`dsnode convert` writes it last; the edge engine reads it first and refuses a folder whose format
version it does not know or whose files no longer match their checksums. Loaders read this file,
never guess from file names. Imports only the standard library (the edge host has no torch).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "dsnode-onnx"
# 2 added `graph`, `target` and `weights`; a version-1 folder reads as an "export" graph for the CPU.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
GRAPH_GQA = "gqa"  # built by edge/graph_builder.py, served by SlotRunner
GRAPH_EXPORT = "export"  # traced by edge/export.py, served by OnnxRunner
MANIFEST_NAME = "manifest.json"
ONNX_FILE = "model.onnx"
VALIDATION_NAME = "validation.json"
LOGIT_POSITIONS = "last_position"  # the GQA graph input naming the positions with logits (since 2026-12-01)
_CHUNK = 1 << 20


class ManifestError(Exception):
    """The folder is not a usable converted model; the message says why."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class KVLayout:
    """Per layer: key and value cache shapes without batch and time, (heads, dim)."""

    layers: int
    key: tuple[int, int]
    value: tuple[int, int]


@dataclass(frozen=True)
class Manifest:
    architecture: str  # e.g. "Qwen2ForCausalLM"
    model_type: str  # e.g. "qwen2"
    quantization: str  # "int8" | "int4" | "int8-dynamic" | "none"
    opset: int
    onnx_file: str
    context_limit: int  # tokens, prompt + completion (the source's max_position_embeddings)
    kv: KVLayout
    source: dict[str, str]  # {"path": ..., "sha256": folder checksum}
    tokenizer_sha256: str  # sha256 of tokenizer.json (= TextTokenizer.digest)
    files: dict[str, FileEntry]  # every file of the folder but the manifest
    created_by: str
    validation: dict[str, Any] = field(default_factory=dict)  # summary; full report in validation.json
    graph: str = GRAPH_EXPORT
    target: str = "cpu"  # the provider the artifact is built for: "cpu" (float32) | "cuda" (float16)
    # How the weights are stored: {"method": "MatMulNBits", "bits", "block_size", "accuracy_level",
    # "activations", "float_layers": {layer: why it is not quantized}} or {"method": "MatMulInteger"}.
    weights: dict[str, Any] = field(default_factory=dict)
    # The KV cache when it is not the activations' float type: {"dtype": "int8", "scales", "margin"}.
    kv_cache: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        kv = data["kv"]
        return cls(
            architecture=str(data["architecture"]),
            model_type=str(data["model_type"]),
            quantization=str(data["quantization"]),
            opset=int(data["opset"]),
            onnx_file=str(data["onnx_file"]),
            context_limit=int(data["context_limit"]),
            kv=KVLayout(int(kv["layers"]), _pair(kv["key"]), _pair(kv["value"])),
            source={str(k): str(v) for k, v in data["source"].items()},
            tokenizer_sha256=str(data["tokenizer_sha256"]),
            files={str(name): FileEntry(str(e["sha256"]), int(e["bytes"])) for name, e in data["files"].items()},
            created_by=str(data["created_by"]),
            validation=dict(data.get("validation") or {}),
            graph=str(data.get("graph", GRAPH_EXPORT)),
            target=str(data.get("target", "cpu")),
            weights=dict(data.get("weights") or {}),
            kv_cache=dict(data.get("kv_cache") or {}),
            format=str(data["format"]),
            format_version=int(data["format_version"]),
        )


def _pair(value: Any) -> tuple[int, int]:
    a, b = value
    return int(a), int(b)


def read_manifest(folder: Path) -> Manifest:
    """Parse `folder/manifest.json` and check its format version (not the files: see `verify_files`)."""
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{folder}: no {MANIFEST_NAME}; not a converted ONNX model (see dsnode convert)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a dsnode ONNX manifest (format={_get(data, 'format')!r})")
    if data.get("format_version") not in READABLE_VERSIONS:
        raise ManifestError(
            f"{path}: format_version {_get(data, 'format_version')!r} is not supported by this dsnode "
            f"(it reads versions {', '.join(map(str, READABLE_VERSIONS))}); convert the model again with this version"
        )
    try:
        return Manifest.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from None


def _get(data: Any, key: str) -> Any:
    return data.get(key) if isinstance(data, dict) else None


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Raise ManifestError naming the first file that is missing, resized or altered."""
    check_sizes(folder, manifest)
    verify_checksums(folder, manifest, manifest.files)


def check_sizes(folder: Path, manifest: Manifest) -> None:
    """Every listed file is there with its size (a stat each: a truncated copy is caught before
    anything reads it)."""
    folder = Path(folder)
    if manifest.onnx_file not in manifest.files:
        raise ManifestError(f"{folder}: the manifest lists no checksum for {manifest.onnx_file}")
    for name, entry in sorted(manifest.files.items()):
        path = folder / name
        if not path.is_file():
            raise ManifestError(f"{path}: listed in {MANIFEST_NAME} but missing")
        size = path.stat().st_size
        if size != entry.bytes:
            raise ManifestError(f"{path}: {size} bytes, the manifest says {entry.bytes}; the file was changed")


def verify_checksums(folder: Path, manifest: Manifest, names: Iterable[str]) -> None:
    """The named files' checksums against the manifest's; ManifestError names the first that differs."""
    for name in sorted(names):
        path = Path(folder) / name
        if sha256_file(path) != manifest.files[name].sha256:
            raise ManifestError(f"{path}: checksum does not match {MANIFEST_NAME}; the file was changed")


def weight_files(manifest: Manifest, least_bytes: int) -> set[str]:
    """The external-data files of at least `least_bytes`: raw tensor bytes at offsets the graph names,
    which onnxruntime reads but does not parse (the graph file itself is parsed, so it is never here)."""
    return {name for name, entry in manifest.files.items()
            if name != manifest.onnx_file and entry.bytes >= least_bytes}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: Sequence[Path]) -> list[str]:
    """sha256_file of each path, several files at a time (hashlib releases the GIL: a 7B checkpoint's
    four shards hash side by side on a host with the cores)."""
    from .weight_pipeline import auto_threads

    if len(paths) < 2:
        return [sha256_file(path) for path in paths]
    with ThreadPoolExecutor(min(len(paths), auto_threads()), thread_name_prefix="dsnode-sha256") as pool:
        return list(pool.map(sha256_file, paths))


def file_entries(folder: Path, names: Iterable[str]) -> dict[str, FileEntry]:
    folder, names = Path(folder), sorted(names)
    digests = sha256_files([folder / name for name in names])
    return {name: FileEntry(digest, (folder / name).stat().st_size) for name, digest in zip(names, digests)}


def folder_checksum(folder: Path) -> str:
    """One sha256 over every regular file of `folder` (relative path and content), order-independent."""
    folder = Path(folder)
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path, file_digest in zip(paths, sha256_files(paths)):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_digest}\n".encode())
    return digest.hexdigest()
