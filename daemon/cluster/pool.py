"""Pooled keep-alive HTTP/1.1 connections to upstream nodes: the client side of forwarding.

Why not `aiohttp.ClientSession` here: forwarding is an edge node's hot path, and one ClientSession
request costs several times what nginx spends on a whole proxied request (see
`benchmarks/bench_forward.py`). A forwarded request needs much less than a general client: write a
request whose head and body are already bytes, read a status line and headers, then a body framed by
Content-Length, chunked encoding or the end of the connection, and keep the connection for the next
request. That is all this module does, on plain asyncio protocols (uvloop under `dsnode serve`).
The advertisement poller, which is not on the hot path, uses the node's `aiohttp.ClientSession`.

Failures are told apart by when they happen, because the balancer treats them differently:
`ConnectFailed` / `NoResponse` (nothing was received: the request may go to another upstream) and
`BodyCut` (the answer started and stopped: too late to go elsewhere).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import urlsplit

from .http_head import ProtocolError, parse_head

MAX_HEAD_BYTES = 64 * 1024
PAUSE_ABOVE_BYTES = 256 * 1024  # body bytes buffered and not yet consumed: stop reading the socket
RESUME_BELOW_BYTES = 64 * 1024
MAX_IDLE_PER_ORIGIN = 32  # like nginx's `keepalive 32`

# parser states
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_EOF, _DONE = range(9)


class UpstreamError(Exception):
    """Forwarding to one upstream failed."""


class ConnectFailed(UpstreamError):
    """No connection could be made (refused, unreachable, connect timeout)."""


class NoResponse(UpstreamError):
    """The connection failed or timed out before a response head arrived."""


class BodyCut(UpstreamError):
    """The response started but its body ended early (connection lost, timeout, bad framing)."""


class TooLarge(UpstreamError):
    """The response body is longer than the reader's limit (what was read of it is dropped)."""


class _Stale(Exception):
    """A pooled connection turned out closed by the peer before it answered anything."""


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def from_url(cls, url: str) -> "Origin":
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname or "", port)

    @property
    def host_header(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return (host if self.port == default else f"{host}:{self.port}").encode("ascii")


class Response:
    """A response head; the body is read with `read()` (whole) or `chunks()` (as it arrives)."""

    __slots__ = ("status", "headers", "_conn", "_released")

    def __init__(self, conn: "_Connection", status: int, headers: list[tuple[str, str]]) -> None:
        self.status = status
        self.headers = headers  # (name, value) as received
        self._conn = conn
        self._released = False

    def header(self, name: str) -> str | None:
        """The first value of a header (`name` in lower case)."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def sized(self) -> bool:
        """The body is framed by Content-Length (a whole answer), not a stream."""
        return self._conn.framing == _LENGTH

    @property
    def length(self) -> int | None:
        """The body's Content-Length, if the head gave one."""
        return self._conn.length

    async def read(self, timeout: float, limit: int | None = None) -> bytearray:
        """The whole body; raises BodyCut if it ends early, TooLarge (having held at most `limit`
        bytes of it) if it is longer than `limit`."""
        if limit is not None and self.length is not None and self.length > limit:
            raise TooLarge(f"Content-Length {self.length} > {limit} bytes")
        body = bytearray()
        while True:
            data = await self._conn.next_data(timeout)
            if not data:
                return body
            if limit is not None and len(body) + len(data) > limit:
                raise TooLarge(f"more than {limit} bytes")
            body += data

    async def chunks(self, timeout: float) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (everything buffered at each wake-up, joined); `timeout` is the
        longest wait for the next bytes."""
        while True:
            data = await self._conn.next_data(timeout)
            if not data:
                return
            yield data

    def release(self) -> None:
        """Done with it: a fully read body on a keep-alive connection goes back to the pool."""
        if not self._released:
            self._released = True
            self._conn.finish()

    def close(self) -> None:
        """Abandon it (the client went away, or the body failed): the connection is closed."""
        if not self._released:
            self._released = True
            self._conn.close()


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection, one exchange at a time; a small incremental response parser."""

    def __init__(self, pool: "Pool", origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._state = _IDLE
        self.framing = _IDLE
        self._keep_alive = True
        self._buf = b""  # unparsed framing bytes (head, chunk-size lines)
        self._remaining = 0
        self.length: int | None = None  # the current response's Content-Length
        self._pieces: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._received = False
        self._head: tuple[int, list[tuple[str, str]]] | None = None
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.used = 0  # exchanges started on this connection

    # --- the exchange, as the forwarder drives it ------------------------------------------------
    async def exchange(self, data: bytes, timeout: float) -> Response:
        assert self._transport is not None
        reused = self.used > 0
        self.used += 1
        self._state, self.framing, self._keep_alive = _HEAD, _IDLE, True
        self._buf, self._head, self._error, self._received = b"", None, None, False
        self.length = None
        self._transport.write(data)
        try:
            while self._head is None:
                if self._error is not None:
                    if reused and not self._received:
                        raise _Stale() from self._error
                    raise self._error
                if not await self._wait(timeout):
                    raise NoResponse(f"no response within {timeout:g}s")
        except BaseException:  # failed, timed out, or cancelled: the exchange can't be finished
            self.close()
            raise
        status, headers = self._head
        return Response(self, status, headers)

    async def next_data(self, timeout: float) -> bytes:
        while not self._pieces:
            if self._state == _DONE:
                return b""
            if self._error is not None:
                raise BodyCut(str(self._error)) from None
            if not await self._wait(timeout):
                self.close()
                raise BodyCut(f"no data for {timeout:g}s")
        data = self._pieces.popleft() if len(self._pieces) == 1 else b"".join(self._pieces)
        self._pieces.clear()
        self._buffered = 0
        if self._paused and self._transport is not None and not self.closed:
            self._paused = False
            self._transport.resume_reading()
        return data

    def finish(self) -> None:
        if self._state == _DONE and self._keep_alive and not self.closed:
            self._state = _IDLE
            self._pool._put_idle(self)
        else:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.close()
        self._pool._forget(self)

    async def _wait(self, timeout: float) -> bool:
        """Until the parser has news; False on timeout."""
        waiter = self._loop.create_future()
        self._waiter = waiter
        timer = self._loop.call_later(timeout, _expire, waiter)
        try:
            return await waiter  # type: ignore[no-any-return,func-returns-value]
        finally:
            timer.cancel()
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    # --- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        if self._state in (_IDLE, _DONE):
            self.close()  # bytes nobody asked for: the connection can't be trusted any more
            return
        self._received = True
        try:
            self._feed(data)
        except ProtocolError as exc:
            self._fail(f"bad response from upstream: {exc}")
            self.close()
        if self._buffered > PAUSE_ABOVE_BYTES and not self._paused and not self.closed:
            self._paused = True
            self._transport.pause_reading()  # type: ignore[union-attr]
        self._wake()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost tells the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == _UNTIL_EOF:
            self._state = _DONE
        elif self._state not in (_IDLE, _DONE):
            self._fail(f"connection lost{': ' + str(exc) if exc else ''}")
        self._pool._forget(self)
        self._wake()

    def _fail(self, why: str) -> None:
        if self._error is None and self._state != _DONE:
            self._error = NoResponse(why) if self._head is None else BodyCut(why)

    # --- parsing ----------------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        if self._buf:
            data, self._buf = self._buf + data, b""
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state == _HEAD:
                stop = data.find(b"\r\n\r\n", pos)
                if stop < 0:
                    if end - pos > MAX_HEAD_BYTES:
                        raise ProtocolError("response head too large")
                    self._buf = data[pos:]
                    return
                self._parse_head(data[pos:stop])
                pos = stop + 4
            elif state == _LENGTH or state == _CHUNK_DATA:
                take = min(self._remaining, end - pos)
                self._add(data[pos:pos + take] if (pos or take < end) else data)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DONE if state == _LENGTH else _CHUNK_END
            elif state == _CHUNK_SIZE or state == _TRAILER:
                stop = data.find(b"\r\n", pos)
                if stop < 0:
                    if end - pos > 4096:
                        raise ProtocolError("chunk header too long")
                    self._buf = data[pos:]
                    return
                line, pos = data[pos:stop], stop + 2
                if state == _TRAILER:
                    if not line:
                        self._state = _DONE
                    continue
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {line[:40]!r}") from None
                if size == 0:
                    self._state = _TRAILER
                else:
                    self._remaining, self._state = size, _CHUNK_DATA
            elif state == _CHUNK_END:
                if end - pos < 2:
                    self._buf = data[pos:]
                    return
                if data[pos:pos + 2] != b"\r\n":
                    raise ProtocolError("chunk not followed by CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
            elif state == _UNTIL_EOF:
                self._add(data[pos:] if pos else data)
                return
            else:  # _DONE with bytes left over: nothing was pipelined, so this is garbage
                self._keep_alive = False
                return

    def _add(self, piece: bytes) -> None:
        if piece:
            self._pieces.append(piece)
            self._buffered += len(piece)

    def _parse_head(self, data: bytes) -> None:
        head = parse_head(data)
        if head is None:
            return  # an interim answer (100 Continue): the real head follows
        self._keep_alive = head.keep_alive
        self.length = None if head.chunked else head.length
        if head.chunked:
            self._state = self.framing = _CHUNK_SIZE
        elif head.length is not None:
            self.framing = _LENGTH
            self._remaining = head.length
            self._state = _LENGTH if head.length else _DONE
        elif head.status in (204, 304):
            self._state = self.framing = _DONE
        else:
            self._state = self.framing = _UNTIL_EOF
            self._keep_alive = False
        self._head = (head.status, head.headers)


def _expire(waiter: "asyncio.Future[bool]") -> None:
    if not waiter.done():
        waiter.set_result(False)


class Pool:
    """Idle keep-alive connections per origin, reused most-recent first (as nginx's keepalive does)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, max_idle: int = MAX_IDLE_PER_ORIGIN) -> None:
        self._ssl = ssl_context
        self._max_idle = max_idle
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open: set[_Connection] = set()

    async def request(self, origin: Origin, data: bytes, connect_timeout: float, head_timeout: float) -> Response:
        """Send one request (head and body, already framed) and return its response head.
        Raises ConnectFailed or NoResponse; either way nothing of an answer was received."""
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            try:
                return await conn.exchange(data, head_timeout)
            except _Stale:
                continue  # the peer closed it while idle (keepalive_timeout): try another
        conn = await self._connect(origin, connect_timeout)
        try:
            return await conn.exchange(data, head_timeout)
        except _Stale as exc:  # not reachable for a fresh connection; kept for type completeness
            raise NoResponse(str(exc)) from None

    async def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost

    async def _connect(self, origin: Origin, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self._tls() if origin.scheme == "https" else None
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, origin), origin.host, origin.port, ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"connect timed out after {timeout:g}s") from None
        except (OSError, ssl.SSLError) as exc:
            # an SSLError's errno is OpenSSL's code, not an OS one: its text says what failed
            plain = not isinstance(exc, ssl.SSLError) and isinstance(exc.errno, int) and exc.errno > 0
            why = os.strerror(exc.errno) if plain else str(exc)
            raise ConnectFailed(f"cannot connect to {origin.host}:{origin.port}: {why}") from None
        self._open.add(conn)
        return conn

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _put_idle(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        idle.append(conn)
        if len(idle) > self._max_idle:
            idle.pop(0).close()

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
