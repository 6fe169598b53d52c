"""`dsnode models pull | list | rm | use`: what each command does, given what the command line read
(flags and environment: `dsnode.cli` reads them, nothing here does)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..store.layout import DEFAULT_ROOT, ModelStore, StoredVersion, StoreError
from ..store.progress import human_bytes
from ..store.pull import PullOptions, pull_remote
from ..store.refs import parse_ref
from ..store.sources import parse_source


@dataclass(frozen=True)
class Hubs:
    """Where the hub clients go, and as whom (HF_ENDPOINT / HF_TOKEN, MODELSCOPE_ENDPOINT / _API_TOKEN)."""

    hf_endpoint: str
    hf_token: str | None = None
    modelscope_endpoint: str | None = None
    modelscope_token: str | None = None


@dataclass(frozen=True)
class NodeConfig:
    """This host's node config, as far as the store cares: its [store] root and the model it serves."""

    path: Path
    store_root: Path | None = None
    model_path: Path | None = None
    problem: str | None = None  # why it could not be read, if it could not

    @classmethod
    def read(cls, path: Path) -> NodeConfig:
        from dsnode.config import ConfigError, load_config

        if not path.is_file():
            return cls(path, problem="no such file")
        try:
            config = load_config(path, check_paths=False)
        except ConfigError as exc:
            return cls(path, problem=str(exc.problems[0]))
        return cls(path, config.store.root, config.model.path)


def store_for(flag: Path | None, node: NodeConfig) -> ModelStore:
    """--store, else the node config's [store] root, else /var/lib/dsnode/models."""
    return ModelStore(flag or node.store_root or DEFAULT_ROOT)


@dataclass(frozen=True)
class PullArgs:
    source: str
    name: str | None
    revision: str | None
    label: str | None
    convert: str | None
    keep_current: bool
    quiet: bool
    target: str | None = None  # --convert's target: auto (None) | cpu | cuda


def pull(store: ModelStore, args: PullArgs, hubs: Hubs, cwd: Path) -> int:
    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        stored = _pull(store, args, hubs, cwd, say)
    except StoreError as exc:
        return _error("pull", exc)
    except OSError as exc:  # the store itself: not writable (not root, not its owner), not a folder
        return _error("pull", StoreError(_os_problem(exc, store)))
    except KeyboardInterrupt:
        print("dsnode models pull: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"installed {stored.ref} at {stored.path}" + (" (current)" if stored.current else ""))
    print(f'serve it with [model] path = "{stored.name if stored.current else stored.ref}"')
    return 0


def _pull(store: ModelStore, args: PullArgs, hubs: Hubs, cwd: Path, say: Any) -> StoredVersion:
    from .models_convert import check_converter_installed, convert_into_store, convert_target

    source = parse_source(args.source, cwd)
    name = args.name or source.default_name
    if parse_ref(name) is None or "@" in name:
        raise StoreError(f"--name {name!r}: letters, digits and . _ - only (at most 128)")
    if args.target and not args.convert:
        raise StoreError(f"--target {args.target} applies to --convert (the checkpoint itself is pulled as it is)")
    if args.convert:
        check_converter_installed()
        target = convert_target(args.target or "auto", say)
    options = PullOptions(name, args.label, not args.keep_current, not args.quiet)
    if source.kind in ("folder", "archive"):
        from ..store.local import pull_local

        if args.revision:
            raise StoreError(f"--revision applies to hub sources, not to {source.location}")
        stored = pull_local(store, source, options, say)
    else:
        stored = pull_remote(store, _listing(source.kind, source.location, args.revision, hubs), options, say)
    if args.convert:
        say(f"pulled {stored.ref}")
        stored = convert_into_store(store, stored, args.convert, target, options, say)
    return stored


def _listing(kind: str, repo_id: str, revision: str | None, hubs: Hubs) -> Any:
    if kind == "modelscope":
        from ..store.modelscope import modelscope_listing

        return modelscope_listing(repo_id, revision, hubs.modelscope_endpoint, hubs.modelscope_token)
    from ..store.huggingface import hf_listing

    return hf_listing(repo_id, revision, hubs.hf_endpoint.rstrip("/"), hubs.hf_token)


def list_models(store: ModelStore, node: NodeConfig, as_json: bool) -> int:
    rows = [_row(v, node) for name in store.names() for v in store.versions(name)]
    if as_json:
        print(json.dumps({"store": str(store.root), "models": rows,
                          "partial": [str(p) for p in store.partial_pulls()]}, indent=2))
        return 0
    if not rows:
        print(f"no models in {store.root} (dsnode models pull SOURCE)")
    else:
        _table(rows)
    for partial in store.partial_pulls():
        print(f"interrupted pull: {partial} (run the same pull again to resume; dsnode models rm NAME drops it)")
    if node.problem and node.path.exists():
        print(f"(could not read {node.path} to say which version it uses: {node.problem})")
    return 0


def _row(v: StoredVersion, node: NodeConfig) -> dict[str, Any]:
    m = v.manifest
    used = node.model_path is not None and node.model_path.resolve() == v.path.resolve()
    return {"name": v.name, "version": v.version, "label": m.label, "current": v.current, "format": m.format,
            "quantization": m.quantization, "architecture": m.architecture, "bytes": m.size_bytes,
            "source": m.source, "created_at": m.created_at, "path": str(v.path),
            "used_by": [str(node.path)] if used else []}


def _table(rows: list[dict[str, Any]]) -> None:
    header = ("NAME", "VERSION", "CURRENT", "LABEL", "FORMAT", "QUANTIZATION", "SIZE", "USED BY")
    cells = [(r["name"], r["version"], "*" if r["current"] else "", r["label"] or "", r["format"],
              r["quantization"], human_bytes(r["bytes"]), ", ".join(r["used_by"])) for r in rows]
    widths = [max(len(str(row[i])) for row in [header, *cells]) for i in range(len(header))]
    for row in [header, *cells]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def remove(store: ModelStore, ref: str, node: NodeConfig, force: bool) -> int:
    parsed = parse_ref(ref)
    if parsed is None:
        return _error("rm", StoreError(f"{ref!r}: give NAME (every version) or NAME@VERSION"))
    name, version = parsed
    try:
        doomed = [store.resolve(f"{name}@{version}")] if version else store.versions(name)
        in_use = [v for v in doomed if node.model_path is not None and node.model_path.resolve() == v.path.resolve()]
        if in_use and not force:
            raise StoreError(f"{in_use[0].ref} is what {node.path} serves; change [model] path first, "
                             "or --force")
        removed = store.remove(name, version)
    except StoreError as exc:
        return _error("rm", exc)
    except OSError as exc:
        return _error("rm", StoreError(_os_problem(exc, store)))
    for path in removed:
        print(f"removed {path}")
    if version and store.versions(name) and store.current_version(name) is None:
        print(f"{name} has no current version now: dsnode models use {name}@VERSION")
    return 0


def use(store: ModelStore, ref: str) -> int:
    """Make a version current: what `[model] path = "NAME"` means from the next start or reload."""
    try:
        stored = store.resolve(ref)
        store.set_current(stored.name, stored.version)
    except StoreError as exc:
        return _error("use", exc)
    except OSError as exc:
        return _error("use", StoreError(_os_problem(exc, store)))
    print(f"{stored.name} -> {stored.version} (restart or reload the nodes that serve {stored.name!r})")
    return 0


def _os_problem(exc: OSError, store: ModelStore) -> str:
    where = exc.filename or store.root
    hint = " (run it as root, or as the store's owner: sudo -u dsnode …)" if isinstance(exc, PermissionError) else ""
    return f"{where}: {exc.strerror or exc}{hint}"


def _error(command: str, exc: Exception) -> int:
    print(f"dsnode models {command}: error: {exc}", file=sys.stderr)
    return 1
