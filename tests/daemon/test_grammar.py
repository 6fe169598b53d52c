"""Constrained decoding with llguidance: random logits under a schema still give valid JSON."""

from __future__ import annotations

import json

import jsonschema
import pytest
from dsnode.inference.grammar import (
    Constraint,
    GrammarError,
    check_grammar,
    closing_reserve,
    json_schema_grammar,
    start_guide,
)

from tests.daemon.grammar_support import generate, small_tokenizer

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


@pytest.mark.parametrize("seed", range(12))
def test_random_logits_give_valid_json_within_max_tokens(tokenizer, seed):
    # a 300-token vocabulary spends ~5 tokens on a key: 96 tokens is a tight budget for this schema
    text, finish = generate(tokenizer, Constraint(json_schema_grammar(PERSON)), max_tokens=96, seed=seed)
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), PERSON)


def test_closing_starts_with_a_third_of_max_tokens_left():
    assert [closing_reserve(n) for n in (4, 60, 300, 4000)] == [8, 20, 100, 160]


def test_a_small_budget_still_closes_the_document(tokenizer):
    schema = {"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]}
    for seed in range(6):
        text, finish = generate(tokenizer, Constraint(json_schema_grammar(schema)), max_tokens=16, seed=seed)
        assert finish == "stop" and "note" in json.loads(text), text


def test_reasoning_comes_first_unconstrained_then_the_grammar(tokenizer):
    think, end_think = tokenizer.single_token_id("<think>"), tokenizer.single_token_id("</think>")
    assert think is not None and end_think is not None
    constraint = Constraint(json_schema_grammar(PERSON), after_reasoning=True)
    text, finish = generate(tokenizer, constraint, max_tokens=120, seed=3, prefer={think: 50.0})
    assert finish == "stop" and text.startswith("<think>") and "</think>" in text
    jsonschema.validate(json.loads(text.split("</think>", 1)[1]), PERSON)
    opened = Constraint(json_schema_grammar(PERSON), after_reasoning=True, in_reasoning=True)
    text, finish = generate(tokenizer, opened, max_tokens=120, seed=4)  # the reasoning is closed for it in time
    reasoning, _, answer = text.partition("</think>")
    assert finish == "stop" and "<think>" not in reasoning
    jsonschema.validate(json.loads(answer), PERSON)


def test_eos_is_not_allowed_inside_the_reasoning(tokenizer):
    import numpy as np

    guide = start_guide(tokenizer, Constraint(json_schema_grammar(PERSON), after_reasoning=True, in_reasoning=True),
                        max_tokens=100)
    logits = np.zeros(tokenizer.vocab_size, dtype=np.float32)
    masked = guide.mask(logits, remaining=100)
    assert all(masked[t] == -np.inf for t in tokenizer.eos_token_ids)
    assert np.isfinite(masked).sum() == tokenizer.vocab_size - len(tokenizer.eos_token_ids)


@pytest.mark.parametrize("schema, words", [
    ({"type": "objet"}, "objet"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "string", "pattern": "(unclosed"}, ""),
])
def test_schemas_the_library_cannot_compile_say_why(tokenizer, schema, words):
    with pytest.raises(GrammarError) as info:
        check_grammar(json_schema_grammar(schema), tokenizer)
    assert words in str(info.value) and str(info.value)
