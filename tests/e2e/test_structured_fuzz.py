"""Random JSON schemas (hypothesis: objects, arrays, enums, nested, required fields) against both
engines — the int8 ONNX edge and the transformers central: every answer parses and validates."""

from __future__ import annotations

import json
import os

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.clients_support import post

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("DSNODE_SCHEMA_EXAMPLES", "100"))  # per engine
NAMES = st.from_regex(r"[a-z][a-z_]{0,9}", fullmatch=True)
LEAVES = st.one_of(
    st.just({"type": "string"}),
    st.just({"type": "integer"}),
    st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.one_of(NAMES, st.integers(-100, 100)), min_size=1, max_size=4, unique=True).map(lambda v: {"enum": v}),
    st.integers(0, 3).map(lambda n: {"type": "string", "maxLength": n + 3}),
    st.integers(-5, 5).map(lambda n: {"type": "integer", "minimum": n, "maximum": n + 10}),
)


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    arrays = st.tuples(children, st.integers(0, 2), st.integers(0, 2)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]})
    objects = st.dictionaries(NAMES, children, min_size=1, max_size=4).flatmap(
        lambda props: st.tuples(st.just(props), st.sets(st.sampled_from(sorted(props))), st.booleans()).map(
            lambda t: {"type": "object", "properties": t[0], "required": sorted(t[1]),
                       "additionalProperties": t[2] and False}))
    return st.one_of(arrays, objects)


SCHEMAS = st.recursive(LEAVES, _containers, max_leaves=8).filter(lambda s: s.get("type") in ("object", "array"))


def answer_validates(route, schema: dict) -> None:
    status, body = post(route.url, "/v1/chat/completions", {
        "model": route.model, "messages": [{"role": "user", "content": "Answer in JSON."}], "max_tokens": 240,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    })
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop", (schema, choice)
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)


@pytest.mark.parametrize("route_name", ["edge", "central"])
def test_every_answer_to_a_random_schema_parses_and_validates(routes, route_name):
    route = routes[route_name]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(SCHEMAS)
    def check(schema):
        answer_validates(route, schema)

    check()
