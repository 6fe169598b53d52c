"""Hostile and clumsy bodies against a real node: each is a 400 in OpenAI's shape naming what is
wrong, never a 500 — lone surrogates, nesting 100,000 deep, huge integers, a body that does not
match its Content-Encoding, an empty prompt — and the node serves the next request as ever."""

from __future__ import annotations

import gzip
import zlib

import pytest

from tests.daemon.api.conftest import MODEL
from tests.daemon.api.test_errors import assert_openai_error, still_serves

JSON = {"Content-Type": "application/json"}
PLAIN = b'{"model": "tiny-dense", "prompt": "It was", "max_tokens": 2, "temperature": 0}'


async def post(client, path: str, data: bytes, headers: dict[str, str] | None = None):
    response = await client.post(path, data=data, headers={**JSON, **(headers or {})})
    return response, await response.json()


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", b'{"model": "tiny-dense", "prompt": "hi \\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"model": "tiny-dense", "prompt": ["\\udfff"], "max_tokens": 2}', "prompt[0]"),
    ("/v1/chat/completions", b'{"model": "tiny-dense", "messages": [{"role": "user", "content": "\\ud83d"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", b'{"model": "tiny-dense", "messages": [{"role": "user", "content": '
     b'[{"type": "text", "text": "a\\udc00b"}]}]}', "messages[0].content[0].text"),
    ("/v1/completions", b'{"model": "tiny-dense", "prompt": "x", "stop": ["\\ud800"]}', "stop[0]"),
])
async def test_a_lone_surrogate_is_a_400_naming_where_it_is(client, path, body, param):
    response, error = await post(client, path, body)
    assert response.status == 400
    assert "lone UTF-16 surrogate" in assert_openai_error(error, "invalid_unicode", param)["message"]
    await still_serves(client)


async def test_a_surrogate_pair_is_text_and_served(client):
    response, body = await post(client, "/v1/completions",
                                b'{"model": "tiny-dense", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}')
    assert response.status == 200, body


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"model": "tiny-dense", "prompt": "x", "extra": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}",
    b'{"model": "tiny-dense", "messages": [{"role": "user", "content": ' + b"[" * 70 + b"]" * 70 + b"}]}",
])
async def test_json_nested_deeper_than_the_bound_is_a_400(client, body):
    response, error = await post(client, "/v1/chat/completions", body)
    assert response.status == 400
    assert "nested more than 64 levels deep" in assert_openai_error(error, "json_too_deep")["message"]
    await still_serves(client)


@pytest.mark.parametrize("body", [
    b'{"model": "tiny-dense", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
    b'{"model": "tiny-dense", "prompt": "\xed\xa0\x80"}',  # a surrogate encoded as (invalid) UTF-8
    b'{"model": "tiny-dense", "prompt": "\xc0\xaf"}',  # an overlong encoding
])
async def test_what_json_loads_chokes_on_otherwise_is_a_400(client, body):
    response, error = await post(client, "/v1/completions", body)
    assert response.status == 400
    assert_openai_error(error, "invalid_json")


@pytest.mark.parametrize("encoding, data", [
    ("gzip", PLAIN),  # says gzip, is not
    ("deflate", PLAIN),
    ("gzip", b"\x1f\x8b\x08\x00" + PLAIN),  # a gzip header, then garbage
])
async def test_a_body_that_does_not_match_its_content_encoding_is_a_400(client, encoding, data):
    response, error = await post(client, "/v1/completions", data, {"Content-Encoding": encoding})
    assert response.status == 400
    message = assert_openai_error(error, "invalid_body")["message"]
    assert f"cannot be decoded as its Content-Encoding ({encoding})" in message
    await still_serves(client)


async def test_a_gzip_body_cut_short_is_a_400(client):
    response, error = await post(client, "/v1/completions", gzip.compress(PLAIN)[:-12], {"Content-Encoding": "gzip"})
    assert response.status == 400
    assert_openai_error(error, "invalid_json")  # what decodes of it is half a JSON object
    await still_serves(client)


@pytest.mark.parametrize("encoding, encode", [("gzip", gzip.compress), ("deflate", zlib.compress)])
async def test_an_encoded_body_that_matches_is_served(client, encoding, encode):
    response, body = await post(client, "/v1/completions", encode(PLAIN), {"Content-Encoding": encoding})
    assert response.status == 200 and body["usage"]["completion_tokens"] == 2


async def test_an_empty_prompt_says_so(client):
    for prompt in (b'[""]', b'""'):
        response, error = await post(client, "/v1/completions",
                                     b'{"model": "%s", "prompt": %s}' % (MODEL.encode(), prompt))
        assert response.status == 400
        message = assert_openai_error(error, None, "prompt")["message"]
        assert "context length" not in message and ("empty" in message or "at least 1" in message), message
    response, error = await post(client, "/v1/completions", b'{"model": "tiny-dense", "prompt": [""]}')
    assert "the prompt is empty" in error["error"]["message"]
