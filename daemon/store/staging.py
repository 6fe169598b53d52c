"""One pull's working folder, `ROOT/.partial/NAME/KEY/`: nothing loads from here.

    files/          files already verified, under their final names (this folder becomes the version)
    incoming/       files still arriving; a rerun of the same pull resumes them where they stopped
    verified.json   path → size and sha256 of what is in files/, so a rerun neither fetches nor hashes them again
    lock            held while a pull runs: two pulls of the same thing do not write the same files
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import IO

from .layout import StoreError
from .manifest import FileRecord


class Staging:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = folder / "files"
        self.incoming = folder / "incoming"
        self._lock: IO[bytes] | None = None
        self.verified: dict[str, FileRecord] = {}

    def __enter__(self) -> Staging:
        self.files.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(exist_ok=True)
        self._lock = open(self.folder / "lock", "wb")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StoreError(f"{self.folder}: another pull of the same model is running") from None
        self.verified = self._read_verified()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def has(self, path: str, size: int) -> bool:
        record = self.verified.get(path)
        return record is not None and record.bytes == size and (self.files / path).is_file()

    def incoming_path(self, path: str) -> Path:
        target = self.incoming / path
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def accept(self, path: str, record: FileRecord) -> None:
        """Move a verified file from incoming/ to files/ and remember it."""
        target = self.files / path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.incoming / path, target)
        self.verified[path] = record
        tmp = self.folder / "verified.json.tmp"
        tmp.write_text(json.dumps({p: [r.bytes, r.sha256] for p, r in self.verified.items()}))
        os.replace(tmp, self.folder / "verified.json")

    def finish(self) -> None:
        """After files/ was installed: remove the rest (and the NAME folder under .partial if empty)."""
        self.discard()

    def discard(self) -> None:
        self.__exit__()
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()
        except OSError:
            pass

    def _read_verified(self) -> dict[str, FileRecord]:
        try:
            data = json.loads((self.folder / "verified.json").read_text())
            return {str(p): FileRecord(int(size), str(sha)) for p, (size, sha) in data.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}
