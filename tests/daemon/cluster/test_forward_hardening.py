"""Forwarding that a client's request cannot poison and a hostile upstream cannot swamp: what counts
toward `max_fails` (and what never does), decoded bodies sent without their old Content-Encoding,
answers bounded in size, a whole answer for a request that asked for one, the local fallback, and a
poller that survives whatever an upstream answers."""

from __future__ import annotations

import asyncio
import gzip
import json
from dataclasses import dataclass
from typing import Any, Callable

import pytest
from dsnode.cluster.peers import Poller

from .conftest import LOCAL_MODEL
from .fakes import MODEL, FakeUpstream, _chunk
from .test_forward import BODY, post, sse_events

WAIT_S = 30.0  # hang guards, never measurements
CAPS = "max_answer_bytes = 1048576\nmax_event_bytes = 65536\n"
LONG_PROMPT = "one two three four five six seven eight nine ten " * 4  # > long_prompt_tokens (16), < 512


@dataclass
class HostileUpstream(FakeUpstream):
    models: tuple[str, ...] = (MODEL,)
    advert_body: bytes | None = None  # what GET /cluster answers instead of an advertisement

    async def _advert(self, writer: asyncio.StreamWriter) -> None:
        if self.advert_body is not None:
            await self._send(writer, 200, self.advert_body)
            return
        models = [{"name": m, "max_context": self.max_context, "ready": self.ready} for m in self.models]
        advert = {"node": {"name": self.name, "role": "central", "ready": self.ready, "reason": "", "models": models}}
        await self._send(writer, 200, json.dumps(advert).encode())

    async def _error_503(self, writer, reader) -> bool:
        body = json.dumps({"error": {"message": "draining", "type": "service_unavailable", "param": None,
                                     "code": "draining"}}).encode()
        await self._send(writer, 503, body)
        return True

    async def _head(self, writer, extra: bytes) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n" + extra + b"X-DSNode-Node: " + self.name.encode() + b"\r\n\r\n")
        await writer.drain()

    async def _chunked_whole(self, writer, reader) -> bool:  # a whole answer, framed as chunks
        await self._head(writer, b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n")
        body = json.dumps({"id": "c", "object": "text_completion", "model": MODEL,
                           "choices": [{"index": 0, "text": "chunked", "finish_reason": "stop"}]}).encode()
        writer.write(_chunk(body[:20]) + _chunk(body[20:]) + b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _chunked_cut(self, writer, reader) -> bool:  # SSE-looking chunks for a whole answer, then a cut
        await self._head(writer, b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n")
        writer.write(_chunk(b'data: {"choices": [{"text": " t0"}]}\n\n'))
        await writer.drain()
        return False

    async def _huge_length(self, writer, reader) -> bool:  # 400 MB promised
        await self._head(writer, b"Content-Type: application/json\r\nContent-Length: 419430400\r\n")
        return await self._flood(writer, b"x" * 65536, chunked=False)

    async def _huge_chunked(self, writer, reader) -> bool:
        await self._head(writer, b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n")
        return await self._flood(writer, b"x" * 65536, chunked=True)

    async def _huge_event(self, writer, reader) -> bool:  # one event, then one that never ends
        await self._head(writer, b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n")
        writer.write(_chunk(b'data: {"choices": [{"text": " t0"}]}\n\n'))
        return await self._flood(writer, b"y" * 65536, chunked=True)

    async def _flood(self, writer, piece: bytes, chunked: bool) -> bool:
        data = _chunk(piece) if chunked else piece
        try:
            for _ in range(6400):  # 400 MB, unless the edge hangs up first
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        return False


@pytest.fixture
async def upstreams():
    started: list[HostileUpstream] = []

    async def make(name: str, **kwargs) -> HostileUpstream:
        fake = await HostileUpstream(name, **kwargs).start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        await fake.stop()


def state(node, i: int = 0):
    return node.upstream_states()[i]


# --- what counts toward max_fails ----------------------------------------------------------------
async def polled_until(node: Any, done: Callable[[], bool]) -> None:
    """Poll now (the poller wakes on `changed`, as on a reload), again and again, until `done()`: the
    fixture's poll interval is an hour, so no poll comes by itself in the middle of a test."""
    async with asyncio.timeout(WAIT_S):
        while not done():
            node.upstreams.changed.set()
            await asyncio.sleep(0.02)


async def test_the_only_upstream_answering_500_is_not_taken_out(upstreams, edge):
    a = await upstreams("central-a", script=["error-500"])
    node, client = await edge([(a.url, 1)], routing="max_fails = 1\nfail_timeout = 60")
    response, _ = await post(client)
    assert response.status == 500  # its answer, passed on as it was
    assert (state(node).fails, state(node).down) == (0, False)  # one request's fault is not the node's
    response, data = await post(client)
    assert response.status == 200 and json.loads(data)["choices"][0]["text"] == "from central-a"


async def test_a_request_every_upstream_refuses_takes_none_of_them_out(upstreams, edge):
    a = await upstreams("central-a", script=["error-500"])
    b = await upstreams("central-b", script=["error-500"])
    node, client = await edge([(a.url, 1), (b.url, 1)], routing="max_fails = 1\nfail_timeout = 60")
    assert (await post(client))[0].status == 500
    assert [s.fails for s in node.upstream_states()] == [0, 0]
    assert all(s.healthy for s in node.upstream_states())


async def test_a_503_answer_is_busy_not_broken(upstreams, edge):
    a = await upstreams("central-a", script=["error-503"])
    b = await upstreams("central-b")
    node, client = await edge([(a.url, 1), (b.url, 1)], routing="max_fails = 1\nfail_timeout = 60")
    response, _ = await post(client)
    assert response.headers["X-DSNode-Node"] == "central-b"
    assert state(node, 0).fails == 0 and state(node, 0).healthy


async def test_an_answer_cut_mid_body_counts_against_the_upstream(upstreams, edge):
    a = await upstreams("central-a", script=["cut-body"])
    node, client = await edge([(a.url, 1)], routing="max_fails = 2")
    assert (await post(client))[0].status == 502
    assert state(node).fails == 1 and "stopped in the middle of its answer" in state(node).last_error


# --- the bytes and the headers that describe them -------------------------------------------------
async def test_a_gzip_body_goes_on_decoded_without_its_content_encoding(upstreams, edge):
    a = await upstreams("central-a")
    node, client = await edge([(a.url, 1)], routing="max_fails = 1\nfail_timeout = 60")
    plain = json.dumps(BODY).encode()
    response, _ = await post(client, raw=gzip.compress(plain), headers={"Content-Encoding": "gzip"})
    assert response.status == 200
    got = a.received[-1]
    assert got.body == plain and got.header("Content-Encoding") is None
    assert got.header("Content-Length") == str(len(plain))
    assert (await post(client))[0].status == 200 and state(node).fails == 0


async def test_a_lone_surrogate_is_refused_here_not_forwarded(upstreams, edge):
    a = await upstreams("central-a")
    node, client = await edge([(a.url, 1)])
    raw = b'{"model": "remote-model", "prompt": "\\ud800", "max_tokens": 4}'
    response, data = await post(client, raw=raw)
    assert response.status == 400 and json.loads(data)["error"]["code"] == "invalid_unicode"
    assert a.received == [] and state(node).fails == 0


# --- whole answers and their size -----------------------------------------------------------------
async def test_a_whole_answer_framed_as_chunks_is_passed_on_whole(upstreams, edge):
    a = await upstreams("central-a", script=["chunked-whole"])
    _, client = await edge([(a.url, 1)])
    response, data = await post(client)
    assert response.status == 200 and response.headers["Content-Length"] == str(len(data))
    assert json.loads(data)["choices"][0]["text"] == "chunked"


async def test_a_whole_answer_cut_while_chunked_is_a_502_not_an_event_stream(upstreams, edge):
    a = await upstreams("central-a", script=["chunked-cut"])
    node, client = await edge([(a.url, 1)])
    response, data = await post(client)  # stream: false
    assert response.status == 502 and response.headers["Content-Type"].startswith("application/json")
    assert json.loads(data)["error"]["code"] == "upstream_cut"
    assert state(node).fails == 1


@pytest.mark.parametrize("behaviour", ["huge-length", "huge-chunked"])
async def test_a_whole_answer_over_max_answer_bytes_is_a_502(upstreams, edge, behaviour):
    a = await upstreams("central-a", script=[behaviour])
    node, client = await edge([(a.url, 1)], routing=CAPS + "max_fails = 5")
    async with asyncio.timeout(WAIT_S):
        response, data = await post(client)
    assert response.status == 502
    error = json.loads(data)["error"]
    assert error["code"] == "upstream_answer_too_large" and "1048576 bytes (max_answer_bytes)" in error["message"]
    assert state(node).fails == 1  # an answer no dsnode node sends: the upstream is broken


async def test_a_streamed_event_over_max_event_bytes_ends_the_stream_with_an_error(upstreams, edge):
    a = await upstreams("central-a", script=["huge-event"])
    _, client = await edge([(a.url, 1)], routing=CAPS)
    async with asyncio.timeout(WAIT_S):
        response, data = await post(client, {**BODY, "stream": True})
    events = sse_events(data)
    assert response.status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"] == " t0"
    error = json.loads(events[1])["error"]
    assert error["code"] == "upstream_answer_too_large" and "65536 bytes" in error["message"]


# --- the local fallback ---------------------------------------------------------------------------
async def test_a_long_prompt_that_fits_here_is_served_here_when_no_upstream_can_take_it(upstreams, edge, engine):
    a = await upstreams("central-a", models=(LOCAL_MODEL,))
    node, client = await edge([(a.url, 1)])
    records = []
    node.observers.append(records.append)
    await a.stop()  # the poller has not noticed yet
    body = {"model": LOCAL_MODEL, "prompt": LONG_PROMPT, "max_tokens": 2}
    response, data = await post(client, body)
    assert response.status == 200, data
    assert response.headers["X-DSNode-Route"] == "local"
    assert response.headers["X-DSNode-Node"] == "edge-under-test"
    record = records[-1]
    assert record.route == "local" and record.upstream is None
    assert "> long_prompt_tokens (16), but no upstream could take it (central-a: failed for this request" \
        in record.route_reason and record.route_reason.endswith("served here")
    assert len(engine.requests) == 1  # the local engine did serve it: the one request it may see here
    engine.requests.clear()


async def test_a_request_that_only_an_upstream_can_hold_still_gets_the_503(upstreams, edge):
    a = await upstreams("central-a", models=(LOCAL_MODEL,), max_context=4096)
    _, client = await edge([(a.url, 1)])
    await a.stop()
    response, data = await post(client, {"model": LOCAL_MODEL, "prompt": LONG_PROMPT, "max_tokens": 1000})
    assert response.status == 503 and json.loads(data)["error"]["code"] == "no_upstream"


async def test_a_503_names_the_last_failure_not_none(upstreams, edge):
    a = await upstreams("central-a", script=["hang-up"])
    node, client = await edge([(a.url, 1)], routing="max_fails = 1\nfail_timeout = 60")
    assert (await post(client))[0].status == 503  # no answer: a failure, the upstream is taken out
    seen = state(node).last_seen
    await polled_until(node, lambda: state(node).last_seen != seen)  # its next poll answers
    assert state(node).last_error == "connection lost"  # still why it is not healthy
    response, data = await post(client)
    message = json.loads(data)["error"]["message"]
    assert response.status == 503 and "down after 1 failure(s)" in message
    assert "last error: None" not in message and "last error: connection lost" in message


# --- the poller -----------------------------------------------------------------------------------

@pytest.mark.parametrize("body, why", [
    (b"[" * 100_000 + b"]" * 100_000, "nested more than 16 levels deep"),
    (b'{"node": ' + b'{"a": ' * 50 + b"1" + b"}" * 51, "nested more than 16 levels deep"),
    (b'{"node": {"name": "x", "pad": "' + b"p" * (2 * 1024 * 1024) + b'"}}', "at most 1048576 bytes"),
    (b'{"node": "\\ud800"}', "lone UTF-16 surrogate"),
])
async def test_a_hostile_advertisement_fails_that_poll_only(upstreams, edge, body, why):
    hostile = await upstreams("hostile", advert_body=body)
    good = await upstreams("central-b")
    node, client = await edge([(hostile.url, 1), (good.url, 1)], wait_healthy=1)
    await polled_until(node, lambda: state(node, 0).reachable is False)
    assert why in state(node, 0).last_error
    hostile.advert_body = None  # it answers properly again: polled again, healthy again
    await polled_until(node, lambda: state(node, 0).healthy)
    assert state(node, 1).healthy


async def test_a_poller_that_fails_is_restarted_and_counted(upstreams, edge, monkeypatch):
    a = await upstreams("central-a")
    real = Poller.poll_all
    calls: list[int] = []

    async def poll_all(self, timeout: float) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in the poller")
        await real(self, timeout)

    monkeypatch.setattr(Poller, "poll_all", poll_all)
    node, client = await edge([(a.url, 1)])  # waits until the restarted poller found it healthy
    assert state(node).healthy and node.upstreams.poller.restarts == 1
    metrics = await (await client.get("/metrics")).text()
    assert 'dsnode_background_task_restarts_total{task="dsnode-poller"} 1.0' in metrics
    assert 'dsnode_background_task_failing{task="dsnode-poller"} 0.0' in metrics
