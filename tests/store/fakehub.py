"""A local stand-in for the Hugging Face hub: the endpoints huggingface_hub uses to pull a model.

    GET  /api/models/{repo}[/revision/{rev}]?blobs=true   model info: commit sha, files with size,
                                                          git blob id, LFS sha256
    GET  /{repo}/resolve/{rev}/{path}                     the bytes; Range: bytes=N- answered 206
    HEAD /{repo}/resolve/{rev}/{path}                     X-Repo-Commit, ETag (sha256 for LFS files)

Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), as the hub's do, so the
client raises its own exception types. The same repos are served as ModelScope serves them to
modelscope-hub:

    GET  /api/v1/models/{repo}/repo/files?Revision=R      {"Code": 200, "Data": {"Files": [Path, Size, Sha256]}}
    GET  /api/v1/models/{repo}/repo?Revision=R&FilePath=P the bytes
 Faults a test can ask for: bytes that differ from what the
listing publishes, a connection dropped after N bytes, a response that stalls after N bytes. Runs in
a thread of its own so a `dsnode` in this process or in a child can talk to it.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

LFS_SUFFIXES = (".safetensors", ".bin", ".onnx")


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str  # 40 hex
    revisions: tuple[str, ...] = ("main",)

    def sibling(self, path: str) -> dict[str, Any]:
        data = self.files[path]
        entry: dict[str, Any] = {"rfilename": path, "size": len(data), "blobId": git_blob_id(data)}
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry


@dataclass
class Faults:
    corrupt: set[str] = field(default_factory=set)  # serve these with one byte changed
    drop_after: dict[str, int] = field(default_factory=dict)  # close the connection after N bytes, once
    stall_after: dict[str, int] = field(default_factory=dict)  # send N bytes then hang, once


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    sent: int  # body bytes sent


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults = Faults()
        self.requests: list[Request] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> FakeHub:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def downloads(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + path) and "/resolve/" in r.path]

    def modelscope_downloads(self) -> list[str]:
        """The FilePath of every ModelScope file download, in order."""
        return [parse_qs(urlsplit(r.path).query)["FilePath"][0] for r in self.requests
                if r.path.startswith("/api/v1/") and "/repo?" in r.path]

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/models/{owner}/{name}", self._info)
        app.router.add_get("/api/models/{owner}/{name}/revision/{revision}", self._info)
        app.router.add_route("*", "/{owner}/{name}/resolve/{revision}/{path:.+}", self._resolve)
        app.router.add_get("/api/v1/models/{owner}/{name}/repo/files", self._modelscope_files)
        app.router.add_get("/api/v1/models/{owner}/{name}/repo", self._modelscope_file)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    def _find(self, request: web.Request) -> tuple[Repo, str]:
        repo_id = f"{request.match_info['owner']}/{request.match_info['name']}"
        repo = self.repos.get(repo_id)
        if repo is None:
            raise _error(404 if request.headers.get("Authorization") else 401, "RepoNotFound", "Repository not found")
        revision = request.match_info.get("revision", "main")
        if revision not in (*repo.revisions, repo.commit):
            raise _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, revision

    async def _info(self, request: web.Request) -> web.Response:
        self.requests.append(Request("GET", request.path, None, 0))
        repo, _ = self._find(request)
        repo_id = f"{request.match_info['owner']}/{request.match_info['name']}"
        siblings = [repo.sibling(p) for p in sorted(repo.files)]
        return web.json_response({"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                                  "siblings": siblings})

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        repo, _ = self._find(request)
        path = request.match_info["path"]
        if path not in repo.files:
            raise _error(404, "EntryNotFound", f"{path} does not exist")
        data = self._content(path, repo.files[path])
        sibling = repo.sibling(path)
        etag = sibling["lfs"]["sha256"] if "lfs" in sibling else sibling["blobId"]
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        start = _range_start(request.headers.get("Range"))
        if request.method == "HEAD":
            self.requests.append(Request("HEAD", request.path, None, 0))
            return web.Response(headers={**headers, "Content-Length": str(len(data))})
        return await self._send(request, path, data, start, headers)

    def _modelscope_repo(self, request: web.Request) -> Repo:
        repo = self.repos.get(f"{request.match_info['owner']}/{request.match_info['name']}")
        if repo is None or request.query.get("Revision", "master") not in ("master", *repo.revisions):
            raise web.HTTPNotFound(text='{"Code": 10010205001, "Message": "model or revision not found"}',
                                   content_type="application/json")
        return repo

    async def _modelscope_files(self, request: web.Request) -> web.Response:
        self.requests.append(Request("GET", request.path, None, 0))
        repo = self._modelscope_repo(request)
        files = [{"Path": p, "Name": p.rsplit("/", 1)[-1], "Type": "blob", "Size": len(d),
                  "Sha256": hashlib.sha256(d).hexdigest()} for p, d in sorted(repo.files.items())]
        return web.json_response({"Code": 200, "Success": True, "Data": {"Files": files}})

    async def _modelscope_file(self, request: web.Request) -> web.StreamResponse:
        repo = self._modelscope_repo(request)
        path = request.query.get("FilePath", "")
        if path not in repo.files:
            raise web.HTTPNotFound(text='{"Code": 404, "Message": "file not found"}', content_type="application/json")
        data = self._content(path, repo.files[path])
        start = _range_start(request.headers.get("Range"))
        return await self._send(request, path, data, start, {"Accept-Ranges": "bytes"})

    def _content(self, path: str, data: bytes) -> bytes:
        if path in self.faults.corrupt:
            return data[:-1] + bytes([data[-1] ^ 0xFF])
        return data

    async def _send(self, request: web.Request, path: str, data: bytes, start: int,
                    headers: dict[str, str]) -> web.StreamResponse:
        body = data[start:]
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        response = web.StreamResponse(status=status, headers={**headers, "Content-Length": str(len(body))})
        await response.prepare(request)
        cut = self.faults.drop_after.pop(path, None)
        stall = self.faults.stall_after.pop(path, None)
        limit = cut if cut is not None else stall if stall is not None else len(body)
        self.requests.append(Request("GET", request.path_qs, request.headers.get("Range"), min(limit, len(body))))
        for offset in range(0, min(limit, len(body)), 1 << 20):
            await response.write(body[offset:min(offset + (1 << 20), limit)])
        if cut is not None:
            assert request.transport is not None
            request.transport.close()  # mid-body: the client sees an incomplete response
            return response
        if stall is not None:
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.05)  # until the client goes away
            return response
        await response.write_eof()
        return response


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    return int(header[len("bytes="):].split("-", 1)[0] or 0)


def _error(status: int, code: str, message: str) -> web.HTTPException:
    cls = {401: web.HTTPUnauthorized, 404: web.HTTPNotFound}[status]
    return cls(headers={"X-Error-Code": code, "X-Error-Message": message}, text=f'{{"error": "{message}"}}',
               content_type="application/json")
