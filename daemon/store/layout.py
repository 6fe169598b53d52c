"""The store on disk: `ROOT/NAME/VERSION/` folders, `ROOT/NAME/current`, `ROOT/.partial/` for pulls.

Every change is one rename (install, remove) or one symlink swap (the current marker), so a reader
(a node resolving its config, `dsnode models list`) sees a version whole or not at all.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .manifest import VERSION_MANIFEST, ManifestError, VersionManifest, read_manifest

DEFAULT_ROOT = Path("/var/lib/dsnode/models")
CURRENT = "current"
PARTIAL = ".partial"


class StoreError(Exception):
    """A store operation that cannot be done; the message says what, where and why, in one line."""


@dataclass(frozen=True)
class StoredVersion:
    name: str
    version: str
    path: Path
    manifest: VersionManifest
    current: bool

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[StoredVersion]:
        """Installed versions of `name`, oldest first; folders without a readable manifest are skipped."""
        folder = self.root / name
        if not folder.is_dir():
            return []
        current = self.current_version(name)
        found = []
        for path in folder.iterdir():
            if path.name == CURRENT or path.name.startswith(".") or not path.is_dir() or path.is_symlink():
                continue
            try:
                manifest = read_manifest(path)
            except ManifestError:
                continue
            found.append(StoredVersion(name, path.name, path, manifest, path.name == current))
        return sorted(found, key=lambda v: (v.manifest.created_at, v.version))

    def current_version(self, name: str) -> str | None:
        try:
            return os.readlink(self.root / name / CURRENT)
        except OSError:
            return None

    def resolve(self, ref: str) -> StoredVersion:
        """`NAME` (its current version), `NAME@VERSION` or `NAME@LABEL` → the installed version."""
        name, _, wanted = ref.partition("@")
        versions = self.versions(name)
        if not versions:
            raise StoreError(f"{name} is not in the model store {self.root} (dsnode models pull …)")
        if not wanted:
            current = [v for v in versions if v.current]
            if not current:
                raise StoreError(f"{name} has no current version in {self.root / name} "
                                 f"(dsnode models use {name}@VERSION; versions: {_listing(versions)})")
            return current[0]
        match = [v for v in versions if v.version == wanted] or [v for v in versions if v.manifest.label == wanted]
        if len(match) != 1:
            why = "is not in the model store" if not match else "is the label of more than one version in"
            raise StoreError(f"{name}@{wanted} {why} {self.root} (versions of {name}: {_listing(versions)})")
        return match[0]

    def install(self, staged: Path, manifest: VersionManifest, make_current: bool) -> StoredVersion:
        """Move a verified folder (holding its manifest) into place with one rename."""
        if not (staged / VERSION_MANIFEST).is_file():
            raise StoreError(f"{staged}: no {VERSION_MANIFEST}; refusing to install it")
        target = self.root / manifest.name / manifest.version
        target.parent.mkdir(parents=True, exist_ok=True)
        staged.chmod(0o755)  # staging folders are private (mkdtemp); a node may run as another user
        try:
            os.rename(staged, target)
        except OSError as exc:
            if target.exists():
                raise StoreError(f"{target}: already in the store") from None
            raise StoreError(f"{target}: cannot move the pulled model into place ({exc.strerror})") from None
        if make_current or self.current_version(manifest.name) is None:
            self.set_current(manifest.name, manifest.version)
        _owned_like_root(target.parent, self.root)
        return self.resolve(f"{manifest.name}@{manifest.version}")

    def set_current(self, name: str, version: str) -> None:
        """Point `NAME/current` at `version` by renaming a new symlink over the old one (atomic)."""
        folder = self.root / name
        if not (folder / version / VERSION_MANIFEST).is_file():
            raise StoreError(f"{name}@{version} is not in the model store {self.root}")
        link = folder / f".{CURRENT}.{os.getpid()}"
        link.unlink(missing_ok=True)
        os.symlink(version, link)
        os.replace(link, folder / CURRENT)

    def remove(self, name: str, version: str | None) -> list[Path]:
        """Remove one version (and the current marker if it pointed there), or the whole name with
        its interrupted pulls. Each folder leaves its name by a rename before it is deleted."""
        folder = self.root / name
        if version is None:
            if not folder.is_dir():
                raise StoreError(f"{name} is not in the model store {self.root}")
            removed = [v.path for v in self.versions(name)]
            _discard(folder, self.root)
            _discard(self.partial_root(name), self.root)
            return removed
        stored = self.resolve(f"{name}@{version}")
        if stored.current:
            (folder / CURRENT).unlink()
        _discard(stored.path, self.root)
        return [stored.path]

    def partial_root(self, name: str) -> Path:
        return self.root / PARTIAL / name

    def partial_pulls(self) -> list[Path]:
        base = self.root / PARTIAL
        if not base.is_dir():
            return []
        return sorted(p for name in base.iterdir() if name.is_dir() for p in name.iterdir() if p.is_dir())


def _owned_like_root(folder: Path, root: Path) -> None:
    """root pulling into a store the service user owns (/var/lib/dsnode/models is dsnode's): hand the
    new files to that user, so the node reads them and its own `dsnode models rm` can remove them."""
    owner = root.stat()
    if os.geteuid() != 0 or owner.st_uid == 0:
        return
    for path in (folder, *folder.rglob("*")):
        os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)


def _discard(path: Path, root: Path) -> None:
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=".removing-", dir=root))
    os.rename(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def _listing(versions: list[StoredVersion]) -> str:
    return ", ".join(v.version + (f" ({v.manifest.label})" if v.manifest.label else "") for v in versions)
