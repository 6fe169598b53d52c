"""The model store: `ROOT/NAME/VERSION/` folders, each described by its own `dsnode-version.json`.

A version is immutable once installed: it appears under its final name by one rename, after every file
was verified, so a node never sees a half-written model. `ROOT/NAME/current` (a symlink to a version
folder) marks the version `[model] path = "NAME"` means. Pulls work in `ROOT/.partial/`, which nothing
loads from. Torch-free: an edge host pulls, lists and removes models with the base install.
"""

from __future__ import annotations

from .layout import DEFAULT_ROOT, ModelStore, StoredVersion, StoreError
from .manifest import VERSION_MANIFEST, FileRecord, VersionManifest
from .refs import parse_ref

__all__ = [
    "DEFAULT_ROOT",
    "VERSION_MANIFEST",
    "FileRecord",
    "ModelStore",
    "StoreError",
    "StoredVersion",
    "VersionManifest",
    "parse_ref",
]
