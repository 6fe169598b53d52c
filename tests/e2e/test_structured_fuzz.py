"""Random JSON schemas (hypothesis: objects, arrays, enums, nested, required fields) against both
engines — the int8 ONNX edge and the transformers central: every answer parses and validates.

Hypothesis draws the schemas (deterministically); the requests then go 8 at a time, so the engines
batch them and the test stays within a couple of minutes. A failure names its schema."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.e2e.clients_support import post

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("DSNODE_SCHEMA_EXAMPLES", "200"))  # per engine
CONCURRENCY = 8
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
                       "additionalProperties": t[2]}))
    return st.one_of(arrays, objects)


SCHEMAS = st.recursive(LEAVES, _containers, max_leaves=8).filter(lambda s: s.get("type") in ("object", "array"))


def random_schemas(count: int) -> list[dict]:
    drawn: list[dict] = []

    @settings(max_examples=count, derandomize=True, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(SCHEMAS)
    def draw(schema):
        drawn.append(schema)

    draw()
    return drawn


def problem_with_answer(route, schema: dict) -> str | None:
    """None when the answer parses and validates; else what is wrong with it."""
    status, body = post(route.url, "/v1/chat/completions", {
        "model": route.model, "messages": [{"role": "user", "content": "Answer in JSON."}], "max_tokens": 400,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    })
    if status != 200:
        return f"HTTP {status}: {body}"
    choice = body["choices"][0]
    try:
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    except (ValueError, jsonschema.ValidationError) as exc:
        return f"{exc} in {choice}"
    return None if choice["finish_reason"] == "stop" else f"finish_reason {choice['finish_reason']}"


@pytest.mark.parametrize("route_name", ["edge", "central"])
def test_every_answer_to_a_random_schema_parses_and_validates(routes, route_name):
    route = routes[route_name]
    schemas = random_schemas(EXAMPLES)
    assert len(schemas) == EXAMPLES
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        problems = list(pool.map(lambda schema: problem_with_answer(route, schema), schemas))
    failed = [(json.dumps(schema), problem) for schema, problem in zip(schemas, problems) if problem]
    assert failed == [], f"{len(failed)} of {len(schemas)} answers failed"
