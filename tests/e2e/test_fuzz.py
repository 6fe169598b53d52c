"""The HTTP API fuzzed from its own OpenAPI document (schemathesis), against a `dsnode serve` process,
then with hostile encodings and structures (raw bytes, not only schema-valid JSON), against that node
and an edge that forwards to it.

The document is the one the node serves at `/openapi.json` (the first test checks that, byte for
byte; it is built at import time because schemathesis's lazy loader does not work with pytest 9),
with one narrowing: `model` is drawn from the served model and one unknown name, so that valid bodies
reach the engine instead of all ending in 404. Each operation gets a bounded, derandomized set of
examples (valid and invalid bodies), sent
with a per-request timeout; every answer must be no 5xx, a documented status, content type, headers
and body, every error in OpenAI's shape; afterwards the node still answers a normal request and its
log holds no unhandled error.

The hostile stage sends bodies as bytes: invalid UTF-8, lone surrogates, nesting 100,000 deep, numbers
Python cannot hold, bodies that do not match their Content-Encoding, broken request heads — a fixed
corpus, then derandomized hypothesis draws of random bytes and random (deep, surrogate-laden) JSON.
Each goes to the node (its own model, tokenized there) and to an edge (a model only the node serves:
not tokenized on the edge, forwarded). Not one answer may be a 5xx, every error is in OpenAI's shape,
and neither node may log an error or anything that is not one JSON event per line.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
import zlib

import pytest
import requests
import schemathesis
from dsnode.api.openapi import openapi_bytes, openapi_document
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.nodes import ServeProcess, free_port, node_toml

pytestmark = pytest.mark.slow

MODEL = "tiny-dense"
EDGE_MODEL = "tiny-dense-edge"
KEY = "sk-fuzz-4f0c1d2e3b4a59687766"
BEARER = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 25  # per operation and phase; the whole file stays well under a minute on 2 cores
REQUEST_TIMEOUT_S = 30.0  # a hang fails the example instead of the suite
SEEN: dict[str, int] = {}  # examples sent, per operation (printed at the end)


AUTH = '[auth]\napi_keys_file = "keys"\ncluster_secret_file = "cluster.secret"\n'


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    (work / "keys").write_text(f"fuzzer: {KEY}\n")
    (work / "cluster.secret").write_text("f" * 64 + "\n")
    return work


@pytest.fixture(scope="module")
def node(work, dense_dir):
    port = free_port()
    extra = AUTH + '\n[limits]\nmax_tokens = 4\nmax_messages = 8\n'
    config = work / "node.toml"
    config.write_text(node_toml("fuzz-node", "central", port, MODEL, dense_dir, "transformers", extra=extra))
    process = ServeProcess("fuzz-node", config, port, work / "node.log").start()
    try:
        process.wait_ready(timeout=180)
        yield process
    finally:
        code = process.stop()
    assert code == 0, process.log_tail()


@pytest.fixture(scope="module")
def edge(work, dense_dir, node):
    """Serves a model of its own; `tiny-dense` is the node's only, so the edge forwards it untokenized."""
    port = free_port()
    extra = AUTH + f'\n[routing]\npoll_interval = 0.5\n\n[[routing.upstream]]\nurl = "{node.url}"\n'
    config = work / "edge.toml"
    config.write_text(node_toml("fuzz-edge", "edge", port, EDGE_MODEL, dense_dir, "transformers", extra=extra))
    process = ServeProcess("fuzz-edge", config, port, work / "edge.log").start()
    try:
        process.wait_ready(timeout=180)
        deadline = time.monotonic() + 60
        while not _forwards(process):
            assert time.monotonic() < deadline, process.log_tail()
            time.sleep(0.2)
        yield process
    finally:
        code = process.stop()
    assert code == 0, process.log_tail()


def _forwards(edge: ServeProcess) -> bool:
    cluster = requests.get(edge.url + "/cluster", headers=BEARER, timeout=REQUEST_TIMEOUT_S).json()
    return all(peer["healthy"] for peer in cluster["peers"])


def fuzzed_document() -> dict:
    document = openapi_document(bearer=True)
    schemas = document["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest", "ResponsesRequest"):
        schemas[name]["properties"]["model"] = {"enum": [MODEL, "no-such-model"]}
    for name in ("TokenizeCompletionRequest", "TokenizeChatRequest", "DetokenizeRequest"):  # optional there
        schemas[name]["properties"]["model"] = {"enum": [MODEL, "no-such-model", None]}
    return document


def error_shape(ctx, response, case) -> bool | None:
    """Every error, whatever the path, is `{"error": {"message", "type", "param", "code"}}`."""
    if response.status_code < 400:
        return None
    body = json.loads(response.content)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return True


api = schemathesis.openapi.from_dict(fuzzed_document())


def test_the_fuzzed_document_is_the_served_one(node):
    served = requests.get(node.url + "/openapi.json", timeout=10)
    assert served.status_code == 200 and served.headers["Content-Type"].startswith("application/json")
    assert served.content == openapi_bytes(bearer=True)
    api.validate()  # a valid OpenAPI 3.1 document


@api.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_answer_is_documented_and_no_input_breaks_the_node(case, node):
    SEEN[case.operation.label] = SEEN.get(case.operation.label, 0) + 1
    response = case.call(base_url=node.url, headers={"Authorization": f"Bearer {KEY}"},
                         timeout=REQUEST_TIMEOUT_S)
    case.validate_response(
        response,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                response_headers_conformance, response_schema_conformance, negative_data_rejection,
                ignored_auth, error_shape],
        headers={"Authorization": f"Bearer {KEY}"},
        transport_kwargs={"base_url": node.url, "headers": {"Authorization": f"Bearer {KEY}"},
                          "timeout": REQUEST_TIMEOUT_S},
    )


def test_the_node_still_serves_after_the_fuzzing(node):
    started = time.monotonic()
    response = requests.post(node.url + "/v1/chat/completions", timeout=REQUEST_TIMEOUT_S,
                             headers={"Authorization": f"Bearer {KEY}"},
                             json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                   "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.headers["X-DSNode-Node"] == "fuzz-node"
    assert time.monotonic() - started < REQUEST_TIMEOUT_S
    events = node.log_events()
    assert not [e for e in events if e.get("event") == "unhandled_error"]
    assert not [e for e in events if e.get("level") in ("error", "critical") and e.get("event") != "request"]
    assert not [e for e in events if e.get("event") == "request" and e.get("status", 0) >= 500]
    print(f"\nfuzz examples sent per operation: {dict(sorted(SEEN.items()))}")


# --- hostile encodings and structures --------------------------------------------------------------
def deep(n: int, leaf: bytes = b"1") -> bytes:
    return b"[" * n + leaf + b"]" * n


CHAT = b'{"model": "<M>", "max_tokens": 2, "messages": [{"role": "user", "content": %s}]}'
COMPLETION = b'{"model": "<M>", "max_tokens": 2, "prompt": %s}'
PLAIN = COMPLETION % b'"It was"'
GZIP_BOMB = gzip.compress(b" " * (64 << 20))  # 64 MiB of spaces in ~64 KiB: over max_body_bytes

# (name, endpoint, body — `<M>` stands for the model; or a token for an encoded PLAIN — , headers)
HOSTILE: list[tuple[str, str, bytes, dict[str, str]]] = [
    ("lone high surrogate", "chat", CHAT % b'"hi \\ud800"', {}),
    ("lone low surrogate", "completion", COMPLETION % b'"\\udfff"', {}),
    ("surrogate in a key", "completion", b'{"model": "<M>", "prompt": "x", "\\ud800": 1}', {}),
    ("surrogate in model", "completion", b'{"model": "\\ud800", "prompt": "x"}', {}),
    ("surrogate in a list prompt", "completion", COMPLETION % b'["\\udbff"]', {}),
    ("reversed pair", "chat", CHAT % b'"\\ude00\\ud83d"', {}),
    ("utf-8 encoded surrogate", "completion", COMPLETION % b'"\xed\xa0\x80"', {}),
    ("invalid utf-8", "completion", COMPLETION % b'"\xff\xfe"', {}),
    ("overlong utf-8", "chat", CHAT % b'"\xc0\xaf"', {}),
    ("utf-16 body", "completion", b"utf-16", {}),
    ("nul bytes", "completion", COMPLETION % b'"a\\u0000b\x00"', {}),
    ("100,000 deep array", "chat", deep(100_000), {}),
    ("100,000 deep object", "completion", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, {}),
    ("deep in content", "chat", CHAT % deep(5000, b'"x"'), {}),
    ("deep in an unknown field", "completion", b'{"model": "<M>", "prompt": "x", "extra": ' + deep(70) + b"}", {}),
    ("5000-digit max_tokens", "completion", b'{"model": "<M>", "prompt": "x", "max_tokens": ' + b"7" * 5000 + b"}",
     {}),
    ("huge float", "completion", b'{"model": "<M>", "prompt": "x", "temperature": 1e999}', {}),
    ("NaN", "completion", b'{"model": "<M>", "prompt": "x", "top_p": NaN}', {}),
    ("-Infinity", "chat", b'{"model": "<M>", "messages": [{"role": "user", "content": "x"}], "seed": -Infinity}', {}),
    ("duplicate keys", "completion", b'{"model": "<M>", "prompt": "x", "prompt": ["\\ud800"]}', {}),
    ("top-level string", "completion", b'"<M>"', {}),
    ("top-level null", "chat", b"null", {}),
    ("empty body", "chat", b"", {}),
    ("empty prompt", "completion", COMPLETION % b'[""]', {}),
    ("token id out of range", "completion", COMPLETION % b"[1, 2, 99999999999999999999]", {}),
    ("gzip that is not", "completion", PLAIN, {"Content-Encoding": "gzip"}),
    ("deflate that is not", "chat", PLAIN, {"Content-Encoding": "deflate"}),
    ("gzip cut short", "completion", b"gzip-cut", {"Content-Encoding": "gzip"}),
    ("gzip bomb", "completion", GZIP_BOMB, {"Content-Encoding": "gzip"}),
    ("gzip, gzip", "completion", b"gzip-twice", {"Content-Encoding": "gzip, gzip"}),
    ("brotli (not installed)", "completion", PLAIN, {"Content-Encoding": "br"}),
    ("unknown encoding", "completion", PLAIN, {"Content-Encoding": "x-rot13"}),
    ("good gzip", "completion", b"gzip", {"Content-Encoding": "gzip"}),
    ("good deflate", "completion", b"deflate", {"Content-Encoding": "deflate"}),
    ("text/plain", "completion", PLAIN, {"Content-Type": "text/plain"}),
    ("multipart", "completion", PLAIN, {"Content-Type": "multipart/form-data; boundary=x"}),
]


# JSON is JSON whatever the Content-Type says (as OpenAI's API takes it), and a Content-Encoding
# aiohttp does not know is no encoding: the bytes are parsed (and forwarded) as they are.
SERVED = {"good gzip", "good deflate", "text/plain", "multipart", "unknown encoding"}


def materialize(body: bytes, model: str) -> bytes:
    plain = PLAIN.replace(b"<M>", model.encode())
    encoded = {b"gzip": gzip.compress(plain), b"deflate": zlib.compress(plain), b"gzip-cut": gzip.compress(plain)[:-10],
               b"gzip-twice": gzip.compress(gzip.compress(plain)), b"utf-16": plain.decode().encode("utf-16")}
    return encoded.get(body, body.replace(b"<M>", model.encode()))


def send(target: ServeProcess, endpoint: str, body: bytes, headers: dict[str, str]) -> requests.Response:
    path = {"chat": "/v1/chat/completions", "completion": "/v1/completions", "responses": "/v1/responses"}[endpoint]
    sent = {"Content-Type": "application/json", **BEARER, **headers}
    return requests.post(target.url + path, data=body, headers=sent, timeout=REQUEST_TIMEOUT_S)


def assert_no_5xx_and_openai_shape(response: requests.Response, what: str) -> None:
    assert response.status_code < 500, (what, response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert response.headers["Content-Type"].startswith("application/json"), (what, response.headers)
        error = json.loads(response.content)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (what, error)


TARGETS = [("node", MODEL), ("edge", MODEL), ("edge", EDGE_MODEL)]  # the edge: forwarded, and its own


@pytest.mark.parametrize("name, endpoint, body, headers", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_encodings_and_structures_get_4xx_never_5xx(node, edge, name, endpoint, body, headers):
    for target, model in TARGETS:
        process = node if target == "node" else edge
        response = send(process, endpoint, materialize(body, model), headers)
        assert_no_5xx_and_openai_shape(response, f"{name} → {target} ({model})")
        if name in SERVED:
            assert response.status_code == 200, (name, target, response.text[:300])
        else:
            assert response.status_code >= 400, (name, target, response.text[:300])


BROKEN_HEADS = [
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\x01\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization : Bearer " + KEY.encode() + b"\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\r\n " + KEY.encode() + b"\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Long: " + b"y" * 9000 + b"\r\n",
    b"POST /v1/completions HTTP/1.1\r\n",  # no Host
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n",
    b"POST /v1/completions HTTP/9.9\r\nHost: x\r\n",
    b"POST /v1/\x00completions HTTP/1.1\r\nHost: x\r\n",
]


@pytest.mark.parametrize("head", BROKEN_HEADS, ids=[str(i) for i in range(len(BROKEN_HEADS))])
def test_broken_request_heads_get_a_400_in_openai_shape(node, edge, head):
    for process in (node, edge):
        with socket.create_connection(("127.0.0.1", process.port), timeout=REQUEST_TIMEOUT_S) as sock:
            sock.sendall(head + b"Content-Type: application/json\r\n\r\n{}")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        status_line, _, rest = answer.partition(b"\r\n")
        assert b" 400 " in status_line, (head[:80], answer[:300])
        error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "bad_http_request"


JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                        st.text(st.characters(codec=None, exclude_categories=())), st.just("\ud800"))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=40)


@settings(max_examples=60, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(value=JSON_VALUES, depth=st.integers(0, 200),
       field=st.sampled_from(["prompt", "messages", "stop", "x", "input", "tools", "text"]),
       endpoint=st.sampled_from(["chat", "completion", "responses"]), target=st.sampled_from(TARGETS))
def test_random_json_structures_get_4xx_never_5xx(node, edge, value, depth, field, endpoint, target):
    nested: object = value
    for _ in range(depth):
        nested = [nested]
    body = {"model": target[1], "max_tokens": 2, field: nested}
    if endpoint == "chat" and field != "messages":
        body["messages"] = [{"role": "user", "content": value if isinstance(value, str) else "x"}]
    if endpoint == "responses":
        body["max_output_tokens"] = body.pop("max_tokens")
        if field != "input":
            body["input"] = [{"role": "user", "content": [{"type": "input_text", "text": value}]}] \
                if isinstance(value, str) else "x"
    raw = json.dumps(body, ensure_ascii=True, allow_nan=True).encode()
    process = node if target[0] == "node" else edge
    assert_no_5xx_and_openai_shape(send(process, endpoint, raw, {}), f"{field} depth {depth}")


@settings(max_examples=40, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(prefix=st.sampled_from([b"", b'{"model": "tiny-dense", "prompt": "', b'{"model": "tiny-dense-edge", "prompt": ']),
       noise=st.binary(max_size=300), endpoint=st.sampled_from(["chat", "completion"]),
       encoding=st.sampled_from([None, "gzip", "deflate", "identity"]), to_edge=st.booleans())
def test_random_bytes_get_4xx_never_5xx(node, edge, prefix, noise, endpoint, encoding, to_edge):
    headers = {"Content-Encoding": encoding} if encoding else {}
    response = send(edge if to_edge else node, endpoint, prefix + noise, headers)
    assert_no_5xx_and_openai_shape(response, f"{prefix!r} + {noise[:40]!r} ({encoding})")


def test_after_the_hostile_stage_both_nodes_serve_and_logged_no_error(node, edge):
    for process, model in ((node, MODEL), (edge, MODEL), (edge, EDGE_MODEL)):
        response = send(process, "completion", materialize(PLAIN, model), {})
        assert response.status_code == 200, response.text
    for process in (node, edge):
        lines = process.log_text().split('"event": "ready"', 1)[1].splitlines()[1:]  # after loading's progress bar
        assert all(line.startswith("{") for line in lines), [x for x in lines if not x.startswith("{")][:5]
        events = [json.loads(line) for line in lines]
        assert not [e for e in events if e.get("level") in ("error", "critical") and e.get("event") != "request"]
        assert not [e for e in events if e.get("event") == "request" and e.get("status", 0) >= 500]
        assert KEY not in process.log_text()
