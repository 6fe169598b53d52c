"""Constrained decoding with llguidance: random logits under a schema still give valid JSON; under a
regex, a choice or a Lark/GBNF grammar (vLLM's `structured_outputs`), a match."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from dsnode.inference.grammar import (
    Constraint,
    GrammarError,
    cfg_grammar,
    check_grammar,
    choice_grammar,
    closing_reserve,
    json_schema_grammar,
    regex_grammar,
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


def _not_json(grammar: str) -> Constraint:
    return Constraint(grammar, closes_json=False, param="structured_outputs")


@pytest.mark.parametrize("seed", range(8))
def test_random_logits_under_a_choice_give_exactly_one_of_the_choices(tokenizer, seed):
    choices = ["whale", "ship", 'a "quoted" \\ line\n', "sea and sky"]
    text, finish = generate(tokenizer, _not_json(choice_grammar(choices)), max_tokens=40, seed=seed)
    assert finish == "stop" and text in choices


@pytest.mark.parametrize("seed", range(8))
def test_random_logits_under_a_regex_give_a_full_match(tokenizer, seed):
    pattern = r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)"
    text, finish = generate(tokenizer, _not_json(regex_grammar(pattern)), max_tokens=40, seed=seed)
    assert finish == "stop" and re.fullmatch(pattern, text), text


@pytest.mark.parametrize("seed", range(4))
def test_an_open_ended_regex_ends_where_it_may_in_the_last_third(tokenizer, seed):
    """This regex never has to end: in the last third of max_tokens the guide takes end of text (a
    match), not the JSON closers (`"`, `}`) a schema's answer is steered to, which it also allows."""
    pattern = '[a-z "}]+'
    text, finish = generate(tokenizer, _not_json(regex_grammar(pattern)), max_tokens=30, seed=seed)
    assert finish == "stop" and re.fullmatch(pattern, text), text


@pytest.mark.parametrize("grammar", [
    'start: "yes" | "no" | "maybe " NUMBER\nNUMBER: /[0-9]{1,3}/',  # Lark
    'root ::= "yes" | "no" | "maybe " [0-9] [0-9]? [0-9]?',  # llama.cpp's GBNF
])
@pytest.mark.parametrize("seed", range(4))
def test_random_logits_under_a_lark_or_gbnf_grammar_give_a_sentence_of_it(tokenizer, grammar, seed):
    text, finish = generate(tokenizer, _not_json(cfg_grammar(grammar)), max_tokens=20, seed=seed)
    assert finish == "stop" and re.fullmatch(r"yes|no|maybe [0-9]{1,3}", text), text


@pytest.mark.parametrize("build, source, words", [
    (regex_grammar, "(unclosed", "unclosed group"),
    (cfg_grammar, "root ::== x", "neither Lark nor GBNF"),
    (cfg_grammar, "start: missing_rule", "missing_rule"),
])
def test_regexes_and_grammars_the_library_cannot_compile_say_why(tokenizer, build, source, words):
    with pytest.raises(GrammarError) as info:
        check_grammar(build(source), tokenizer)
    assert words in str(info.value)


def test_a_grammar_whose_first_mask_is_too_slow_is_refused_before_it_reaches_an_engine(tokenizer):
    """This regex compiles at once, then spends over a second on its first mask here (and fails at the
    next token): refused at the check, with what it took. A usual regex is well inside the budget."""
    with pytest.raises(GrammarError, match="too complex to follow while decoding"):
        check_grammar(regex_grammar("(a{1000}){1000}"), tokenizer, first_mask_budget_s=0.2)
    check_grammar(regex_grammar(r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)"), tokenizer, first_mask_budget_s=0.2)
