"""The forwarding client's response parser, fed the bytes of an answer cut at arbitrary places."""

from __future__ import annotations

import asyncio

import pytest
from dsnode.cluster.pool import BodyCut, NoResponse, Origin, Pool, _Connection
from hypothesis import given, settings
from hypothesis import strategies as st


class RecordingTransport(asyncio.Transport):
    """Where the connection writes its request; nothing is sent anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def cuts(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


async def exchange(pieces: list[bytes], eof: bool = False) -> tuple[int, list[tuple[str, str]], bytes, _Connection]:
    pool = Pool()
    conn = _Connection(pool, Origin("http", "127.0.0.1", 1))
    conn.connection_made(RecordingTransport())
    asking = asyncio.ensure_future(conn.exchange(b"POST / HTTP/1.1\r\n\r\n", timeout=5))
    await asyncio.sleep(0)
    for piece in pieces:
        conn.data_received(piece)
    if eof:
        conn.connection_lost(None)
    response = await asking
    body = await response.read(timeout=5)
    return response.status, response.headers, body, conn


CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-DSNode-Node: central-1\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n"
           b"d\r\ndata: first\n\n\r\n"
           b"F;ext=1\r\ndata: second!\n\n\r\n"
           b"7\r\ndata: 3\r\n"
           b"0\r\nTrailer: x\r\n\r\n")
SIZED = b"HTTP/1.1 201 Created\r\nContent-Length: 11\r\nConnection: keep-alive\r\n\r\nhello world"


def run(coro):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_a_chunked_answer_parses_the_same_however_it_is_cut(points):
    status, headers, body, conn = run(exchange(cuts(CHUNKED, points)))
    assert status == 200
    assert ("X-DSNode-Node", "central-1") in headers  # names keep their case
    assert body == b"data: first\n\ndata: second!\n\ndata: 3"
    assert conn._keep_alive and not conn.closed


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_a_sized_answer_parses_the_same_however_it_is_cut(points):
    status, _, body, _ = run(exchange(cuts(SIZED, points)))
    assert (status, body) == (201, b"hello world")


def test_an_answer_without_framing_ends_with_the_connection():
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
    status, _, body, conn = run(exchange([raw], eof=True))
    assert (status, body) == (200, b"until the end")
    assert not conn._keep_alive


def test_an_interim_100_continue_is_skipped():
    status, _, body, _ = run(exchange([b"HTTP/1.1 100 Continue\r\n\r\n" + SIZED]))
    assert (status, body) == (201, b"hello world")


def test_connection_close_is_not_kept_alive():
    raw = SIZED.replace(b"keep-alive", b"close")
    assert not run(exchange([raw]))[3]._keep_alive


@pytest.mark.parametrize("raw", [b"SMTP ready\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
                                 b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n"])
def test_garbage_instead_of_a_head_is_no_response(raw):
    with pytest.raises(NoResponse, match="bad response from upstream"):
        run(exchange([raw]))


def test_a_body_cut_short_is_body_cut():
    with pytest.raises(BodyCut, match="connection lost"):
        run(exchange([SIZED[:-3]], eof=True))


def test_bad_chunk_framing_is_body_cut():
    raw = CHUNKED.replace(b"d\r\ndata: first\n\n\r\n", b"zz\r\n")
    with pytest.raises(BodyCut, match="bad chunk size"):
        run(exchange([raw]))


def test_origin_from_url_and_its_host_header():
    assert Origin.from_url("http://10.0.0.5:8000") == Origin("http", "10.0.0.5", 8000)
    assert Origin.from_url("https://central.lan").port == 443
    assert Origin.from_url("https://central.lan").host_header == b"central.lan"
    assert Origin.from_url("http://[fd00::5]:8000").host_header == b"[fd00::5]:8000"
