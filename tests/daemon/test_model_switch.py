"""A reload onto another model version (`dsnode.model_switch`), in process, over HTTP: beside the old
engine (nothing waits; answers switch version at one moment; the old engine closes after its last
request), after draining it (not ready meanwhile), a new version that fails to load, the choice of
mode, a split the cluster does not serve (refused), and an engine failure after a switch.

The engines are the fast tier's FakeEngine; `server.build` makes the one of each new `[model]`."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import pytest
from dsnode.model_switch import plan_switch
from structlog.testing import capture_logs

from tests.daemon.test_shutdown import MAX_CONTEXT, MODEL, WAIT_S, chat, running, signal_self, until  # noqa: F401
from tests.support.engines import FakeEngine
from tests.support.fake_nodes import stub_model_dir  # noqa: F401 - a session fixture
from tests.support.tokenizer import fast_tokenizer, fast_tokenizer_dir  # noqa: F401 - session fixtures


@pytest.fixture
def tokenizer(fast_tokenizer):  # noqa: F811 - the session fixture imported above
    return fast_tokenizer


def engine_for(tokenizer, reply: str, **options) -> FakeEngine:
    return FakeEngine(tokenizer, name=MODEL, max_context=MAX_CONTEXT, reply=reply, **options)


def relabel(node, label: str, switch: str) -> None:
    text = node.config_path.read_text().split("\n[model]")[0]
    node.config_path.write_text(text + f'\n[model]\nname = "{MODEL}"\npath = "{node.server.config.model.path}"\n'
                                f'backend = "transformers"\nthreads = 1\nlabel = "{label}"\nswitch = "{switch}"\n')


async def complete(session: aiohttp.ClientSession, url: str) -> tuple[int, str | None, dict]:
    async with session.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3}) as r:
        return r.status, r.headers.get("X-DSNode-Version"), await r.json()


async def test_beside_the_new_version_takes_new_requests_and_the_old_finishes_its_own(running, tokenizer):
    old = engine_for(tokenizer, "old version")
    node = running(old, extra='label = "v1"')
    await node.until_message("READY=1")
    gate = asyncio.Event()
    new = engine_for(tokenizer, "new version", load_gate=gate)
    built = []
    node.server.build = lambda config: built.append(config) or new
    timeout = aiohttp.ClientTimeout(total=WAIT_S)
    async with aiohttp.ClientSession(timeout=timeout) as held, aiohttp.ClientSession(timeout=timeout) as session:
        relabel(node, "v2", "beside")
        signal_self(signal.SIGHUP)
        await until(lambda: built)
        assert (await complete(session, node.url))[:2] == (200, "v1")  # while v2 loads, v1 serves
        old.hold()
        stream = await held.post(node.url + "/v1/chat/completions", json=chat(stream=True, max_tokens=4))
        assert stream.headers["X-DSNode-Version"] == "v1"
        await stream.content.readline()  # its first token came from the old engine, now held
        gate.set()
        await until(lambda: node.server.node.served.id == "v2")
        assert node.server.config.model.label == "v2"  # what a reload compares with, while v1 still serves
        status, version, body = await complete(session, node.url)
        assert (status, version, body["choices"][0]["text"]) == (200, "v2", "new version"[:len(body["choices"][0]["text"])])
        assert not old.runner.closed  # a request still holds it
        old.resume()
        events = (await stream.read()).decode()
        assert events.endswith("data: [DONE]\n\n") and '"error"' not in events
        stream.release()
    await until(lambda: old.runner.closed)  # closed once its last request was done
    assert not new.runner.closed and built[0].model.label == "v2"
    assert node.server.engine is new and node.server.config.model.label == "v2"
    node.server.stop()
    assert await node.exit_code() == 0
    assert new.runner.closed


async def test_after_draining_the_node_takes_no_new_request_until_the_new_version_serves(running, tokenizer):
    old = engine_for(tokenizer, "old version")
    node = running(old, extra='label = "v1"')
    await node.until_message("READY=1")
    gate = asyncio.Event()
    new = engine_for(tokenizer, "new version", load_gate=gate)
    node.server.build = lambda config: new
    old.hold()
    timeout = aiohttp.ClientTimeout(total=WAIT_S)
    async with aiohttp.ClientSession(timeout=timeout) as held, aiohttp.ClientSession(timeout=timeout) as session:
        whole = asyncio.ensure_future(held.post(node.url + "/v1/completions",
                                                json={"model": MODEL, "prompt": "Hi", "max_tokens": 3}))
        await until(lambda: len(old.requests) == 1)
        relabel(node, "v2", "drain")
        signal_self(signal.SIGHUP)
        await until(lambda: node.server.node.switching is not None)
        async with session.get(node.url + "/ready") as ready:
            assert ready.status == 503 and "draining the requests in flight" in (await ready.json())["reason"]
        status, _, body = await complete(session, node.url)
        assert status == 503 and body["error"]["code"] == "not_ready"
        assert len(new.requests) == 0 and not gate.is_set()
        old.resume()
        answer = await asyncio.wait_for(whole, WAIT_S)
        assert answer.status == 200 and answer.headers["X-DSNode-Version"] == "v1"
        answer.release()
        await until(lambda: old.runner.closed)  # drained, closed, then the new one loads
        async with session.get(node.url + "/ready") as ready:
            assert ready.status == 503 and "loading" in (await ready.json())["reason"]
        gate.set()
        await until(lambda: node.server.node.switching is None)
        status, version, _ = await complete(session, node.url)
        assert (status, version) == (200, "v2")
    node.server.stop()
    assert await node.exit_code() == 0


async def test_a_version_that_does_not_load_leaves_the_old_one_serving(running, tokenizer):
    old = engine_for(tokenizer, "old version")
    node = running(old, extra='label = "v1"')
    await node.until_message("READY=1")
    built = []

    def build(config):  # every new version is broken; v1 loads again
        broken = None if config.model.label == "v1" else "no weights here"
        engine = engine_for(tokenizer, "v1 again", load_error=broken)
        built.append(engine)
        return engine

    node.server.build = build
    with capture_logs() as logs:
        relabel(node, "v2", "beside")
        signal_self(signal.SIGHUP)
        await node.until_message("RELOADING=1")
        await node.until_message("READY=1")
    assert [e["event"] for e in logs if e["event"].startswith("model_switch")] == [
        "model_switch_started", "model_switch_failed"]
    assert node.server.engine is old and node.server.node.served.id == "v1"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as session:
        assert (await complete(session, node.url))[:2] == (200, "v1")
    # after draining: the old one is closed by then, so the previous version is loaded again
    relabel(node, "v3", "drain")
    signal_self(signal.SIGHUP)
    await until(lambda: len(built) == 3 and node.server.node.switching is None and node.server.engine.health().ready)
    assert node.server.node.served.id == "v1" and old.runner.closed
    node.server.stop()
    assert await node.exit_code() == 0


async def test_the_engine_in_service_after_a_switch_is_the_one_watched(running, tokenizer):
    node = running(engine_for(tokenizer, "old"), extra='label = "v1"')
    await node.until_message("READY=1")
    new = engine_for(tokenizer, "new")
    node.server.build = lambda config: new
    relabel(node, "v2", "beside")
    signal_self(signal.SIGHUP)
    await until(lambda: node.server.node.served.id == "v2")
    await node.until_message("READY=1")
    new.die("the device was lost")
    assert await node.exit_code() == 1


async def test_a_split_that_names_what_no_node_serves_is_refused_and_the_old_settings_stay(running):
    node = running(extra='label = "v1"')
    await node.until_message("READY=1")
    text = node.config_path.read_text()
    node.config_path.write_text(text + f'\n[limits]\nmax_tokens = 1\n\n[routing.split."{MODEL}"]\n'
                                '"v1" = 90\n"v9" = 10\n\n[routing.split.nowhere]\n"v1" = 100\n')
    with capture_logs() as logs:
        signal_self(signal.SIGHUP)
        await node.until_message("RELOADING=1")
        ready = await node.until_message("READY=1")
    assert ready.endswith("; the last reload was refused (see the journal)")
    [failed] = [e for e in logs if e["event"] == "config_reload_failed"]
    path = str(node.config_path)
    assert failed["problems"] == [
        f"{path}: routing.split.{MODEL}.v9: no node serves version v9 of `{MODEL}` (versions served: v1)",
        f"{path}: routing.split.nowhere: no node serves a model `nowhere` (models served: {MODEL})"]
    assert node.server.config.limits.max_tokens is None and node.server.node.splits.models == {}
    node.config_path.write_text(text + f'\n[routing.split."{MODEL}"]\n"v1" = 100\n')
    signal_self(signal.SIGHUP)
    await until(lambda: MODEL in node.server.node.splits.models)
    node.server.stop()
    assert await node.exit_code() == 0


def test_the_mode_is_beside_only_where_memory_is_known_to_allow():
    gib = 2**30
    assert plan_switch("auto", 10 * gib, 20 * gib).mode == "beside"
    assert plan_switch("auto", 10 * gib, 12 * gib) == plan_switch("auto", 10 * gib, 12 * gib)
    assert plan_switch("auto", 10 * gib, 12 * gib).mode == "drain"  # 12.5 GiB needed with the headroom
    assert plan_switch("auto", 10 * gib, None).why == "the free memory is not known"
    assert plan_switch("auto", None, 20 * gib).mode == "drain"
    assert plan_switch("beside", 10 * gib, 1).mode == "beside"
    assert plan_switch("drain", 1, 20 * gib).mode == "drain"
    assert json.dumps(plan_switch("auto", gib, 4 * gib).why) == '"1.2 GiB needed, 4.0 GiB free"'


async def test_a_reload_may_switch_the_version_and_name_it_in_a_split_at_once(running, tokenizer):
    node = running(engine_for(tokenizer, "old"), extra='label = "v1"')
    await node.until_message("READY=1")
    node.server.build = lambda config: engine_for(tokenizer, "new")
    relabel(node, "v2", "beside")
    text = node.config_path.read_text()
    node.config_path.write_text(text + f'\n[routing.split."{MODEL}"]\n"v2" = 100\n')
    signal_self(signal.SIGHUP)
    await until(lambda: node.server.node.served.id == "v2" and MODEL in node.server.node.splits.models)
    node.config_path.write_text(text + f'\n[routing.split."{MODEL}"]\n"v2" = 60\n"v3" = 50\n')  # 110: refused
    with capture_logs() as logs:
        signal_self(signal.SIGHUP)
        await until(lambda: any(e["event"] == "config_reload_failed" for e in logs))
    [failed] = [e for e in logs if e["event"] == "config_reload_failed"]
    assert failed["problems"] == [f"{node.config_path}: routing.split.{MODEL}: the shares must sum to 100 "
                                  "(got 60 + 50 = 110)"]
    assert node.server.node.splits.models[MODEL].shares == {"v2": 100}
    node.server.stop()
    assert await node.exit_code() == 0
