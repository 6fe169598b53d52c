"""`GET /openapi.json`: a valid OpenAPI 3.1 document whose request bodies are exactly what the server's
parser accepts (checked both ways on generated bodies), with the error shape, headers and auth."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from dsnode.api.errors import APIError
from dsnode.api.openapi import openapi_document
from dsnode.api.responses_api.request import chat_request, parse_responses
from dsnode.api.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from dsnode.api.tokenize import parse_request as parse_tokenizer_body
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

# path → the request body's schema in the document
BODIES = {"/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest",
          "/v1/responses": "ResponsesRequest", "/tokenize": "TokenizeRequest", "/detokenize": "DetokenizeRequest"}


def served(path: str, body: Any) -> None:
    """Raises APIError (400) where the server would refuse the body. A Responses API request goes the
    server's way: parsed, turned into its chat request (after a stored conversation when it names one)
    and that parsed. A tokenizer request is parsed as its form (chat when it has `messages`)."""
    if path in ("/tokenize", "/detokenize"):
        parse_tokenizer_body(path.removeprefix("/"), body)
        return
    if path != "/v1/responses":
        parse_body({"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}[path], body)
        return
    asked = parse_responses(body)
    history = [{"role": "user", "content": "earlier"}] if asked.previous_response_id is not None else []
    parse_body(ChatCompletionRequest, chat_request(asked, history))
EXAMPLES = 60


def json_numbers(value: Any) -> Any:
    """As JSON Schema reads numbers: `1.0` is the integer 1 (the server's parser takes `1`)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [json_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: json_numbers(v) for k, v in value.items()}
    return value


def body_validator(document: dict[str, Any], name: str) -> Any:
    root = {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema_rs.validator_for(root)


DOCUMENT = openapi_document(bearer=True)
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)
SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))


def test_the_document_is_valid_openapi_3_1():
    SCHEMA.validate()
    assert DOCUMENT["openapi"] == "3.1.0"
    assert set(DOCUMENT["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/models",
                                      "/v1/models/{model_id}", "/health", "/ready", "/metrics", "/cluster",
                                      "/openapi.json", "/v1/responses", "/v1/responses/{response_id}",
                                      "/v1/responses/{response_id}/input_items", "/tokenize", "/detokenize"}


@pytest.mark.parametrize("path", sorted(BODIES))
def test_every_body_the_document_allows_the_server_accepts(path):
    seen = []

    @SETTINGS
    @given(SCHEMA[path]["POST"].as_strategy())
    def check(case: Any) -> None:
        seen.append(1)
        served(path, json_numbers(case.body))  # raises APIError (400) if the server would refuse it

    check()
    assert len(seen) >= EXAMPLES // 2


@pytest.mark.parametrize("path", sorted(BODIES))
def test_every_body_the_document_refuses_the_server_refuses(path):
    validator = body_validator(DOCUMENT, BODIES[path])
    refused = []

    @SETTINGS
    @given(SCHEMA[path]["POST"].as_strategy(generation_mode=GenerationMode.NEGATIVE))
    def check(case: Any) -> None:
        if isinstance(case.body, (bytes, bytearray)):
            return  # not JSON at all: refused before parsing (tests/e2e/test_fuzz.py sends those)
        body = json_numbers(case.body)
        if validator.is_valid(body):
            return  # the negative case broke something else (a header)
        refused.append(1)
        with pytest.raises(APIError) as info:
            served(path, body)
        assert info.value.status == 400

    check()
    assert refused, "no invalid body was generated: the test proved nothing"


def test_errors_are_documented_in_openai_shape_with_their_headers():
    chat = DOCUMENT["paths"]["/v1/chat/completions"]["post"]["responses"]
    for status in ("400", "401", "404", "408", "413", "429", "500", "502", "503", "508"):
        assert chat[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert set(DOCUMENT["components"]["schemas"]["Error"]["properties"]["error"]["required"]) == \
        {"message", "type", "param", "code"}
    assert "Retry-After" in chat["429"]["headers"] and "Retry-After" in chat["503"]["headers"]
    assert "WWW-Authenticate" in chat["401"]["headers"]
    assert set(chat["200"]["headers"]) == {"X-DSNode-Node", "X-DSNode-Route", "X-Request-Id"}
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}


def test_bearer_auth_only_when_the_node_has_keys():
    assert DOCUMENT["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "An API key of `[auth] api_keys_file`."}
    for path in ("/health", "/ready", "/openapi.json"):
        assert DOCUMENT["paths"][path]["get"]["security"] == []
    open_ = openapi_document(bearer=False)
    assert "security" not in open_ and "securitySchemes" not in open_["components"]
    assert all("401" not in op["responses"] for path in open_["paths"].values() for op in path.values())
    with_secret = openapi_document(bearer=False, peers=True)
    assert "401" in with_secret["paths"]["/cluster"]["get"]["responses"]
