"""Issue 19 and issue 15 (item 1) against real `dsnode serve` processes: an edge (the tiny dense
model, context 512) and a central (the tiny MoE, context 2048) serving the same model name, both
with API keys and a cluster secret, plus three small servers of the test's own on loopback:

- a recording TCP proxy between the edge and the central (what an attacker on the LAN captures);
- a hostile peer (`m-*` models) answering 400 MB, or recording what reaches it;
- a peer whose advertisement turns into JSON nested 100,000 deep, then back.

The tests run in file order; the last ones restart, then kill, the central.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx2
import openai
import psutil
import pytest
import pytest_asyncio

from tests.support.nodes import ServeProcess, free_port, node_toml
from tests.support.raw_http import read_request

pytestmark = pytest.mark.slow

MODEL = "r1-tiny"
KEY = "sk-hardening-5d1e9c7b3a2f4e6d8c0b"
SECRET = "c" * 64
LONG = ("We hold these truths to be self-evident, that all men are created equal, that they are endowed "
        "by their Creator with certain unalienable Rights.")  # > 32 tokens, fits the edge's context
CAP = 16 * 1024 * 1024  # the edge's max_answer_bytes
WAIT_S = 120.0  # hang guards, never measurements
PROMPTLY_S = 30.0  # "the client gets 502 promptly": it waited > 90 s for 400 MB before


# --- the test's own servers -----------------------------------------------------------------------
@dataclass
class Proxy:
    """Passes bytes to the central and keeps a copy of each request the edge sent through it."""

    target: int
    sent: list[bytearray] = field(default_factory=list)  # per connection, edge → central
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        record = bytearray()
        self.sent.append(record)
        await asyncio.gather(_pipe(reader, up_writer, record), _pipe(up_reader, writer, None))

    def requests(self) -> list[bytes]:
        """Every whole request seen, head and body."""
        out = []
        for stream in self.sent:
            data = bytes(stream)
            while b"\r\n\r\n" in data:
                head, _, rest = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                out.append(head + b"\r\n\r\n" + rest[:length])
                data = rest[length:]
        return out


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, record: bytearray | None) -> None:
    try:
        while data := await source.read(65536):
            if record is not None:
                record += data
            sink.write(data)
            await sink.drain()
    except ConnectionError:
        pass
    finally:
        sink.close()


@dataclass
class HostilePeer:
    """Serves `m-*` models: `m-record` answers and keeps the body, `m-huge-*` answer 400 MB."""

    models: tuple[str, ...] = ("m-record", "m-huge-length", "m-huge-chunked", "m-huge-sse")
    deep_advert: bool = False  # serve JSON nested 100,000 deep at /cluster
    received: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head, body = await read_request(reader)
                if head.startswith(b"GET /cluster"):
                    await _send(writer, b"[" * 100_000 + b"]" * 100_000 if self.deep_advert else self._advert())
                    continue
                self.received.append(body)
                model = json.loads(body)["model"]
                if model == "m-record":
                    await _send(writer, json.dumps({"id": "c", "object": "text_completion", "model": model,
                                                    "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
                                                    }).encode())
                    continue
                await _flood(writer, model)
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _advert(self) -> bytes:
        models = [{"name": m, "max_context": 4096, "ready": True} for m in self.models]
        return json.dumps({"node": {"name": "hostile", "role": "central", "ready": True, "reason": "",
                                    "models": models}}).encode()


async def _send(writer: asyncio.StreamWriter, body: bytes) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    await writer.drain()


async def _flood(writer: asyncio.StreamWriter, model: str) -> None:
    """400 MB: with a Content-Length, as chunks of a whole answer, or as one SSE event without end."""
    piece = b"x" * (1 << 20)
    if model == "m-huge-length":
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (400 << 20))
        framed = piece
    else:
        kind = b"text/event-stream" if model == "m-huge-sse" else b"application/json"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % kind)
        framed = b"%x\r\n%s\r\n" % (len(piece), piece)
    for _ in range(400):
        writer.write(framed)
        await writer.drain()


# --- the cluster ----------------------------------------------------------------------------------
def auth_toml(work) -> str:
    (work / "keys").write_text(f"tester: {KEY}\n")
    (work / "cluster.secret").write_text(SECRET + "\n")
    return ('[auth]\napi_keys_file = "keys"\ncluster_secret_file = "cluster.secret"\nmax_clock_skew = 600\n')


@pytest_asyncio.fixture(scope="module")
async def cluster(tmp_path_factory, dense_dir, moe_dir):
    work = tmp_path_factory.mktemp("hardening")
    auth = auth_toml(work)
    central_port, edge_port = free_port(), free_port()
    (work / "central.toml").write_text(node_toml("central-1", "central", central_port, MODEL, moe_dir,
                                                 "transformers", extra=auth))
    central = ServeProcess("central-1", work / "central.toml", central_port, work / "central.log").start()
    proxy, hostile, polled = Proxy(central_port), HostilePeer(), HostilePeer(models=("m-polled",))
    for server in (proxy, hostile, polled):
        server.server = await asyncio.start_server(server._connection, "127.0.0.1", 0)
    routing = f"""[routing]
long_prompt_tokens = 32
poll_interval = 0.5
max_fails = 1
fail_timeout = 60
first_token_timeout = 60
max_answer_bytes = {CAP}
max_event_bytes = 1048576
""" + "".join(f'\n[[routing.upstream]]\nurl = "{u}"\n' for u in (proxy.url, polled.url)) + \
        f'\n[[routing.upstream]]\nurl = "{hostile.url}"\nmax_fails = 0\n'  # its 502s must not take it out
    (work / "edge.toml").write_text(node_toml("edge-1", "edge", edge_port, MODEL, dense_dir, "transformers",
                                              extra=auth + routing))
    edge = ServeProcess("edge-1", work / "edge.toml", edge_port, work / "edge.log").start()
    try:
        for node in (central, edge):
            await asyncio.to_thread(node.wait_ready, 180)
        async with aiohttp.ClientSession(headers=BEARER) as session:
            async with asyncio.timeout(WAIT_S):
                while not all(p["healthy"] for p in await _peers(session, edge)):
                    await asyncio.sleep(0.2)
        yield {"edge": edge, "central": central, "proxy": proxy, "hostile": hostile, "polled": polled}
    finally:
        for node in (edge, central):
            await asyncio.to_thread(node.stop)
        for server in (proxy, hostile, polled):
            server.server.close()


BEARER = {"Authorization": f"Bearer {KEY}"}


async def _peers(session: aiohttp.ClientSession, edge: ServeProcess) -> list[dict[str, Any]]:
    async with session.get(edge.url + "/cluster") as response:
        return (await response.json())["peers"]


@pytest_asyncio.fixture
async def http():
    async with aiohttp.ClientSession(headers=BEARER, timeout=aiohttp.ClientTimeout(total=WAIT_S)) as session:
        yield session


async def ask(http: aiohttp.ClientSession, node: ServeProcess, body: dict[str, Any] | bytes,
              headers: dict[str, str] | None = None, path: str = "/v1/completions") -> tuple[int, dict, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(node.url + path, data=data,
                         headers={"Content-Type": "application/json", **(headers or {})}) as response:
        return response.status, dict(response.headers), await response.read()


async def logged(node: ServeProcess, request_id: str) -> dict[str, Any]:
    async with asyncio.timeout(WAIT_S):
        while request_id not in node.request_records():
            await asyncio.sleep(0.05)
    return node.request_records()[request_id]


# --- 1. failure accounting, and the bytes forwarded -----------------------------------------------
async def test_a_gzip_long_request_is_forwarded_and_so_is_the_next_one(cluster, http):
    edge = cluster["edge"]
    body = json.dumps({"model": MODEL, "prompt": LONG, "max_tokens": 4}).encode()
    status, headers, data = await ask(http, edge, gzip.compress(body), {"Content-Encoding": "gzip",
                                                                        "X-Request-Id": "gzip-1"})
    assert status == 200, data
    assert (headers["X-DSNode-Route"], headers["X-DSNode-Node"]) == ("forwarded", "central-1")
    status, headers, data = await ask(http, edge, {"model": MODEL, "prompt": LONG, "max_tokens": 4})
    assert status == 200 and headers["X-DSNode-Node"] == "central-1", data  # not taken out by the first


async def test_a_lone_surrogate_is_a_400_at_the_edge_and_reaches_no_upstream(cluster, http):
    edge, hostile = cluster["edge"], cluster["hostile"]
    for model, path in (("m-record", "/v1/completions"), (MODEL, "/v1/chat/completions")):
        content = b'"prompt": "a\\ud800"' if path == "/v1/completions" else \
            b'"messages": [{"role": "user", "content": "' + LONG.encode() + b' \\udfff"}]'
        status, _, data = await ask(http, edge, b'{"model": "%s", %s}' % (model.encode(), content), path=path)
        assert status == 400 and json.loads(data)["error"]["code"] == "invalid_unicode", data
    assert hostile.received == []
    status, _, _ = await ask(http, edge, {"model": "m-record", "prompt": "fine"})
    assert status == 200 and len(hostile.received) == 1


# --- 2. issue 15 item 1: a prompt no node can hold ------------------------------------------------
async def test_a_prompt_no_node_can_hold_is_a_final_400_through_the_edge_as_from_the_central(cluster):
    edge, central = cluster["edge"], cluster["central"]
    sent: list[str] = []
    hooks = {"request": [lambda request: sent.append(str(request.url))]}
    huge = "All work and no play makes Jack a dull boy. " * 400  # far over 2048 tokens
    messages = [{"role": "user", "content": huge}]

    def sdk_call(name: str, node: ServeProcess) -> dict[str, Any]:
        client = openai.OpenAI(base_url=node.url + "/v1", api_key=KEY, max_retries=2, timeout=WAIT_S,
                               http_client=httpx2.Client(event_hooks=hooks))
        with pytest.raises(openai.BadRequestError) as refused:  # on the first try, or not at all
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                           extra_headers={"X-Request-Id": f"too-long-{name}"})
        return refused.value.body

    answers = {name: await asyncio.to_thread(sdk_call, name, node) for name, node in (("edge", edge),
                                                                                      ("central", central))}
    assert len(sent) == 2  # one request each: a 400 is final, the SDK does not retry it
    assert answers["edge"]["code"] == "context_length_exceeded" and answers["edge"]["param"] == "messages"
    assert "maximum context length is 2048 tokens" in answers["edge"]["message"]  # the largest there is
    assert answers["edge"] == answers["central"]  # the same numbers, the same words
    record = await logged(edge, "too-long-edge")
    assert record["status"] == 400 and record["level"] == "warning" and record["route"] == "local"
    assert edge.log_text().count('"request_id": "too-long-edge"') == 1


# --- 3. a hostile advertisement -------------------------------------------------------------------
async def test_a_peer_serving_deep_json_is_unreachable_then_polled_again_when_healthy(cluster, http):
    edge, polled = cluster["edge"], cluster["polled"]

    async def polled_state() -> dict[str, Any]:
        return next(p for p in await _peers(http, edge) if p["url"] == polled.url)

    polled.deep_advert = True
    async with asyncio.timeout(WAIT_S):
        while (state := await polled_state())["reachable"] is not False:
            await asyncio.sleep(0.1)
    assert "nested more than 16 levels deep" in state["last_error"]
    polled.deep_advert = False
    async with asyncio.timeout(WAIT_S):
        while not (await polled_state())["healthy"]:
            await asyncio.sleep(0.1)
    assert all(p["healthy"] for p in await _peers(http, edge))  # the others were polled all along
    assert '"event": "task_failed"' not in edge.log_text()


# --- 4. answers bounded in size -------------------------------------------------------------------
@pytest.mark.parametrize("model", ["m-huge-length", "m-huge-chunked"])
async def test_a_400mb_answer_is_a_prompt_502_with_memory_bounded(cluster, http, model):
    edge = cluster["edge"]
    process = psutil.Process(edge.process.pid)
    before, peak = process.memory_info().rss, [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            stop.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        async with asyncio.timeout(PROMPTLY_S):
            status, _, data = await ask(http, edge, {"model": model, "prompt": "x"})
    finally:
        stop.set()
        sampler.join()
    assert status == 502 and json.loads(data)["error"]["code"] == "upstream_answer_too_large", data
    assert peak[0] - before < 2 * CAP, f"RSS grew by {(peak[0] - before) >> 20} MiB"


async def test_a_streamed_event_without_end_is_cut_with_an_error_event(cluster, http):
    async with asyncio.timeout(PROMPTLY_S):
        status, _, data = await ask(http, cluster["edge"], {"model": "m-huge-sse", "prompt": "x", "stream": True})
    events = [e.removeprefix("data: ") for e in data.decode().split("\n\n") if e]
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "upstream_answer_too_large"


# --- 5. keys out of the logs ----------------------------------------------------------------------
async def test_a_rejected_request_head_with_a_key_leaves_no_key_in_the_log(cluster):
    edge = cluster["edge"]
    secret = f"Bearer {KEY}".encode()
    for line in (b"Authorization: " + secret + b"\x01", b"Authorization : " + secret,
                 b"Authorization: Bearer\r\n " + KEY.encode(), b"Authorization: " + secret + b"x" * 9000):
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + line + b"\r\nContent-Length: 2\r\n\r\n{}")
        answer = await asyncio.wait_for(reader.read(), WAIT_S)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b" 400 " in head.split(b"\r\n")[0] and json.loads(body)["error"]["code"] == "bad_http_request"
    log = edge.log_text()
    assert KEY not in log
    lines = log.split('"event": "ready"', 1)[1].splitlines()[1:]  # since loading (a progress bar) ended
    assert sum('"event": "bad_http_request"' in line for line in lines) == 4
    assert all(line.startswith("{") for line in lines), [x for x in lines if not x.startswith("{")][:5]


# --- 6. replay-proof peer credentials -------------------------------------------------------------
async def test_a_captured_credential_is_refused_by_a_second_node_and_after_a_restart(cluster, http):
    edge, central, proxy = cluster["edge"], cluster["central"], cluster["proxy"]
    status, _, _ = await ask(http, edge, {"model": MODEL, "prompt": LONG, "max_tokens": 2},
                             {"X-Request-Id": "captured-1"})
    assert status == 200
    captured = next(r for r in proxy.requests() if b"X-Request-Id: captured-1" in r and b"X-DSNode-Peer" in r)
    assert b"Authorization" not in captured  # the client's key stayed on the edge

    async def replay(node: ServeProcess) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        writer.write(captured)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
        writer.close()
        return head

    assert b" 401 " in (await replay(edge)).split(b"\r\n")[0]  # a second node
    assert b" 401 " in (await replay(central)).split(b"\r\n")[0]  # the same node, twice
    await asyncio.to_thread(central.stop)
    central.start()
    await asyncio.to_thread(central.wait_ready, 180)
    head = await replay(central)  # the same node, after a restart
    assert b" 401 " in head.split(b"\r\n")[0] and b"X-DSNode-Peer-Challenge: " in head
    async with asyncio.timeout(WAIT_S):  # the edge learns the new boot and forwards again
        while True:
            status, headers, _ = await ask(http, edge, {"model": MODEL, "prompt": LONG, "max_tokens": 2})
            if status == 200 and headers["X-DSNode-Route"] == "forwarded":
                break
            await asyncio.sleep(0.2)


# --- 7. the local fallback (last: it kills the central) -------------------------------------------
async def test_a_long_prompt_that_fits_the_edge_is_served_there_while_the_central_is_down(cluster, http):
    edge, central = cluster["edge"], cluster["central"]
    central.kill()
    status, headers, data = await ask(http, edge, {"model": MODEL, "prompt": LONG, "max_tokens": 4},
                                      {"X-Request-Id": "fallback-1"})
    assert status == 200, data
    assert (headers["X-DSNode-Route"], headers["X-DSNode-Node"]) == ("local", "edge-1")
    record = await logged(edge, "fallback-1")
    assert record["route"] == "local" and "no upstream could take it" in record["route_reason"]
    assert record["route_reason"].endswith("served here")
    status, _, data = await ask(http, edge, {"model": MODEL, "prompt": LONG, "max_tokens": 1000})
    assert status == 503 and json.loads(data)["error"]["code"] == "no_upstream"  # it fits only the central
