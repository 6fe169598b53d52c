"""The node's life outside systemd, in process: start, ready, reload, stop with a drain.

The engine is the fast tier's `FakeEngine` (the real `BatchingEngine` over a scripted runner). Held
(`engine.hold()`), it gives a request its first token and nothing more until `engine.resume()`, which
makes "a request is in flight when the stop comes" a fact rather than a race; its close() is
BatchingEngine's own. One test (`model`) drives the real transformers engine to show its close() fails
what is left the same clean way. Every server listens on a real loopback port and is driven over HTTP;
systemd's side is a datagram socket the test reads."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from dsnode.config import load_config
from dsnode.inference.engine import Engine
from dsnode.inference.tokenizer import TextTokenizer
from dsnode.server import STOP_MARGIN_S, NodeServer
from dsnode.systemd import SystemdEnv

from tests.support.engines import FakeEngine
from tests.support.fake_nodes import MAX_CONTEXT, stub_model_dir  # noqa: F401 - a session fixture
from tests.support.nodes import free_port
from tests.support.tokenizer import fast_tokenizer, fast_tokenizer_dir  # noqa: F401 - session fixtures

MODEL = "tiny-gated"
WAIT_S = 60.0  # a safety net against hangs, never a measurement
REPLY = "Hello world, said the fake model."


# --- fixtures -------------------------------------------------------------------------------------
@pytest.fixture
def tokenizer(fast_tokenizer) -> TextTokenizer:  # noqa: F811 - the session fixture imported above
    return fast_tokenizer


def fake_engine(tokenizer: TextTokenizer, **options: Any) -> FakeEngine:
    return FakeEngine(tokenizer, name=MODEL, max_context=MAX_CONTEXT, reply=REPLY, **options)


def reply_cut_at(tokenizer: TextTokenizer, max_tokens: int) -> str:
    """The scripted reply as a request with this max_tokens gets it."""
    return tokenizer.decode(tokenizer.encode(REPLY, add_special_tokens=False)[:max_tokens])


def write_config(path: Path, model_dir: Path, port: int, drain_timeout: float, extra: str = "") -> Path:
    path.write_text(f"""[node]
name = "node-under-test"
role = "central"
listen = "127.0.0.1:{port}"
drain_timeout = {drain_timeout}

[model]
name = "{MODEL}"
path = "{model_dir}"
backend = "transformers"
threads = 1
{extra}
""")
    return path


class Running:
    """A NodeServer.run() task on this loop, its URL, and the notify socket systemd would read
    (read all the time, as PID 1 does, so the sender never waits on a full queue)."""

    def __init__(self, tmp_path: Path, model_dir: Path, engine: Engine | None, drain_timeout: float = 30.0,
                 watchdog_usec: int | None = None, extra: str = "") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = write_config(tmp_path / "dsnode.toml", model_dir, self.port, drain_timeout, extra)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp_path / "notify"))
        self.notify.setblocking(False)
        env = SystemdEnv(str(tmp_path / "notify"), watchdog_usec)
        self.server = NodeServer(load_config(self.config_path), engine=engine, systemd=env)
        self.task: asyncio.Task[int] | None = None
        self.reader: asyncio.Task[None] | None = None
        self.messages: list[str] = []
        self._seen = 0
        self._arrived = asyncio.Event()

    def start(self) -> "Running":
        loop = asyncio.get_running_loop()
        self.reader = loop.create_task(self._read())
        self.task = loop.create_task(self.server.run())
        return self

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.messages.append((await loop.sock_recv(self.notify, 65536)).decode())
            self._arrived.set()

    async def until_message(self, prefix: str = "") -> str:
        """The next message (after the last one returned) that starts with `prefix`."""
        async with asyncio.timeout(WAIT_S):
            while True:
                while self._seen < len(self.messages):
                    self._seen += 1
                    if self.messages[self._seen - 1].startswith(prefix):
                        return self.messages[self._seen - 1]
                self._arrived.clear()
                await self._arrived.wait()

    async def next_message(self) -> str:
        return await self.until_message("")

    async def exit_code(self) -> int:
        assert self.task is not None
        return await asyncio.wait_for(self.task, WAIT_S)

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.server.stop()
            self.server.stop()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        self.notify.close()


@pytest.fixture
async def running(tmp_path, stub_model_dir, tokenizer):  # noqa: F811 - the session fixture imported above
    made: list[Running] = []

    def make(engine: Engine | None = None, **kwargs: Any) -> Running:
        node = Running(tmp_path, stub_model_dir, engine if engine is not None else fake_engine(tokenizer),
                       **kwargs)
        made.append(node)
        return node.start()

    yield make
    for node in made:
        await node.close()


def chat(stream: bool, max_tokens: int = 2) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens,
            "stream": stream}


async def sse_events(response: aiohttp.ClientResponse) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    body = (await response.read()).decode()
    return [block[len("data: "):] for block in body.split("\n\n") if block.startswith("data: ")]


def signal_self(sig: signal.Signals) -> None:
    """As `kill` would, but only once NodeServer.run() has its handler in place (SIGTERM or
    SIGHUP with the default action would end the whole test session)."""
    assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.SIG_IGN, None), f"no handler for {sig!r}"
    os.kill(os.getpid(), sig)


async def until(predicate: Any) -> None:
    async with asyncio.timeout(WAIT_S):
        while not predicate():
            await asyncio.sleep(0.01)


# --- start ----------------------------------------------------------------------------------------
async def test_ready_is_announced_only_once_the_port_serves_the_loaded_model(running, tokenizer):
    loaded = asyncio.Event()
    node = running(fake_engine(tokenizer, load_gate=loaded))
    assert (await node.next_message()).startswith("STATUS=starting")
    assert (await node.next_message()).startswith(f"STATUS=loading model {MODEL} (transformers)")
    async with aiohttp.ClientSession() as session:
        async with session.get(node.url + "/ready") as resp:  # listening while loading: not ready yet
            assert resp.status == 503
        loaded.set()
        ready = await node.until_message("READY=1")
        async with session.get(node.url + "/ready") as resp:
            assert resp.status == 200
    assert ready == f"READY=1\nSTATUS=serving 1 model ({MODEL}, fake on cpu) at {node.url}"
    assert not any(m.startswith("READY=1") for m in node.messages[:-1])
    node.server.stop()
    assert await node.exit_code() == 0


async def test_watchdog_pings_while_serving_and_while_draining(running, tokenizer):
    engine = fake_engine(tokenizer)
    node = running(engine, watchdog_usec=20_000)
    await node.until_message("WATCHDOG=1")
    await node.until_message("READY=1")
    await node.until_message("WATCHDOG=1")
    engine.hold()
    async with aiohttp.ClientSession() as session:
        async with session.post(node.url + "/v1/chat/completions", json=chat(stream=True)) as resp:
            await resp.content.readline()
            node.server.stop()
            await node.until_message("STOPPING=1")
            await node.until_message("WATCHDOG=1")  # a long drain is not a dead loop
            engine.resume()
            events = await sse_events(resp)
    assert events[-1] == "[DONE]" and not any("error" in json.loads(e) for e in events[:-1])
    assert await node.exit_code() == 0


async def test_stop_while_loading_exits_0_without_ready(running, tokenizer):
    node = running(fake_engine(tokenizer, load_gate=asyncio.Event()))  # never finishes loading
    await node.until_message("STATUS=loading")
    node.server.stop()
    assert await node.exit_code() == 0
    assert node.server.stopped_while_loading
    assert not any(m.startswith("READY=1") for m in node.messages)


async def test_a_model_that_fails_to_load_exits_1(running, tokenizer):
    node = running(fake_engine(tokenizer, load_error="no weights here"))
    assert await node.exit_code() == 1
    await node.until_message("STOPPING=1")
    assert "STATUS=failed: model tiny-gated did not load (see the journal)" in node.messages
    assert not any(m.startswith("READY=1") for m in node.messages)


# --- reload ---------------------------------------------------------------------------------------
async def test_sighup_reloads_between_reloading_and_ready(running):
    node = running()
    await node.until_message("READY=1")
    assert node.server.config.limits.max_tokens is None
    text = node.config_path.read_text()
    node.config_path.write_text(text + "\n[limits]\nmax_tokens = 1\n")
    signal_self(signal.SIGHUP)  # the handler on this loop takes it, as in `dsnode serve`
    reloading = await node.until_message("RELOADING=1")
    assert "\nMONOTONIC_USEC=" in reloading
    ready = await node.until_message("READY=1")
    assert ready.startswith("READY=1\nSTATUS=serving 1 model") and "refused" not in ready
    assert node.server.config.limits.max_tokens == 1
    async with aiohttp.ClientSession() as session:
        async with session.post(node.url + "/v1/chat/completions", json=chat(False, max_tokens=2)) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "max_tokens_too_large"

    node.config_path.write_text(text + "\n[limits]\nmax_tokens = -3\n")  # invalid: refused, old stays
    signal_self(signal.SIGHUP)
    await node.until_message("RELOADING=1")
    ready = await node.until_message("READY=1")
    assert ready.endswith("; the last reload was refused (see the journal)")
    assert node.server.config.limits.max_tokens == 1
    node.server.stop()
    assert await node.exit_code() == 0


async def test_a_sighup_during_a_reload_makes_one_more(running, monkeypatch):
    """The file may have changed again after the running reload read it: the newest must win."""
    import threading

    from dsnode import server as server_module

    node = running()
    await node.until_message("READY=1")
    reading, release = threading.Event(), threading.Event()

    def slow_load(path, *args, **kwargs):
        config = load_config(path, *args, **kwargs)
        reading.set()
        release.wait(WAIT_S)
        return config

    monkeypatch.setattr(server_module, "load_config", slow_load)
    text = node.config_path.read_text()
    node.config_path.write_text(text + "\n[limits]\nmax_tokens = 1\n")
    signal_self(signal.SIGHUP)
    await node.until_message("RELOADING=1")
    await asyncio.to_thread(reading.wait, WAIT_S)  # the first reload has read max_tokens = 1
    node.config_path.write_text(text + "\n[limits]\nmax_tokens = 2\n")
    signal_self(signal.SIGHUP)
    await until(lambda: node.server._reload_wanted)
    release.set()
    await node.until_message("READY=1")
    await node.until_message("RELOADING=1")
    await node.until_message("READY=1")
    assert node.server.config.limits.max_tokens == 2
    node.server.stop()
    assert await node.exit_code() == 0


# --- stop -----------------------------------------------------------------------------------------
async def test_stop_drains_in_flight_requests_to_completion(running, tokenizer):
    engine = fake_engine(tokenizer)
    node = running(engine, drain_timeout=600)
    await node.until_message("READY=1")
    engine.hold()
    async with aiohttp.ClientSession() as streaming, aiohttp.ClientSession() as waiting, \
            aiohttp.ClientSession() as kept_alive:
        async with kept_alive.get(node.url + "/health") as resp:  # leaves an idle keep-alive connection
            assert resp.status == 200
        stream = await streaming.post(node.url + "/v1/chat/completions", json=chat(stream=True))
        assert stream.status == 200
        first = json.loads((await stream.content.readline()).decode()[len("data: "):])
        whole = asyncio.ensure_future(waiting.post(node.url + "/v1/completions",
                                                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}))
        await until(lambda: len(engine.requests) == 2)

        signal_self(signal.SIGTERM)
        stopping = await node.until_message("STOPPING=1")
        assert stopping == f"STOPPING=1\nSTATUS=draining: 2 requests in flight, up to 600s more\n" \
                           f"EXTEND_TIMEOUT_USEC={int((600 + STOP_MARGIN_S) * 1e6)}"
        await until(lambda: node.server.node.draining)
        # no new connections; a request on an open connection is told the node is going away
        async with aiohttp.ClientSession() as fresh:
            with pytest.raises(aiohttp.ClientConnectionError):
                await fresh.get(node.url + "/health")
        async with kept_alive.post(node.url + "/v1/chat/completions", json=chat(False)) as resp:
            assert resp.status == 503 and (await resp.json())["error"]["code"] == "draining"
        async with kept_alive.get(node.url + "/ready") as resp:
            assert resp.status == 503

        engine.resume()  # the in-flight ones finish normally
        events = await sse_events(stream)
        stream.release()
        answer = await asyncio.wait_for(whole, WAIT_S)
        assert answer.status == 200
        body = await answer.json()
        answer.release()

    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "length"
    assert not any("error" in json.loads(e) for e in events[:-1])
    assert body["choices"][0]["text"] == reply_cut_at(tokenizer, 2)
    assert body["choices"][0]["finish_reason"] == "length"
    assert engine.aborted == []
    assert await node.exit_code() == 0


async def test_what_outlives_the_drain_ends_with_a_clean_error(running, tokenizer):
    engine = fake_engine(tokenizer)
    node = running(engine, drain_timeout=0.2)
    await node.until_message("READY=1")
    engine.hold()  # for good: one token each at most, far from max_tokens
    async with aiohttp.ClientSession() as streaming, aiohttp.ClientSession() as waiting:
        stream = await streaming.post(node.url + "/v1/chat/completions",
                                      json=chat(stream=True, max_tokens=50))
        await stream.content.readline()
        whole = asyncio.ensure_future(waiting.post(node.url + "/v1/chat/completions",
                                                   json=chat(False, max_tokens=50)))
        await until(lambda: len(engine.requests) == 2)
        node.server.stop()  # and never finish them
        events = await sse_events(stream)
        stream.release()
        answer = await asyncio.wait_for(whole, WAIT_S)
        error = await answer.json()
        answer.release()

    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["message"].endswith("the node is shutting down")
    assert answer.status == 503
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "service_unavailable"
    assert await node.exit_code() == 0


async def test_a_second_signal_cuts_the_drain_short(running, tokenizer):
    engine = fake_engine(tokenizer)
    node = running(engine, drain_timeout=3600)
    await node.until_message("READY=1")
    engine.hold()  # for good
    async with aiohttp.ClientSession() as session:
        stream = await session.post(node.url + "/v1/chat/completions", json=chat(stream=True, max_tokens=50))
        await stream.content.readline()
        node.server.stop()
        await node.until_message("STOPPING=1")
        node.server.stop()  # an impatient operator: Ctrl-C twice
        events = await sse_events(stream)
        stream.release()
    assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    assert await node.exit_code() == 0


@pytest.mark.slow
@pytest.mark.model
async def test_the_real_engine_fails_what_outlives_the_drain_cleanly(running, tmp_path, dense_dir):
    """BatchingEngine.close() is what the drain relies on: the running and the queued requests
    (max_running = 1, each asking for 400 tokens) all end with an error event, none hangs."""
    from dsnode.inference.backends import build_engine

    config = write_config(tmp_path / "real.toml", dense_dir, free_port(), 0.05, "\n[batching]\nmax_running = 1\n")
    engine = build_engine(load_config(config))
    node = running(engine, drain_timeout=0.05)
    await node.until_message("READY=1")
    ask = {**chat(stream=True, max_tokens=400), "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        async def one() -> tuple[int, str]:
            async with session.post(node.url + "/v1/chat/completions", json=ask) as resp:
                return resp.status, (await resp.read()).decode()

        asks = [asyncio.ensure_future(one()) for _ in range(3)]
        await until(lambda: node.server.node.in_flight == 3)
        node.server.stop()
        results = await asyncio.wait_for(asyncio.gather(*asks), WAIT_S)
    cut = 0
    for status, body in results:
        if status == 503:  # still queued when the engine closed: an OpenAI error, before any header
            assert json.loads(body)["error"]["code"] == "shutting_down"
            cut += 1
            continue
        assert status == 200
        events = [block[len("data: "):] for block in body.split("\n\n") if block.startswith("data: ")]
        assert events[-1] == "[DONE]"
        if "error" in json.loads(events[-2]):  # cut mid-stream: an error event, then [DONE]
            assert json.loads(events[-2])["error"]["code"] == "shutting_down"
            cut += 1
    assert cut, "every request finished within the 50 ms drain: the test proved nothing"
    assert await node.exit_code() == 0
