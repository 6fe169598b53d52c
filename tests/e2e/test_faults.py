"""Faults, each reproduced against a real `dsnode serve` edge: a misbehaving peer, a client that hangs
up, the model raising, and SIGTERM under load. Each must end in a clear error for the affected
request only, while the node keeps serving everything else; no accepted request is dropped.

The peer is a small real server (asyncio streams on loopback) that answers `GET /cluster` properly
and each completion according to the model it asks for: `m-hang` never answers, `m-garbage` answers
something that is not HTTP, `m-reset` resets the connection mid-stream, and so on. The edge serves
`tiny-dense` itself and forwards every `m-*` model to the peer (`max_fails = 0`, so no fault takes the
peer out for the next test). The model raising is injected into the edge's process by a
`sitecustomize` module: requests whose id starts with `fault-engine-` make the runner raise.
Slow clients (a request head or body trickled forever) are cut off by `[node] idle_timeout` and
`[limits] body_timeout`, and the edge's own limits hold before anything is forwarded.
The tests run in file order; the SIGTERM one is last.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
import textwrap
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.support.nodes import ServeProcess, free_port, node_toml
from tests.support.raw_http import read_request

pytestmark = pytest.mark.slow

LOCAL = "tiny-dense"
FIRST_TOKEN_TIMEOUT_S = 2.0
IDLE_TIMEOUT_S, BODY_TIMEOUT_S = 3, 2
MAX_BODY = 64 * 1024
WAIT_S = 60.0  # a safety net against hangs, never a measurement
BEHAVIOURS = ("good", "hang", "slow", "stall", "garbage", "bad-head", "broken-body", "broken-sse", "reset",
              "endless", "linger")

SHIM = textwrap.dedent('''
    """tests/e2e/test_faults.py: the model raises for requests whose id says so."""
    from dsnode.central import torch_runner

    _prefill, _decode = torch_runner.TorchRunner.prefill, torch_runner.TorchRunner.decode

    def prefill(self, seq_id, token_ids, start):
        if seq_id.startswith("fault-engine-prefill"):
            raise RuntimeError("injected fault in prefill")
        return _prefill(self, seq_id, token_ids, start)

    def decode(self, seq_ids, token_ids):
        if any(s.startswith("fault-engine-decode") for s in seq_ids):
            raise RuntimeError("injected fault in decode")
        return _decode(self, seq_ids, token_ids)

    torch_runner.TorchRunner.prefill, torch_runner.TorchRunner.decode = prefill, decode
''')


# --- the misbehaving peer -------------------------------------------------------------------------
def _event(i: int) -> bytes:
    body = {"id": "cmpl-peer", "object": "text_completion", "model": "m",
            "choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
               b"X-DSNode-Node: bad-peer\r\n\r\n")


@dataclass
class BadPeer:
    server: asyncio.Server | None = None
    hung_up_on: list[str] = field(default_factory=list)  # behaviours whose connection the edge closed
    forwarded: int = 0  # completions received
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> "BadPeer":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        behaviour = "?"
        try:
            while True:
                head, body = await read_request(reader)
                if head.startswith(b"GET /cluster"):
                    await self._send_json(writer, self._advert())
                    continue
                request = json.loads(body)
                self.forwarded += 1
                behaviour = request["model"].removeprefix("m-")
                if not await getattr(self, "_" + behaviour.replace("-", "_"))(writer, reader, request):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.hung_up_on.append(behaviour)
        finally:
            self.writers.discard(writer)
            writer.close()

    def _advert(self) -> dict[str, Any]:
        models = [{"name": f"m-{b}", "max_context": 4096, "ready": True} for b in BEHAVIOURS]
        node = {"name": "bad-peer", "role": "central", "ready": True, "reason": "", "models": models}
        return {"node": node, "peers": []}

    async def _send_json(self, writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"X-DSNode-Node: bad-peer\r\n\r\n%s" % (len(data), data))
        await writer.drain()

    async def _events(self, writer: asyncio.StreamWriter, n: int, gap: float) -> None:
        for i in range(n):
            writer.write(_chunk(_event(i)))
            await writer.drain()
            await asyncio.sleep(gap)

    async def _wait_for_hang_up(self, reader: asyncio.StreamReader) -> bool:
        await reader.read()  # until the edge closes the connection
        raise ConnectionResetError("closed by the edge")

    # behaviours: return whether the connection stays open for the next request
    async def _good(self, writer, reader, request) -> bool:
        if request.get("stream"):
            writer.write(STREAM_HEAD)
            await self._events(writer, 3, 0)
            writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
        else:
            await self._send_json(writer, {"id": "cmpl-peer", "object": "text_completion", "model": "m-good",
                                           "choices": [{"index": 0, "text": "fine", "finish_reason": "stop"}],
                                           "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                     "total_tokens": 2}})
        return True

    async def _hang(self, writer, reader, request) -> bool:
        return await self._wait_for_hang_up(reader)

    async def _slow(self, writer, reader, request) -> bool:  # gaps well under first_token_timeout
        writer.write(STREAM_HEAD)
        await self._events(writer, 4, FIRST_TOKEN_TIMEOUT_S / 4)
        writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _linger(self, writer, reader, request) -> bool:  # [DONE] at once, the stream's end later
        writer.write(STREAM_HEAD)
        await self._events(writer, 2, 0)
        writer.write(_chunk(b"data: [DONE]\n\n"))
        await writer.drain()
        await asyncio.sleep(1.0)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _stall(self, writer, reader, request) -> bool:  # two events, then silence
        writer.write(STREAM_HEAD)
        await self._events(writer, 2, 0)
        return await self._wait_for_hang_up(reader)

    async def _endless(self, writer, reader, request) -> bool:  # a stream (or a body) that never ends
        if request.get("stream"):
            writer.write(STREAM_HEAD)
            for i in range(10**6):
                writer.write(_chunk(_event(i)))
                await writer.drain()
                await asyncio.sleep(0.2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{")
        while True:
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.2)

    async def _garbage(self, writer, reader, request) -> bool:  # not HTTP at all
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff\xfe garbage \r\n\r\n")
        await writer.drain()
        return False

    async def _bad_head(self, writer, reader, request) -> bool:  # HTTP, with a broken header line
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nthis is no header\r\n\r\n{}")
        await writer.drain()
        return False

    async def _broken_body(self, writer, reader, request) -> bool:  # 500 bytes promised, 20 sent
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n"
                     b"X-DSNode-Node: bad-peer\r\n\r\n" + b'{"id": "cmpl-peer", ')
        await writer.drain()
        return False

    async def _broken_sse(self, writer, reader, request) -> bool:  # two events, then broken framing
        writer.write(STREAM_HEAD)
        await self._events(writer, 2, 0)
        writer.write(b"zz\r\nthis is not a chunk\r\n")
        await writer.drain()
        return await self._wait_for_hang_up(reader)

    async def _reset(self, writer, reader, request) -> bool:  # two events, then a TCP reset
        writer.write(STREAM_HEAD)
        await self._events(writer, 2, 0)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        return False


# --- fixtures -------------------------------------------------------------------------------------
@pytest_asyncio.fixture(scope="module")
async def peer():
    bad = await BadPeer().start()
    yield bad
    await bad.stop()


@pytest_asyncio.fixture(scope="module")
async def edge(tmp_path_factory, dense_dir, peer):
    work = tmp_path_factory.mktemp("faults")
    (work / "shim").mkdir()
    (work / "shim" / "sitecustomize.py").write_text(SHIM)
    port = free_port()
    routing = f"""[routing]
poll_interval = 0.5
connect_timeout = 1
first_token_timeout = {FIRST_TOKEN_TIMEOUT_S}
max_fails = 0

[[routing.upstream]]
url = "{peer.url}"
"""
    limits = f"""[limits]
body_timeout = {BODY_TIMEOUT_S}
max_body_bytes = {MAX_BODY}
max_tokens = 500
max_messages = 4
"""
    config = work / "edge.toml"
    text = node_toml("edge-f", "edge", port, LOCAL, dense_dir, "transformers", extra=routing + limits)
    timeouts = f"drain_timeout = 1\nidle_timeout = {IDLE_TIMEOUT_S}"
    config.write_text(text.replace("drain_timeout = 10", timeouts))
    process = ServeProcess("edge-f", config, port, work / "edge.log", env={"PYTHONPATH": str(work / "shim")})
    process.start()
    try:
        await asyncio.to_thread(process.wait_ready, 180)
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(WAIT_S):
                while not await _peer_healthy(session, process):
                    await asyncio.sleep(0.1)
        yield process
    finally:
        await asyncio.to_thread(process.stop)


async def _peer_healthy(session: aiohttp.ClientSession, edge: ServeProcess) -> bool:
    async with session.get(edge.url + "/cluster") as response:
        return bool((await response.json())["peers"][0]["healthy"])


@pytest_asyncio.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as session:
        yield session


# --- helpers --------------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def error(self) -> dict[str, Any]:
        body = json.loads(self.body)
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        return body["error"]

    @property
    def events(self) -> list[str]:
        return [b[len("data: "):] for b in self.body.decode().split("\n\n") if b.startswith("data: ")]

    def stream_error(self) -> dict[str, Any] | None:
        """The error event of a stream (which must end with [DONE]), if it has one."""
        assert self.status == 200 and self.events[-1] == "[DONE]", self.body[-300:]
        errors = [json.loads(e)["error"] for e in self.events[:-1] if '"error"' in e]
        assert len(errors) <= 1 and (not errors or '"error"' in self.events[-2])
        return errors[0] if errors else None


async def ask(http: aiohttp.ClientSession, edge: ServeProcess, model: str, stream: bool = False,
              request_id: str | None = None, **extra: Any) -> Answer:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": extra.pop("max_tokens", 4),
            "stream": stream, **extra}
    headers = {"X-Request-Id": request_id} if request_id else {}
    async with http.post(edge.url + "/v1/completions", json=body, headers=headers) as response:
        return Answer(response.status, dict(response.headers), await response.read())


async def until(predicate: Any) -> None:
    async with asyncio.timeout(WAIT_S):
        while not predicate():
            await asyncio.sleep(0.05)


async def still_serving(http: aiohttp.ClientSession, edge: ServeProcess) -> None:
    """Everything else still works: the local model, a good peer, readiness."""
    local, forwarded = await asyncio.gather(ask(http, edge, LOCAL), ask(http, edge, "m-good", stream=True))
    assert local.status == 200 and local.headers["X-DSNode-Route"] == "local", local.body
    assert forwarded.stream_error() is None and forwarded.headers["X-DSNode-Route"] == "forwarded"
    async with http.get(edge.url + "/ready") as response:
        assert response.status == 200


# --- a misbehaving peer ---------------------------------------------------------------------------
async def test_a_peer_that_accepts_and_never_answers_costs_only_its_own_request(http, edge):
    hung = asyncio.ensure_future(ask(http, edge, "m-hang", request_id="hang-1"))
    await still_serving(http, edge)  # while that one waits
    answer = await hung
    assert answer.status == 503 and answer.error["code"] == "no_upstream"
    assert f"no response within {FIRST_TOKEN_TIMEOUT_S:g}s" in answer.error["message"]
    assert answer.headers["Retry-After"] == "5"


async def test_a_slow_peer_is_passed_on_as_it_comes_and_a_stalled_one_is_cut_cleanly(http, edge):
    slow, stalled = await asyncio.gather(ask(http, edge, "m-slow", stream=True),
                                         ask(http, edge, "m-stall", stream=True))
    assert slow.stream_error() is None and len(slow.events) == 5
    error = stalled.stream_error()
    assert error is not None and error["code"] == "upstream_cut"
    assert f"no data for {FIRST_TOKEN_TIMEOUT_S:g}s" in error["message"]
    assert len(stalled.events) == 4  # the two events it sent, the error, [DONE]
    await still_serving(http, edge)


@pytest.mark.parametrize("behaviour, why", [("garbage", "bad status line"), ("bad-head", "bad header line")])
async def test_a_peer_that_answers_garbage_gets_a_clean_503(http, edge, behaviour, why):
    for stream in (False, True):
        answer = await ask(http, edge, f"m-{behaviour}", stream=stream)
        assert answer.status == 503 and answer.error["code"] == "no_upstream", answer.body
        assert why in answer.error["message"]
    await still_serving(http, edge)


async def test_a_broken_body_is_a_502_and_broken_or_reset_streams_end_with_an_error_event(http, edge):
    body, sse, reset = await asyncio.gather(ask(http, edge, "m-broken-body"),
                                            ask(http, edge, "m-broken-sse", stream=True),
                                            ask(http, edge, "m-reset", stream=True))
    assert body.status == 502 and body.error["code"] == "upstream_cut"
    assert "bad-peer stopped in the middle of its answer" in body.error["message"]
    for cut in (sse, reset):
        error = cut.stream_error()
        assert error is not None and error["code"] == "upstream_cut", cut.body
        assert [json.loads(e)["choices"][0]["text"] for e in cut.events[:2]] == [" t0", " t1"]
    assert "bad chunk size" in sse.stream_error()["message"]
    await still_serving(http, edge)


# --- a client that hangs up -----------------------------------------------------------------------
async def test_a_client_that_hangs_up_mid_stream_frees_the_upstream_and_the_engine(http, edge, peer):
    async with aiohttp.ClientSession() as leaving:
        for model, request_id in (("m-endless", "gone-forwarded"), (LOCAL, "gone-local")):
            body = {"model": model, "prompt": "Once", "max_tokens": 400, "stream": True, "ignore_eos": True}
            response = await leaving.post(edge.url + "/v1/completions", json=body,
                                          headers={"X-Request-Id": request_id})
            assert response.status == 200
            await response.content.readuntil(b"\n\n")  # the first event arrived: it is under way
            response.close()  # and the client is gone
        body = {"model": "m-linger", "prompt": "Once", "stream": True}
        response = await leaving.post(edge.url + "/v1/completions", json=body, headers={"X-Request-Id": "done-1"})
        await response.content.readuntil(b"data: [DONE]\n\n")  # the whole answer...
        response.close()  # ...and the client hangs up before the stream's very end
    await until(lambda: "endless" in peer.hung_up_on)  # the edge closed its upstream connection
    logged = await asyncio.to_thread(edge.request_records, "gone-forwarded", "gone-local", "done-1")
    assert logged["gone-forwarded"]["status"] == 499 and logged["gone-local"]["status"] == 499
    assert logged["done-1"]["status"] == 200  # it had its [DONE]: a complete answer, not a 499
    async with http.get(edge.url + "/cluster") as response:
        load = (await response.json())["node"]["load"]
    assert load["running"] == 0 and load["waiting"] == 0  # the engine let the sequence go
    await still_serving(http, edge)


# --- slow clients, and limits before forwarding ---------------------------------------------------
async def test_a_client_trickling_its_head_or_its_body_is_cut_off(http, edge):
    port = edge.port

    async def trickle(head: bytes, then: bytes) -> bytes:
        """Send `head`, then `then` one byte a second; the node's answer (b"" if it just hung up)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        answer = asyncio.ensure_future(read_answer(reader))
        try:
            for byte in then:
                await asyncio.wait([answer], timeout=1.0)
                if answer.done():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
        except ConnectionError:
            pass
        try:
            return await answer
        finally:
            writer.close()

    async def read_answer(reader: asyncio.StreamReader) -> bytes:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return b""
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return head + await reader.readexactly(length)

    slow_head = trickle(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n", b"X-Slow: " + b"z" * 1000)
    slow_body = trickle(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 1000\r\n\r\n", b"{" * 1000)
    waiting = [asyncio.ensure_future(slow_head), asyncio.ensure_future(slow_body)]
    await still_serving(http, edge)  # meanwhile
    async with asyncio.timeout(WAIT_S):
        head_answer, body_answer = await asyncio.gather(*waiting)
    assert head_answer == b""  # closed without a word: it never finished a request
    status, _, rest = body_answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout", body_answer[:200]
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "body_timeout" and f"within {BODY_TIMEOUT_S}s" in error["message"]


async def test_the_edge_holds_its_own_limits_before_forwarding(http, edge, peer):
    before = peer.forwarded
    too_many_tokens = await ask(http, edge, "m-good", max_tokens=501)
    assert too_many_tokens.status == 400 and too_many_tokens.error["code"] == "max_tokens_too_large"
    messages = [{"role": "user", "content": "hi"}] * 5
    chat = {"model": "m-good", "messages": messages}
    async with http.post(edge.url + "/v1/chat/completions", json=chat) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "too_many_messages"
    too_big = {"model": "m-good", "prompt": "x" * MAX_BODY}
    async with http.post(edge.url + "/v1/completions", json=too_big) as r:
        assert r.status == 413 and (await r.json())["error"]["code"] == "request_too_large"
    assert peer.forwarded == before  # none of them reached the peer
    assert (await ask(http, edge, "m-good", max_tokens=500)).status == 200
    assert peer.forwarded == before + 1


# --- the model raising ----------------------------------------------------------------------------
async def test_the_model_raising_fails_its_request_only(http, edge):
    whole = await ask(http, edge, LOCAL, request_id="fault-engine-prefill-1")
    assert whole.status == 500 and whole.error["code"] == "engine_error"
    assert "injected fault in prefill" in whole.error["message"]
    stream = await ask(http, edge, LOCAL, stream=True, request_id="fault-engine-decode-1", max_tokens=8)
    error = stream.stream_error()
    assert error is not None and error["code"] == "engine_error"
    assert "injected fault in decode" in error["message"]
    assert json.loads(stream.events[0])["choices"][0]["text"] is not None  # the first token got out
    await still_serving(http, edge)
    logged = edge.request_records("fault-engine-prefill-1", "fault-engine-decode-1")
    assert logged["fault-engine-prefill-1"]["status"] == 500
    assert logged["fault-engine-decode-1"]["status"] == 500


# --- SIGTERM under load (last: it stops the edge) -------------------------------------------------
async def test_sigterm_under_load_ends_every_request_cleanly(http, edge):
    asks = [
        ask(http, edge, "m-endless", stream=True, request_id="term-forwarded-stream"),
        ask(http, edge, "m-endless", request_id="term-forwarded-whole"),
        ask(http, edge, LOCAL, stream=True, request_id="term-local-stream", max_tokens=480, ignore_eos=True),
        ask(http, edge, LOCAL, request_id="term-local-whole", max_tokens=480, ignore_eos=True),
        ask(http, edge, "m-good", stream=True, request_id="term-quick"),
    ]
    running = [asyncio.ensure_future(a) for a in asks]
    async with asyncio.timeout(WAIT_S):
        while True:
            async with http.get(edge.url + "/metrics") as response:
                text = await response.text()
            if any(line.startswith("dsnode_requests_in_flight ") and float(line.split()[1]) >= 4
                   for line in text.splitlines()) or running[-1].done():
                break
            await asyncio.sleep(0.05)
    edge.signal(signal.SIGTERM)  # drain_timeout = 1: the endless ones outlive it
    answers = dict(zip(("fs", "fw", "ls", "lw", "quick"), await asyncio.gather(*running)))
    code = await asyncio.to_thread(edge.process.wait, WAIT_S)
    assert code == 0, edge.log_tail()
    cut = answers["fs"].stream_error()
    assert cut is not None and cut["code"] == "shutting_down", answers["fs"].body[-300:]
    assert answers["fw"].status == 503 and answers["fw"].error["code"] == "shutting_down"
    for key in ("ls", "lw"):  # the model may finish 480 tokens within the drain, or be cut
        local = answers[key]
        if key == "ls":
            error = local.stream_error()
            assert error is None or error["code"] == "shutting_down"
        else:
            assert local.status == 200 or local.error["code"] == "shutting_down"
    assert answers["quick"].stream_error() is None
    logged = edge.request_records(*(f"term-{name}" for name in ("forwarded-stream", "forwarded-whole", "local-stream",
                                                                 "local-whole", "quick")))
    assert logged["term-forwarded-stream"]["status"] == logged["term-forwarded-whole"]["status"] == 503
    assert all(f"term-{name}" in logged for name in ("local-stream", "local-whole", "quick"))
