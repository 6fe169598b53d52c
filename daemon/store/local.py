"""Pulling a local folder or archive: what an offline host gets (a model fetched elsewhere and carried
in, or another host's store version). The version is the content hash, so the same files pulled from
anywhere are the same version. A local copy is not resumed: a failure removes its staging folder."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

from .layout import ModelStore, StoredVersion
from .manifest import VERSION_MANIFEST, FileHasher, FileRecord, content_sha256
from .progress import file_bar_class
from .pull import PullOptions, Say, already_installed, check_architecture, check_free_space, install, refusals
from .sources import Source
from .staging import Staging

VERSION_CHARS = 12
_CHUNK = 1 << 20
# Not part of the model: a store manifest of where the folder was before, git and hub-client metadata.
SKIPPED_NAMES = {VERSION_MANIFEST, ".git", ".cache", ".gitattributes", ".DS_Store"}


def pull_local(store: ModelStore, source: Source, options: PullOptions, say: Say) -> StoredVersion:
    check_free_space(store.root, _source_bytes(source))
    partial = store.partial_root(options.name)
    partial.mkdir(parents=True, exist_ok=True)
    staging = Staging(Path(tempfile.mkdtemp(prefix="local-", dir=partial)))
    try:
        with staging, refusals(staging, store.root):
            say(f"pulling {options.name} from {source.location}")
            top = Path(source.location) if source.kind == "folder" else _extract(Path(source.location), staging)
            _copy_verified(top, staging, options)
            check_architecture(staging.files, source.location, options.check_config)
        version = content_sha256(staging.verified)[:VERSION_CHARS]
        existing = already_installed(store, options, version, say)
        if existing is not None:
            staging.discard()
            return existing
        return install(store, staging, version, {"kind": source.kind, "path": source.location}, options)
    except BaseException:
        staging.discard()
        raise


def _copy_verified(top: Path, staging: Staging, options: PullOptions) -> None:
    """Copy (or, from an extracted archive, move) every file into files/, hashing it on the way."""
    files = sorted(p for p in _walk(top))
    bar = file_bar_class(options.progress)(total=sum(p.stat().st_size for p in files), desc="copying")
    with bar:
        for path in files:
            rel = path.relative_to(top).as_posix()
            target = staging.incoming_path(rel)
            hasher = FileHasher(path.stat().st_size)
            with open(path, "rb") as src, open(target, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    hasher.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
            staging.accept(rel, FileRecord(target.stat().st_size, hasher.sha256.hexdigest()))


def _walk(top: Path) -> list[Path]:
    found = []
    for folder, dirs, names in os.walk(top):
        dirs[:] = [d for d in dirs if d not in SKIPPED_NAMES]
        found += [Path(folder) / n for n in names if n not in SKIPPED_NAMES and not Path(folder, n).is_symlink()]
    return found


def _extract(archive: Path, staging: Staging) -> Path:
    """Unpack into incoming/unpacked; an archive holding one folder means that folder's contents."""
    into = staging.incoming / "unpacked"
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                if member.startswith("/") or ".." in Path(member).parts:
                    raise OSError(f"{archive}: refusing an entry outside the archive's folder: {member}")
            z.extractall(into)
    else:
        with tarfile.open(archive) as t:
            t.extractall(into, filter="data")  # no absolute paths, no links out, no devices
    entries = [p for p in into.iterdir() if p.name not in SKIPPED_NAMES]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else into


def _source_bytes(source: Source) -> int:
    path = Path(source.location)
    if source.kind == "archive":
        return 2 * path.stat().st_size  # unpacked beside the copy: a rough upper bound for stored archives
    return sum(p.stat().st_size for p in _walk(path))

