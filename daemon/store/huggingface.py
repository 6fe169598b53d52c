"""Pulling from the Hugging Face hub, or any endpoint that speaks its API (a mirror: HF_ENDPOINT).

huggingface_hub does the talking: the revision and the file list with sizes and hashes (`model_info`
with files metadata), the download URLs and auth headers, and the byte transfer (`http_get`: Range
resumes, retries on a dropped connection, redirects to a CDN). The file placement is ours rather than
`hf_hub_download(local_dir=…)`'s: since huggingface_hub 1.x that downloads into a per-process
temporary file and deletes it on failure, so an interrupted 4 GB shard would start again from zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .layout import StoreError
from .remote import Listing, RemoteFile, select_files

DEFAULT_ENDPOINT = "https://huggingface.co"
VERSION_CHARS = 12  # a commit's first 12 hex digits name its store version, like `git log --oneline`


def hf_listing(repo_id: str, revision: str | None, endpoint: str, token: str | None) -> Listing:
    from huggingface_hub import HfApi

    where = f"{endpoint} (HF_ENDPOINT)"
    with hub_errors(repo_id, revision, where):
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision, files_metadata=True)
    if not info.sha:
        raise StoreError(f"{repo_id}: {where} gave no commit for revision {revision or 'main'!r}")
    files = [RemoteFile(s.rfilename, int(s.size or 0), s.lfs.sha256 if s.lfs else None, s.blob_id)
             for s in info.siblings or []]
    if any(s.size is None for s in info.siblings or []):
        raise StoreError(f"{repo_id}: {where} publishes no file sizes; is it a Hugging Face hub endpoint?")
    keep, skipped = select_files(files)
    source = {"kind": "huggingface", "id": repo_id, "revision": revision or "main", "commit": info.sha,
              "endpoint": endpoint}

    def fetch(file: RemoteFile, part: Path, bar: Any) -> None:
        _download(repo_id, info.sha or "", file, part, bar, endpoint, token, where)

    return Listing(info.sha[:VERSION_CHARS], source, tuple(keep), tuple(skipped), fetch, where)


def _download(repo_id: str, commit: str, file: RemoteFile, part: Path, bar: Any, endpoint: str,
              token: str | None, where: str) -> None:
    """Append the rest of the file to `part` (a Range request from the bytes it already holds)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(repo_id, file.path, revision=commit, endpoint=endpoint)
    resume_from = part.stat().st_size if part.exists() else 0
    if resume_from > file.size:  # not a prefix of this file: start over
        part.unlink()
        resume_from = 0
    with open(part, "ab") as out, hub_errors(repo_id, commit, where):
        http_get(url, out, resume_size=resume_from, headers=build_hf_headers(token=token),
                 expected_size=file.size, displayed_filename=file.path, tqdm_class=bar)


@contextmanager
def hub_errors(repo_id: str, revision: str | None, where: str) -> Iterator[None]:
    """huggingface_hub's and httpx's exceptions → one StoreError line naming the repo and endpoint."""
    import httpx2
    from huggingface_hub import errors

    try:
        yield
    except errors.OfflineModeIsEnabled:
        raise StoreError(f"{repo_id}: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so huggingface_hub "
                         f"will not contact {where}; unset it to pull") from None
    except errors.RevisionNotFoundError:
        raise StoreError(f"{repo_id}: no revision {revision!r} at {where}") from None
    except errors.GatedRepoError:
        raise StoreError(f"{repo_id}: gated at {where}: accept its terms on the hub, then set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise StoreError(f"{repo_id}: no such model repo at {where} (or it is private: set HF_TOKEN)") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise StoreError(f"{repo_id}: {where} answered HTTP {status}: {_first_line(exc)}") from None
    except (httpx2.ConnectError, httpx2.TimeoutException, httpx2.RemoteProtocolError) as exc:
        raise StoreError(f"{repo_id}: cannot reach {where}: {_first_line(exc) or type(exc).__name__}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]
