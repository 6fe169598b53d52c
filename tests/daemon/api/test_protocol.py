"""What aiohttp refuses before any handler runs (a broken request head, an unknown encoding), as
`dsnode serve` runs it (`dsnode.api.protocol.Runner`): a 400 in OpenAI's error shape, one log event
per refusal, one line each, and never a key from the refused head in the log."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from aiohttp import web
from dsnode.api.app import create_app
from dsnode.api.protocol import Runner
from dsnode.logs import configure_logging

KEY = b"sk-live-7f3c9a1e5b2d4c6e8a0b"
PEER = b"v2 1800000000 9f2e boot-mac 0a1b2c central-1 edge-1"
HEADS = {  # each with a credential in it, quoted back by aiohttp's parser unless we stop it
    "control character": b"Authorization: Bearer " + KEY + b"\x01\r\n",
    "space before the colon": b"Authorization : Bearer " + KEY + b"\r\n",
    "obs-fold": b"Authorization: Bearer\r\n " + KEY + b"\r\n",
    "line over 8190 bytes": b"Authorization: Bearer " + KEY + b"x" * 9000 + b"\r\n",
    "name over 8190 bytes": b"X-" + b"a" * 9000 + b": Bearer " + KEY + b"\r\n",
    "cookie": b"Cookie: session=" + KEY + b"\x7f\r\n",
    "peer credential": b"X-DSNode-Peer: " + PEER + b"\x00\r\n",
}
OTHERS = {  # protocol-level 400s without a secret in them
    "no host": b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    "bad content-length": b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 2x\r\n\r\n{}",
    "unknown encoding": b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\n{}",
    "bad chunk": b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
}


@pytest.fixture
async def served(node, restore_logging):
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    runner = Runner(create_app(node), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield site._server.sockets[0].getsockname()[1], out
    await runner.cleanup()


async def exchange(port: int, data: bytes) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


def assert_openai_400(head: bytes, body: bytes) -> dict:
    assert head.split(b"\r\n")[0].endswith(b"400 Bad Request"), head
    assert b"Content-Type: application/json" in head
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "bad_http_request" and error["type"] == "invalid_request_error"
    return error


async def test_a_refused_head_is_a_400_in_openai_shape_and_its_key_never_reaches_the_log(served):
    port, out = served
    for what, line in HEADS.items():
        head, body = await exchange(port, b"POST /v1/completions HTTP/1.1\r\nHost: a\r\n" + line +
                                    b"Content-Length: 2\r\n\r\n{}")
        error = assert_openai_400(head, body)
        assert KEY.decode() not in error["message"] and b"mac" not in body, what
    text = out.getvalue()
    assert KEY.decode() not in text and "boot-mac" not in text
    events = [json.loads(line) for line in text.splitlines()]  # one JSON event per line, nothing else
    refusals = [e for e in events if e["event"] == "bad_http_request"]
    assert len(refusals) == len(HEADS) and {e["level"] for e in refusals} == {"warning"}
    assert "a request line or header is longer than 8190 bytes" in {e["error"] for e in refusals}


async def test_other_protocol_errors_are_400s_in_openai_shape(served):
    port, out = served
    for what, data in OTHERS.items():
        head, body = await exchange(port, data)
        assert assert_openai_400(head, body)["message"].startswith("Bad HTTP request: "), what
    assert all(json.loads(line)["event"] == "bad_http_request" for line in out.getvalue().splitlines())


async def test_a_library_logging_a_request_is_redacted_and_one_line(served):
    _, out = served
    try:
        raise ValueError("header b'Authorization: Bearer " + KEY.decode() + "' refused\nsecond line")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s: Cookie: s=%s", "10.0.0.9",
                                                      KEY.decode())
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and KEY.decode() not in lines[0]
    event = json.loads(lines[0])
    assert (event["event"], event["level"], event["logger"]) == ("library_log", "error", "aiohttp.server")
    assert event["message"] == "Error handling request from 10.0.0.9: Cookie: <redacted>"
    assert "ValueError: header b'Authorization: <redacted>' refused\nsecond line" in event["error"]  # the traceback
