"""`GET /openapi.json`: the HTTP API as an OpenAPI 3.1 document.

The request bodies are the pydantic models of `dsnode.api.schemas` (`model_json_schema`), plus the
rules their validators add (at most 16 non-empty stop strings, `logit_bias` keyed by token ids, at most
64 sequences of prompts x n...), so that what the document allows is what the server accepts;
`tests/e2e/test_fuzz.py` holds the server to it. Every error is OpenAI's shape; the bearer scheme is listed when the node has API keys.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pydantic import BaseModel

from .. import __version__, headers
from .responses_api.request import ResponsesRequest
from .schemas import (
    LOGIT_BIAS_RANGE,
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_PROMPTS,
    MAX_STOP_SEQUENCES,
    STRUCTURED_KINDS,
    ChatCompletionRequest,
    CompletionRequest,
    null_means_default,
)
from .tokenize import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest

OPENAPI_VERSION = "3.1.0"
_REF = "#/components/schemas/{model}"

ERROR_STATUSES = {
    "400": "Invalid request: malformed JSON, a bad or unsupported value (named in `param`), over a limit.",
    "401": "No API key, a wrong one, or a bad peer credential.",
    "404": "No such model in this cluster (the message lists those that exist), or no such path.",
    "405": "Method not allowed on this path.",
    "408": "The request body did not arrive within `[limits] body_timeout`.",
    "413": "The request body is over `[limits] max_body_bytes`.",
    "429": "Too busy: the engine's queue is full, or this API key's concurrent requests are all in use. "
           "See `Retry-After`.",
    "500": "The model failed on this request.",
    "502": "The upstream node stopped in the middle of its answer.",
    "503": "Not ready (loading), draining or shutting down, or no upstream can take it. See `Retry-After`.",
    "508": "The request came back to a node it already passed through.",
}
COMPLETION_ERRORS = ("400", "401", "404", "408", "413", "429", "500", "502", "503", "508")

_STRING = {"type": "string"}
_HEADERS = {
    headers.NODE: {"description": "The node that generated the answer.", "required": True,
                      "schema": _STRING},
    headers.ROUTE: {"description": "`local`: this node answered; `forwarded`: an upstream did.",
                       "required": True, "schema": {"type": "string", "enum": ["local", "forwarded"]}},
    headers.REQUEST_ID: {"description": "The client's request id, or one made up; in every log record of "
                     "the request.", "required": True, "schema": _STRING},
}
_EVENT = {  # one server-sent event: `data:` holds a chunk of the answer as JSON, an error, or [DONE]
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "minLength": 1}},
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.",
                                "schema": {"type": "string"}}}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "`Bearer`.", "schema": _STRING}}


def request_schemas() -> dict[str, Any]:
    """The request bodies and their parts, as components."""
    components: dict[str, Any] = {}
    models: tuple[type[BaseModel], ...] = (ChatCompletionRequest, CompletionRequest, ResponsesRequest)
    for model in models:
        schema = model.model_json_schema(ref_template=_REF)
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    _add_chat_rules(components)
    _add_completion_rules(components)
    _add_responses_rules(components)
    _add_structure_rules(components)
    for model in models:
        props = components[model.__name__]["properties"]
        _add_validator_rules(props)
        for name in null_means_default(model):
            props[name] = _or_null(props[name])
    _add_tokenizer_schemas(components)
    return components


def _add_tokenizer_schemas(components: dict[str, Any]) -> None:
    """vLLM's `/tokenize` (a text, or a chat's messages) and `/detokenize` bodies."""
    for model in (TokenizeCompletionRequest, TokenizeChatRequest, DetokenizeRequest):
        schema = model.model_json_schema(ref_template=_REF)
        for name, part in schema.pop("$defs", {}).items():
            components.setdefault(name, part)
        for name in null_means_default(model):
            schema["properties"][name] = _or_null(schema["properties"][name])
        components[model.__name__] = schema
    text_form = {"allOf": [{"$ref": _REF.format(model="TokenizeCompletionRequest")},
                           {"not": {"required": ["messages"]}}]}  # with `messages` it is the chat form
    components["TokenizeRequest"] = {"anyOf": [text_form, {"$ref": _REF.format(model="TokenizeChatRequest")}]}


_ANNOTATIONS = ("default", "title", "description")


def _or_null(prop: dict[str, Any]) -> dict[str, Any]:
    """`null` is also accepted (it means the default)."""
    if "anyOf" in prop:
        if {"type": "null"} not in prop["anyOf"]:
            prop["anyOf"].append({"type": "null"})
        return prop
    outer = {k: prop.pop(k) for k in _ANNOTATIONS if k in prop}
    return {"anyOf": [prop, {"type": "null"}], **outer}


def _add_chat_rules(components: dict[str, Any]) -> None:
    """The chat validators that look at more than one field: `json_schema` needs its schema,
    `tool_choice` (other than "none") needs tools, and `top_logprobs` over 0 needs `logprobs: true`."""
    components["ResponseFormat"]["if"] = {"properties": {"type": {"const": "json_schema"}}}
    components["ResponseFormat"]["then"] = {"required": ["json_schema"], "properties": {"json_schema": {
        "type": "object", "required": ["schema"], "properties": {"schema": {"type": "object"}}}}}
    chat = components["ChatCompletionRequest"]
    chat["allOf"] = [
        {"if": {"required": ["tool_choice"], "properties": {"tool_choice": {"not": {"enum": ["none", None]}}}},
         "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}},
        {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
         "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}},
    ]


def _add_responses_rules(components: dict[str, Any]) -> None:
    """A Responses API request's cross-field rules: something to answer (a text, or an item that is not
    a system message or reasoning) unless it continues a stored response; `tool_choice` needs tools; a
    `json_schema` format needs its schema."""
    components["TextFormat"]["if"] = {"required": ["type"], "properties": {"type": {"const": "json_schema"}}}
    components["TextFormat"]["then"] = {"required": ["schema"], "properties": {"schema": {"type": "object"}}}
    answerable = {"anyOf": [
        {"required": ["type"], "properties": {"type": {"enum": ["function_call", "function_call_output"]}}},
        {"required": ["role"], "properties": {"type": {"const": "message"},
                                              "role": {"enum": ["user", "assistant", "developer"]}}},
    ]}
    request = components["ResponsesRequest"]
    request["allOf"] = [
        {"if": {"not": {"required": ["previous_response_id"], "properties": {
            "previous_response_id": {"type": "string"}}}},
         "then": {"required": ["input"], "properties": {"input": {"anyOf": [
             {"type": "string"}, {"type": "array", "contains": answerable}]}}}},
        {"if": {"required": ["tool_choice"], "properties": {"tool_choice": {"not": {"enum": ["none", None]}}}},
         "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}},
    ]


def _add_structure_rules(components: dict[str, Any]) -> None:
    """vLLM's `structured_outputs` gives exactly one kind of structure (`json_object` counts when
    true), and not with a JSON `response_format` (a Responses request's `text.format`)."""
    not_null = {"not": {"type": "null"}}
    kinds = [{"required": [kind], "properties": {kind: not_null}} for kind in STRUCTURED_KINDS[:-1]]
    components["StructuredOutputs"]["oneOf"] = [*kinds, {"required": ["json_object"],
                                                         "properties": {"json_object": {"const": True}}}]
    json_format = {"type": "object", "required": ["type"],
                   "properties": {"type": {"enum": ["json_object", "json_schema"]}}}
    no_structure = {"properties": {"structured_outputs": {"type": "null"}}}
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        components[request].setdefault("allOf", []).append({"anyOf": [
            no_structure, {"properties": {"response_format": {"not": json_format}}}]})
    components["ResponsesRequest"]["allOf"].append({"anyOf": [
        no_structure, {"properties": {"text": {"properties": {"format": {"not": json_format}}}}}]})


def _add_completion_rules(components: dict[str, Any]) -> None:
    """A text completion's prompts times `n` are at most MAX_PROMPTS sequences."""
    completion = components["CompletionRequest"]
    completion["allOf"] = [
        {"if": {"required": ["n"], "properties": {"n": {"const": n}}},
         "then": {"properties": {"prompt": {"anyOf": _prompt_forms(MAX_PROMPTS // n)}}}}
        for n in range(2, MAX_CHOICES + 1)]


def _add_validator_rules(props: dict[str, Any]) -> None:
    """What the models' validators check, in JSON Schema words."""
    text = {"type": "string", "minLength": 1}
    props["stop"]["anyOf"] = [text, {"type": "array", "items": text, "maxItems": MAX_STOP_SEQUENCES},
                              {"type": "null"}]
    if "logit_bias" not in props:
        return  # a Responses API request: no logit_bias, no prompt
    props["logit_bias"]["anyOf"] = [
        {"type": "object", "maxProperties": MAX_LOGIT_BIAS, "propertyNames": {"pattern": "^[0-9]{1,9}$"},
         "additionalProperties": {"type": "number", "minimum": -LOGIT_BIAS_RANGE, "maximum": LOGIT_BIAS_RANGE}},
        {"type": "null"}]
    if "prompt" in props:
        prompt = props["prompt"]
        prompt.pop("minLength", None)
        prompt["anyOf"] = _prompt_forms(MAX_PROMPTS)


def _prompt_forms(max_prompts: int) -> list[dict[str, Any]]:
    """A text, texts, token ids, or lists of token ids; at most `max_prompts` prompts."""
    ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
    return [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": max_prompts},
        ids,
        {"type": "array", "items": ids, "minItems": 1, "maxItems": max_prompts},
    ]


_TOOL_CALL = {"type": "object", "required": ["id", "type", "function"], "properties": {
    "id": {"type": "string"}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name", "arguments"],
                 "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}}}


_NUMBER = {"type": "number"}
_TOKEN_LOGPROB = {"type": "object", "required": ["token", "logprob", "bytes"], "properties": {
    "token": {"type": "string"}, "logprob": _NUMBER, "bytes": {"type": "array", "items": {"type": "integer"}}}}
_CHAT_LOGPROBS = {"type": "object", "required": ["content"], "properties": {"content": {"type": "array", "items": {
    **_TOKEN_LOGPROB, "required": ["token", "logprob", "bytes", "top_logprobs"],
    "properties": {**_TOKEN_LOGPROB["properties"], "top_logprobs": {"type": "array", "items": _TOKEN_LOGPROB}}}}}}
_COMPLETION_LOGPROBS = {"type": "object", "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
                        "properties": {"tokens": {"type": "array", "items": {"type": "string"}},
                                       # null: an echoed prompt's first token
                                       "token_logprobs": {"type": "array", "items": {"type": ["number", "null"]}},
                                       "top_logprobs": {"type": "array", "items": {
                                           "type": ["object", "null"], "additionalProperties": _NUMBER}},
                                       "text_offset": {"type": "array", "items": {"type": "integer"}}}}


# vLLM's `prompt_logprobs`: per prompt token null (the first) or {token id: {logprob, rank, decoded_token}}
_VLLM_PROMPT_LOGPROBS = {"type": "array", "items": {"type": ["object", "null"], "additionalProperties": {
    "type": "object", "required": ["logprob", "rank", "decoded_token"],
    "properties": {"logprob": _NUMBER, "rank": {"type": ["integer", "null"]}, "decoded_token": _STRING}}}}


def _response_schemas() -> dict[str, Any]:
    count = {"type": "integer", "minimum": 0}
    usage = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
             "properties": {**{k: count for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
                            # prompt tokens a prompt cache gave (a local answer; a relayed one as its node says)
                            "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": count}},
                            # a reasoning model's chat answer: the tokens from <think> to </think>
                            "completion_tokens_details": {"type": "object",
                                                          "properties": {"reasoning_tokens": count}}}}
    finish = {"type": ["string", "null"]}
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {"message": _STRING, "type": _STRING, "param": {"type": ["string", "null"]},
                               "code": {"type": ["string", "null"]}},
            }},
        },
        "Usage": usage,
        "ChatCompletion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": _STRING, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
                "model": _STRING, "usage": {"$ref": "#/components/schemas/Usage"},
                "prompt_logprobs": _VLLM_PROMPT_LOGPROBS,
                "choices": {"type": "array", "items": {
                    "type": "object", "required": ["index", "message", "finish_reason"],
                    "properties": {"index": {"type": "integer"}, "finish_reason": finish,
                                   "logprobs": {"anyOf": [_CHAT_LOGPROBS, {"type": "null"}]},
                                   "message": {"type": "object", "required": ["role", "content"],
                                               "properties": {"role": {"const": "assistant"},
                                                              "content": {"type": ["string", "null"]},
                                                              "reasoning_content": {"type": ["string", "null"]},
                                                              "tool_calls": {"type": "array", "items": _TOOL_CALL}}}},
                }},
            },
        },
        "Completion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": _STRING, "object": {"const": "text_completion"}, "created": {"type": "integer"},
                "model": _STRING, "usage": {"$ref": "#/components/schemas/Usage"},
                "choices": {"type": "array", "items": {
                    "type": "object", "required": ["index", "text", "finish_reason"],
                    "properties": {"index": {"type": "integer"}, "text": _STRING, "finish_reason": finish,
                                   "logprobs": {"anyOf": [_COMPLETION_LOGPROBS, {"type": "null"}]},
                                   "prompt_logprobs": _VLLM_PROMPT_LOGPROBS},
                }},
            },
        },
        "Response": {
            "type": "object",
            "required": ["id", "object", "created_at", "status", "model", "output"],
            "properties": {
                "id": _STRING, "object": {"const": "response"}, "created_at": {"type": "integer"},
                "status": {"enum": ["completed", "incomplete", "failed", "in_progress"]}, "model": _STRING,
                "error": {"type": ["object", "null"]}, "incomplete_details": {"type": ["object", "null"]},
                "previous_response_id": {"type": ["string", "null"]},
                "output": {"type": "array", "items": {"type": "object", "required": ["id", "type"], "properties": {
                    "id": _STRING, "type": {"enum": ["message", "reasoning", "function_call"]}}}},
                "usage": {"type": ["object", "null"], "properties": {
                    k: count for k in ("input_tokens", "output_tokens", "total_tokens")}},
            },
        },
        "Tokens": {
            "type": "object",
            "required": ["count", "max_model_len", "tokens", "token_strs"],
            "properties": {"count": count, "max_model_len": {"type": "integer"},
                           "tokens": {"type": "array", "items": count},
                           "token_strs": {"type": ["array", "null"], "items": _STRING}},
        },
        "Text": {"type": "object", "required": ["prompt"], "properties": {"prompt": _STRING}},
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
                "type": "object", "required": ["id", "object"],
                "properties": {"id": _STRING, "object": {"const": "model"},
                               "max_model_len": {"type": ["integer", "null"]}},
            }}},
        },
    }


def _errors(statuses: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for status in statuses:
        response: dict[str, Any] = {
            "description": ERROR_STATUSES[status],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        if status in ("429", "503"):
            response["headers"] = copy.deepcopy(_RETRY_AFTER)
        elif status == "401":
            response["headers"] = copy.deepcopy(_WWW_AUTHENTICATE)
        out[status] = response
    return out


_STREAM_DONE = ("The answer: whole (JSON, with `usage`), or with `stream: true` a stream of server-sent events "
                "ending `data: [DONE]` (a failure after the first event is an `{\"error\": ...}` event before "
                "`[DONE]`).")
_STREAM_RESPONSES = ("The response: whole (JSON), or with `stream: true` OpenAI's Responses event stream "
                     "(`event:` and `data:` lines, from `response.created` to `response.completed`, "
                     "`response.incomplete` or `response.failed`; no `[DONE]`).")
_RESPONSE_EVENT = {"type": "object", "required": ["event", "data"],
                   "properties": {"event": {"type": "string", "minLength": 1}, "data": {"type": "string"}}}


def _completion(summary: str, request: str, answer: str, description: str = _STREAM_DONE,
                event: dict[str, Any] = _EVENT) -> dict[str, Any]:
    return {
        "summary": summary,
        "parameters": [{"name": headers.REQUEST_ID, "in": "header", "required": False,
                        "description": "Your id for the request (printable, no spaces, up to 128 "
                                       "characters); else the node makes one up.",
                        "schema": _STRING}],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{request}"}}}},
        "responses": {
            "200": {
                "description": description,
                "headers": copy.deepcopy(_HEADERS),
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{answer}"}},
                            "text/event-stream": {"schema": event}},
            },
            **_errors(COMPLETION_ERRORS),
        },
    }


def _tokenizer(summary: str, request: str, answer: str) -> dict[str, Any]:
    """vLLM's tokenizer endpoints: a JSON answer with the completion headers (who answered, and how)."""
    operation = _completion(summary, request, answer)
    operation["responses"]["200"]["description"] = "The answer of the node whose tokenizer counts (X-DSNode-Node)."
    del operation["responses"]["200"]["content"]["text/event-stream"]
    return operation


def _get(summary: str, content_type: str, schema: dict[str, Any], errors: tuple[str, ...] = (),
         extra: dict[str, Any] | None = None, open_: bool = False) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "OK", "content": {content_type: {"schema": schema}}},
                      **(extra or {}), **_errors(errors)},
    }
    if open_:
        operation["security"] = []
    return operation


_RESPONSE_ID = {"name": "response_id", "in": "path", "required": True, "schema": _STRING}
_LIST_PARAMETERS = [
    {"name": "order", "in": "query", "required": False, "schema": {"enum": ["asc", "desc"]}},
    {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
    {"name": "after", "in": "query", "required": False, "schema": _STRING},
]


def openapi_document(bearer: bool, peers: bool = False) -> dict[str, Any]:
    """The whole document; `bearer`: the node asks for API keys; `peers`: it has a cluster secret
    (then `/cluster` may answer 401 even without API keys)."""
    any_json = {"type": "object"}
    components: dict[str, Any] = {"schemas": {**request_schemas(), **_response_schemas()}}
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "dsnode", "version": __version__,
                 "description": "OpenAI-compatible completions served by a dsnode cluster; any node "
                                "answers any request."},
        "paths": {
            "/v1/chat/completions": {"post": _completion("Chat completion", "ChatCompletionRequest",
                                                         "ChatCompletion")},
            "/v1/completions": {"post": _completion("Text completion", "CompletionRequest", "Completion")},
            "/v1/responses": {"post": _completion("Response (OpenAI's Responses API, served through the chat "
                                                  "path)", "ResponsesRequest", "Response", _STREAM_RESPONSES,
                                                  _RESPONSE_EVENT)},
            "/v1/responses/{response_id}": {
                "get": {**_get("A stored response (the API key's own)", "application/json",
                               {"$ref": "#/components/schemas/Response"}, ("401", "404")),
                        "parameters": [_RESPONSE_ID]},
                "delete": {**_get("Delete a stored response", "application/json", any_json, ("401", "404")),
                           "parameters": [_RESPONSE_ID]}},
            "/v1/responses/{response_id}/input_items": {"get": {
                **_get("A stored response's input items (newest first by default)", "application/json", any_json,
                       ("400", "401", "404")),
                "parameters": [_RESPONSE_ID, *_LIST_PARAMETERS]}},
            "/tokenize": {"post": _tokenizer("A text's or a chat's token ids, with the tokenizer and chat template "
                                             "of the node that serves the model (vLLM's)", "TokenizeRequest",
                                             "Tokens")},
            "/detokenize": {"post": _tokenizer("The text of token ids (vLLM's)", "DetokenizeRequest", "Text")},
            "/v1/models": {"get": _get("Every model reachable through this node", "application/json",
                                       {"$ref": "#/components/schemas/ModelList"}, ("401",))},
            "/v1/models/{model_id}": {"get": {
                **_get("One model reachable through this node", "application/json", any_json, ("401", "404")),
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": _STRING}]}},
            "/health": {"get": _get("Liveness: the process serves HTTP", "application/json", any_json,
                                    open_=True)},
            "/ready": {"get": _get("Readiness: the local model is loaded and the node takes work",
                                   "application/json", any_json, open_=True, extra={"503": {
                                       "description": "Not ready; `reason` says why.",
                                       "headers": copy.deepcopy(_RETRY_AFTER),
                                       "content": {"application/json": {"schema": any_json}}}})},
            "/metrics": {"get": _get("Prometheus metrics", "text/plain", _STRING, ("401",))},
            "/cluster": {"get": _get("This node's advertisement and its view of its upstreams "
                                     "(a peer credential or an API key)", "application/json", any_json,
                                     ("401",))},
            "/openapi.json": {"get": _get("This document", "application/json", any_json, open_=True)},
        },
        "components": components,
    }
    if bearer:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                    "description": "An API key of `[auth] api_keys_file`."}}
        document["security"] = [{"bearer": []}]
    else:
        for route, path in document["paths"].items():  # nothing to send: no 401 to expect either
            for operation in path.values():
                if not (peers and route == "/cluster"):
                    operation["responses"].pop("401", None)
                operation.pop("security", None)
    return document


def openapi_bytes(bearer: bool, peers: bool = False) -> bytes:
    return json.dumps(openapi_document(bearer, peers), separators=(",", ":")).encode()
