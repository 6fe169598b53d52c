"""`dsnode models pull`: fetch into `.partial/`, verify every file, then install with one rename.

A remote pull's staging folder is named after the version it becomes, so running the same command
again after an interruption (Ctrl-C, a dropped link, a reboot) resumes it: verified files are kept,
a file cut short continues from its last byte. What is refused (a hash that does not match, an
unsupported architecture, a full disk) leaves nothing a node could load.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dsnode import __version__

from .layout import ModelStore, StoredVersion, StoreError
from .manifest import (
    VERSION_MANIFEST,
    FileRecord,
    VersionManifest,
    content_sha256,
    describe_folder,
    hash_file,
)
from .progress import file_bar_class, human_bytes
from .remote import Listing, RemoteFile
from .staging import Staging

Say = Callable[[str], None]
ConfigCheck = Callable[[dict[str, Any]], None]  # raises StoreError for a config.json it refuses
SPACE_MARGIN_BYTES = 64 * 2**20


class RefusedModel(StoreError):
    """A model dsnode will not install (its architecture); nothing of it is kept."""


@dataclass(frozen=True)
class PullOptions:
    name: str
    label: str | None = None
    make_current: bool = True
    progress: bool = True
    check_config: ConfigCheck | None = None  # e.g. what `--convert int8` will need


def pull_remote(store: ModelStore, listing: Listing, options: PullOptions, say: Say) -> StoredVersion:
    existing = already_installed(store, options, listing.version, say)
    if existing is not None:
        return existing
    if not any(f.path == "config.json" for f in listing.files):
        raise StoreError(f"{listing.source.get('id')}: no config.json at {listing.where}; "
                         "not a Hugging Face model folder (dsnode serves causal language models)")
    staging = Staging(store.partial_root(options.name) / listing.version)
    with staging:
        remaining = [f for f in listing.files if not staging.has(f.path, f.size)]
        done = len(listing.files) - len(remaining)
        say(f"pulling {options.name}@{listing.version} from {listing.where}: {len(listing.files)} files, "
            f"{human_bytes(sum(f.size for f in listing.files))}" + (f" ({done} already here)" if done else ""))
        try:
            check_free_space(store.root, sum(f.size for f in remaining) - _bytes_under(staging.incoming))
        except StoreError:
            if not staging.verified and not _bytes_under(staging.incoming):
                staging.discard()  # nothing to resume: leave no trace
            raise
        with refusals(staging, store.root):
            for file in remaining:
                _fetch_one(staging, listing, file, options)
                if file.path == "config.json":
                    check_architecture(staging.files, listing.source.get("id", ""), options.check_config)
        return install(store, staging, listing.version, listing.source, options)


def _fetch_one(staging: Staging, listing: Listing, file: RemoteFile, options: PullOptions) -> None:
    part = staging.incoming_path(file.path)
    listing.fetch(file, part, file_bar_class(options.progress))
    staging.accept(file.path, verify(part, file, listing.where))


def verify(part: Path, file: RemoteFile, where: str) -> FileRecord:
    """The file's record if its size and hash are what the hub publishes; else it is deleted (a rerun
    fetches it again) and the pull stops."""
    size = part.stat().st_size
    hashes = hash_file(part) if size == file.size else None
    sha256 = hashes.sha256.hexdigest() if hashes else ""
    if hashes is None:
        why = f"{size} bytes arrived, {where} publishes {file.size}"
    elif file.sha256 and sha256 != file.sha256:
        why = f"sha256 {sha256[:16]}… does not match the {file.sha256[:16]}… {where} publishes"
    elif not file.sha256 and file.git_sha1 and hashes.git_sha1.hexdigest() != file.git_sha1:
        why = f"git blob id {hashes.git_sha1.hexdigest()[:16]}… does not match {file.git_sha1[:16]}… ({where})"
    else:
        return FileRecord(size, sha256)
    part.unlink()
    raise StoreError(f"{file.path}: {why}; the file was discarded and nothing was installed (pull again)")


def install(store: ModelStore, staging: Staging, version: str, source: dict[str, str],
            options: PullOptions) -> StoredVersion:
    manifest = make_manifest(options.name, version, source, staging.files, dict(staging.verified), options.label)
    (staging.files / VERSION_MANIFEST).write_text(manifest.to_json())
    stored = store.install(staging.files, manifest, options.make_current)
    staging.finish()
    return stored


def make_manifest(name: str, version: str, source: dict[str, str], folder: Path,
                  files: dict[str, FileRecord], label: str | None) -> VersionManifest:
    fmt, quantization, architecture = describe_folder(folder)
    return VersionManifest(
        name=name, version=version, source=source, content_sha256=content_sha256(files), files=files,
        format=fmt, quantization=quantization, architecture=architecture,
        created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        created_by=f"dsnode {__version__}", label=label,
    )


def already_installed(store: ModelStore, options: PullOptions, version: str, say: Say) -> StoredVersion | None:
    if not (store.root / options.name / version / VERSION_MANIFEST).is_file():
        return None
    if options.make_current:
        store.set_current(options.name, version)
    stored = store.resolve(f"{options.name}@{version}")
    say(f"{stored.ref} is already in the store ({stored.path})" + (", now current" if stored.current else ""))
    return stored


def check_architecture(folder: Path, source: str, extra: ConfigCheck | None) -> None:
    """Refuse a model no dsnode engine serves before its weights are fetched."""
    from dsnode.hfconfig import ModelFolderError, read_hf_config

    try:
        config = read_hf_config(folder)
    except ModelFolderError:
        architectures = _architectures(folder / "config.json")
        raise RefusedModel(f"{source}: unsupported architecture {architectures}: dsnode serves causal language "
                           "models (…ForCausalLM); nothing was installed") from None
    if extra is not None:
        try:
            extra(config)
        except StoreError as exc:
            raise RefusedModel(f"{source}: {exc}; nothing was installed") from None


def _architectures(config_path: Path) -> str:
    import json

    try:
        return ", ".join(json.loads(config_path.read_text()).get("architectures") or []) or "(none given)"
    except (OSError, ValueError, AttributeError):
        return "(config.json unreadable)"


class refusals:
    """Around the fetch loop: a full disk or a refused model discards the whole staging folder (a
    full disk must not stay full because of us); anything else keeps it for a resumed pull."""

    def __init__(self, staging: Staging, root: Path) -> None:
        self.staging, self.root = staging, root

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            self.staging.discard()
            raise StoreError(f"{self.root}: the disk filled up while pulling; the partial download was "
                             "removed and nothing was installed") from None
        if isinstance(exc, RefusedModel):
            self.staging.discard()
        elif isinstance(exc, OSError):
            raise StoreError(f"{self.staging.folder}: {exc}; run the same pull again to resume") from None
        return False


def check_free_space(root: Path, needed: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < needed + SPACE_MARGIN_BYTES:
        raise StoreError(f"{root}: not enough free space: {human_bytes(needed)} to pull, {human_bytes(free)} free")


def _bytes_under(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
