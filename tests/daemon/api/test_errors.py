"""Every bad request gets OpenAI's error shape with the right status, and the node keeps serving.
On the fast tier's FakeEngine: the real app, scheduler and batching engine over a scripted runner, so
engine failures are scripted where they happen (a prefill, the decode after the first token)."""

from __future__ import annotations

import asyncio

import pytest
from dsnode.api.app import create_app

from tests.daemon.api.conftest import MODEL, make_node

OK = {"model": MODEL, "prompt": "It was", "max_tokens": 2, "temperature": 0}


def assert_openai_error(body, code=None, param=None):
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["type"], str)
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


async def still_serves(client):
    response = await client.post("/v1/completions", json=OK)
    assert response.status == 200
    assert (await response.json())["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    "path, body, status, code, param, words",
    [
        ("/v1/chat/completions", b"{not json", 400, "invalid_json", None, "not valid JSON"),
        ("/v1/chat/completions", b"[1, 2]", 400, None, None, "JSON object"),
        ("/v1/chat/completions", b'{"model": "tiny-dense"}', 400, "missing_parameter", "messages", "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', 400, "missing_parameter",
         "model", "model"),
        ("/v1/chat/completions", b'{"model": "tiny-dense", "messages": []}', 400, "invalid_value", "messages", None),
        ("/v1/chat/completions", b'{"model": "tiny-dense", "messages": [{"role": "wizard", "content": "x"}]}', 400,
         "invalid_value", "messages[0].role", None),
        ("/v1/completions", b'{"model": "nope", "prompt": "x"}', 404, "model_not_found", "model", "tiny-dense"),
        ("/v1/completions", b'{"model": "tiny-dense", "prompt": "x", "temperature": 5}', 400, "invalid_value",
         "temperature", "2"),
        ("/v1/completions", b'{"model": "tiny-dense", "prompt": "x", "top_p": 0}', 400, "invalid_value", "top_p", None),
        ("/v1/completions", b'{"model": "tiny-dense", "prompt": "x", "max_tokens": 0}', 400, "invalid_value",
         "max_tokens", None),
        ("/v1/completions", b'{"model": "tiny-dense", "prompt": "x", "max_tokens": "ten"}', 400, "invalid_value",
         "max_tokens", None),
        ("/v1/completions", b'{"model": "tiny-dense", "prompt": "x", "n": 17}', 400, "invalid_value", "n", "16"),
        ("/v1/completions", b'{"model": "tiny-dense", "prompt": "x", "presence_penalty": 2.5}', 400,
         "invalid_value", "presence_penalty", None),
        ("/v1/completions", b'{"model": "tiny-dense", "prompt": "x", "best_of": 2}', 400,
         "unsupported_value", "best_of", None),
        ("/v1/completions", b'{"model": "tiny-dense", "prompt": "x", "logit_bias": {"99999": 1}}', 400,
         "invalid_value", "logit_bias", "vocabulary"),
        ("/v1/completions", b'{"model": "tiny-dense", "prompt": ["a", "b", "c", "d", "e"], "n": 16}', 400, "invalid_value",
         "prompt", "prompts x n"),
        ("/v1/completions", b'{"model": "tiny-dense", "prompt": [1, 99999]}', 400, None, "prompt", "vocabulary"),
        ("/v1/completions", b'{"model": "tiny-dense", "prompt": "x", "stop": ["a","b","c","d","e","f","g","h","i",'
         b'"j","k","l","m","n","o","p","q"]}', 400, "invalid_value", "stop", "16"),
        ("/v1/chat/completions", b'{"model": "tiny-dense", "messages": [{"role": "user", "content": "x"}], '
         b'"tools": [{"type": "function"}]}', 400, "missing_parameter", "tools[0].function", None),
        ("/v1/chat/completions", b'{"model": "tiny-dense", "messages": [{"role": "user", "content": "x"}], '
         b'"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objet"}}}}',
         400, "invalid_schema", "response_format", "objet"),
        ("/v1/completions", b'{"model": "tiny-dense", "prompt": "x", "max_tokens": 5000}', 400,
         "context_length_exceeded", "prompt", "512"),
    ],
)
async def test_bad_requests(client, path, body, status, code, param, words):
    response = await client.post(path, data=body, headers={"Content-Type": "application/json"})
    assert response.status == status
    error = assert_openai_error(await response.json(), code, param)
    if words:
        assert words in error["message"]
    await still_serves(client)


async def test_context_error_names_the_numbers(client, node):
    long_prompt = "It was the best of times, " * 60
    prompt_tokens = len(node.engine.tokenizer.encode(long_prompt))
    response = await client.post("/v1/completions", json={**OK, "prompt": long_prompt, "max_tokens": 100})
    error = assert_openai_error(await response.json(), "context_length_exceeded", "prompt")
    assert response.status == 400
    assert f"{prompt_tokens + 100} tokens ({prompt_tokens} in the prompt, 100 for the completion)" in error["message"]
    assert "512" in error["message"]


async def test_unknown_path_and_method(client):
    response = await client.get("/v1/nothing")
    assert response.status == 404
    assert_openai_error(await response.json())
    response = await client.get("/v1/chat/completions")
    assert response.status == 405
    assert_openai_error(await response.json())
    assert response.headers["Allow"] == "POST"  # RFC 9110: a 405 lists the methods the path takes
    response = await client.request("TRACE", "/health")
    assert response.status == 405
    assert set(response.headers["Allow"].split(",")) >= {"GET", "HEAD"}


async def test_body_too_large_is_413(tmp_path, stub_model_dir, fake_engines, aiohttp_client):
    node = await make_node(tmp_path, stub_model_dir, fake_engines,
                           extra="[limits]\nmax_body_bytes = 2000\nmax_messages = 2\nmax_tokens = 8\n")
    node.engine.answer("and so on, ", eos=False)  # never ends by itself: only max_tokens stops it
    try:
        client = await aiohttp_client(create_app(node))
        response = await client.post("/v1/completions", json={**OK, "prompt": "x" * 5000})
        assert response.status == 413
        assert_openai_error(await response.json(), "request_too_large")
        messages = [{"role": "user", "content": "a"}] * 3
        response = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
        assert response.status == 400
        assert_openai_error(await response.json(), "too_many_messages", "messages")
        response = await client.post("/v1/completions", json={**OK, "max_tokens": 9})
        assert response.status == 400
        assert_openai_error(await response.json(), "max_tokens_too_large", "max_tokens")
        default = await (await client.post("/v1/completions", json={**OK, "max_tokens": None})).json()
        assert default["usage"]["completion_tokens"] == 8  # [limits] max_tokens is the default
        await still_serves(client)
    finally:
        await node.engine.close()


async def test_full_queue_answers_429_with_retry_after(tmp_path, stub_model_dir, fake_engines,
                                                       aiohttp_client):
    node = await make_node(tmp_path, stub_model_dir, fake_engines,
                           batching="max_running = 1\nmax_queue = 1\n")
    engine = node.engine
    try:
        client = await aiohttp_client(create_app(node))
        body = {**OK, "max_tokens": 150, "ignore_eos": True}
        engine.hold()  # the running request stops after its first token: one runs, one waits, two are refused
        posts = [asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in range(4)]
        async with asyncio.timeout(30):
            while sum(p.done() for p in posts) < 2:
                await asyncio.wait([p for p in posts if not p.done()], return_when=asyncio.FIRST_COMPLETED)
        assert sorted(p.result().status for p in posts if p.done()) == [429, 429]
        await engine.until_held()
        assert (engine.load_figures().running, engine.load_figures().waiting) == (1, 1)
        engine.resume()
        responses = await asyncio.gather(*posts)
        statuses = sorted(r.status for r in responses)
        assert statuses == [200, 200, 429, 429], statuses
        for response in responses:
            if response.status == 429:
                assert response.headers["Retry-After"].isdigit()
                assert_openai_error(await response.json(), "queue_full")
            else:
                assert (await response.json())["usage"]["completion_tokens"] == 150
        await still_serves(client)
    finally:
        await node.engine.close()


async def test_engine_failure_mid_stream_ends_the_stream_cleanly(client, engine):
    engine.hold()  # after the first token, the next decode waits
    response = await client.post("/v1/completions", json={**OK, "max_tokens": 20, "ignore_eos": True,
                                                          "stream": True})
    assert response.status == 200  # headers went out with the first token
    first = (await response.content.readline()).decode()
    await engine.until_held()
    engine.runner.fail_decode(RuntimeError("simulated device error"))  # the decode that is waiting
    engine.resume()
    raw = first + (await response.read()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert events[0].startswith("data: {") and '"error"' not in events[0]
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2] and "simulated device error" in events[-2]
    await still_serves(client)


async def test_engine_failure_before_first_token_is_500(client, engine):
    engine.fail_next_prefill("simulated prefill failure")
    response = await client.post("/v1/completions", json=OK)
    assert response.status == 500
    error = assert_openai_error(await response.json(), "engine_error")
    assert error["type"] == "server_error" and "simulated prefill failure" in error["message"]
    await still_serves(client)


async def test_a_client_gone_before_a_write_is_499_not_a_server_error(client, node, monkeypatch):
    """The race the soak test (tests/e2e/test_soak.py) met: the client hangs up and a write fails
    before aiohttp cancels the handler. That is the client's doing: 499, no `unhandled_error`."""
    import aiohttp
    from aiohttp import web
    from aiohttp.client_exceptions import ClientConnectionResetError
    from structlog.testing import capture_logs

    real_write, writes = web.StreamResponse.write, {"n": 0}

    async def write(self, data):
        writes["n"] += 1
        if writes["n"] == 3:  # as aiohttp finds it: the connection is closing, the handler still runs
            self._req.transport.close()
            raise ClientConnectionResetError("Cannot write to closing transport")
        return await real_write(self, data)

    records = []
    node.observers.append(records.append)
    monkeypatch.setattr(web.StreamResponse, "write", write)
    try:
        with capture_logs() as logs:
            async with asyncio.timeout(60):
                response = await client.post("/v1/completions", json={**OK, "max_tokens": 20,
                                                                      "ignore_eos": True, "stream": True})
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
            async with asyncio.timeout(60):
                while not records:
                    await asyncio.sleep(0.01)
    finally:
        node.observers.remove(records.append)
        monkeypatch.undo()
    assert [r.status for r in records] == [499]
    assert not [e for e in logs if e["event"] == "unhandled_error"]
    assert node.engine.load_figures().running == 0
    await still_serves(client)
