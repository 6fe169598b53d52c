"""The HTTP API fuzzed from its own OpenAPI document (schemathesis), against a `dsnode serve` process.

The document is the one the node serves at `/openapi.json` (the first test checks that, byte for
byte; it is built at import time because schemathesis's lazy loader does not work with pytest 9),
with one narrowing: `model` is drawn from the served model and one unknown name, so that valid bodies
reach the engine instead of all ending in 404. Each operation gets a bounded, derandomized set of
examples (valid and invalid bodies), sent
with a per-request timeout; every answer must be no 5xx, a documented status, content type, headers
and body, every error in OpenAI's shape; afterwards the node still answers a normal request and its
log holds no unhandled error.
"""

from __future__ import annotations

import json
import time

import pytest
import requests
import schemathesis
from dsnode.api.openapi import openapi_bytes, openapi_document
from hypothesis import HealthCheck, settings
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
KEY = "sk-fuzz-4f0c1d2e3b4a59687766"
EXAMPLES = 25  # per operation and phase; the whole file stays well under a minute on 2 cores
REQUEST_TIMEOUT_S = 30.0  # a hang fails the example instead of the suite
SEEN: dict[str, int] = {}  # examples sent, per operation (printed at the end)


@pytest.fixture(scope="module")
def node(tmp_path_factory, dense_dir):
    work = tmp_path_factory.mktemp("fuzz")
    (work / "keys").write_text(f"fuzzer: {KEY}\n")
    port = free_port()
    extra = '[auth]\napi_keys_file = "keys"\n\n[limits]\nmax_tokens = 4\nmax_messages = 8\n'
    config = work / "node.toml"
    config.write_text(node_toml("fuzz-node", "central", port, MODEL, dense_dir, "transformers", extra=extra))
    process = ServeProcess("fuzz-node", config, port, work / "node.log").start()
    try:
        process.wait_ready(timeout=180)
        yield process
    finally:
        code = process.stop()
    assert code == 0, process.log_tail()


def fuzzed_document() -> dict:
    document = openapi_document(bearer=True)
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        document["components"]["schemas"][name]["properties"]["model"] = {"enum": [MODEL, "no-such-model"]}
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
    events = [json.loads(line) for line in node.log_text().splitlines() if line.startswith("{")]
    assert not [e for e in events if e.get("event") == "unhandled_error"]
    assert not [e for e in events if e.get("level") in ("error", "critical") and e.get("event") != "request"]
    assert not [e for e in events if e.get("event") == "request" and e.get("status", 0) >= 500]
    print(f"\nfuzz examples sent per operation: {dict(sorted(SEEN.items()))}")
