"""`NAME` / `NAME@VERSION`: how a config or a command names a model of the store.

`[model] path` is a store reference when it is a bare name (no `/`) and no folder of that name sits next
to the config file (so configs that name such a folder keep working; `./NAME` says "the folder" outright).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .layout import DEFAULT_ROOT, ModelStore, StoreError
from .manifest import VERSION_MANIFEST, ManifestError, VersionManifest, read_manifest

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def parse_ref(text: str) -> tuple[str, str | None] | None:
    """'NAME' → (NAME, None); 'NAME@VERSION' → (NAME, VERSION); anything else → None."""
    name, at, version = text.partition("@")
    if not NAME_RE.fullmatch(name) or (at and not NAME_RE.fullmatch(version)):
        return None
    return name, (version if at else None)


def is_store_ref(value: str, config_dir: Path) -> bool:
    return parse_ref(value) is not None and not (config_dir / value).is_dir()


@dataclass(frozen=True)
class Resolution:
    path: Path  # the version folder (or where it would be, when unresolved)
    manifest: VersionManifest | None  # None when the reference could not be resolved
    error: str | None  # why not, in one line


def resolve_in_store(ref: str, root: Path) -> Resolution:
    """The folder a reference names in the store at `root`, or the reason it names none."""
    parsed = parse_ref(ref)
    if parsed is None:
        raise ValueError(f"not a store reference: {ref!r}")
    name, version = parsed
    try:
        stored = ModelStore(root).resolve(ref)
    except StoreError as exc:
        return Resolution(root / name / (version or "current"), None, str(exc))
    return Resolution(stored.path, stored.manifest, None)


def resolve_model_path(raw: dict[str, Any], config_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """For `load_config`, on the raw TOML tables: if `[model] path` is a store reference, rewrite it to
    the version folder (`[store] root`, relative to the config's folder) and return (the version's
    identity, None), or (None, why it names none). A plain path: (its identity if the folder is a store
    version, else None, None)."""
    model, store = raw.get("model"), raw.get("store")
    ref = model.get("path") if isinstance(model, dict) else None
    if not isinstance(ref, str) or not ref:
        return None, None
    if not is_store_ref(ref, config_dir):
        return _folder_version(config_dir / ref), None  # a folder; a version of the store if it has a manifest
    root = store.get("root") if isinstance(store, dict) else None
    found = resolve_in_store(ref, config_dir / root if isinstance(root, str) and root else DEFAULT_ROOT)
    model["path"] = str(found.path)  # type: ignore[index]
    if found.manifest is None:
        return None, f"{found.error} (got {ref!r})"
    return _identity(found.manifest), None


def _folder_version(folder: Path) -> dict[str, Any] | None:
    """A model folder named by its path that is a store version (`ROOT/NAME/VERSION`): its identity."""
    try:
        return _identity(read_manifest(folder)) if (folder / VERSION_MANIFEST).is_file() else None
    except (ManifestError, OSError):
        return None


def _identity(m: VersionManifest) -> dict[str, Any]:
    return {"name": m.name, "version": m.version, "label": m.label, "content_sha256": m.content_sha256}
