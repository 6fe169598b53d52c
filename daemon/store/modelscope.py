"""Pulling from ModelScope (`modelscope:owner/name`), with its maintained client `modelscope-hub`
(the download layer the `modelscope` package itself uses; `pip install 'dsnode[modelscope]'`).

ModelScope publishes a size and a sha256 for every file, so the store version is the content hash of
that listing: the same files give the same version, whether pulled from here, the hub or a folder.
The client resumes and checks each file itself; the pull verifies again before installing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .layout import StoreError
from .manifest import FileRecord, content_sha256
from .remote import Listing, RemoteFile, select_files

DEFAULT_ENDPOINT = "https://www.modelscope.cn"
DEFAULT_REVISION = "master"
VERSION_CHARS = 12


def modelscope_listing(repo_id: str, revision: str | None, endpoint: str | None, token: str | None) -> Listing:
    api = _api(endpoint, token)
    where = f"{endpoint or DEFAULT_ENDPOINT} (MODELSCOPE_ENDPOINT)"
    revision = revision or DEFAULT_REVISION
    with modelscope_errors(repo_id, revision, where):
        entries = api.list_repo_files(repo_id, "model", revision=revision)
    files = [RemoteFile(e.path, int(e.size), e.sha256) for e in entries if not e.is_dir]
    unhashed = [f.path for f in files if not f.sha256]
    if unhashed:
        raise StoreError(f"{repo_id}: {where} publishes no sha256 for {', '.join(unhashed[:3])}; cannot verify")
    keep, skipped = select_files(files)
    version = content_sha256({f.path: FileRecord(f.size, f.sha256 or "") for f in keep})[:VERSION_CHARS]
    source = {"kind": "modelscope", "id": repo_id, "revision": revision, "endpoint": endpoint or DEFAULT_ENDPOINT}

    def fetch(file: RemoteFile, part: Path, bar: Any) -> None:
        _download(api, repo_id, revision, file, part, where)

    return Listing(version, source, tuple(keep), tuple(skipped), fetch, where)


def _download(api: Any, repo_id: str, revision: str, file: RemoteFile, part: Path, where: str) -> None:
    """The client downloads into a folder of its own beside `part` (where it keeps what it needs to
    resume); the finished file is then moved onto `part`."""
    work = part.parent / f".{part.name}.modelscope"
    with modelscope_errors(repo_id, revision, where):
        done = api.download_file(repo_id, "model", file.path, revision=revision, local_dir=work,
                                 expected_sha256=file.sha256, file_size=file.size)
    os.replace(done, part)
    shutil.rmtree(work, ignore_errors=True)


def _api(endpoint: str | None, token: str | None) -> Any:
    try:
        from modelscope_hub import HubApi
    except ModuleNotFoundError:
        raise StoreError("modelscope: sources need the ModelScope client: pip install 'dsnode[modelscope]'") from None
    return HubApi(endpoint=endpoint, token=token)


@contextmanager
def modelscope_errors(repo_id: str, revision: str, where: str) -> Iterator[None]:
    from modelscope_hub import errors

    try:
        yield
    except errors.NotExistError as exc:
        raise StoreError(f"modelscope:{repo_id}: no such repo or revision {revision!r} at {where} "
                         f"({_first_line(exc)})") from None
    except errors.FileIntegrityError as exc:
        raise StoreError(f"modelscope:{repo_id}: {_first_line(exc)} ({where}); the file was discarded and "
                         "nothing was installed (pull again)") from None
    except (errors.AuthenticationError, errors.PermissionDeniedError):
        raise StoreError(f"modelscope:{repo_id}: {where} refused access; set MODELSCOPE_API_TOKEN") from None
    except (errors.NetworkError, errors.RequestTimeoutError) as exc:
        raise StoreError(f"modelscope:{repo_id}: cannot reach {where}: {_first_line(exc)}") from None
    except errors.HubError as exc:
        raise StoreError(f"modelscope:{repo_id}: {where}: {type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]
