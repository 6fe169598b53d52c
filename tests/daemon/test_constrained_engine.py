"""Constrained decoding in the shared `BatchingEngine` (every backend's): a runner whose logits are
noise still answers valid JSON, batched with free-text requests; a constraint that cannot start fails
its own request only."""

from __future__ import annotations

import asyncio
import json
from typing import Sequence

import jsonschema
import numpy as np
import pytest
from dsnode.config import BatchingSection
from dsnode.inference.batching import BatchingEngine
from dsnode.inference.engine import ConstraintFailed, GenerationRequest, ModelInfo, SamplingParams
from dsnode.inference.grammar import Constraint, json_schema_grammar
from dsnode.inference.runner import Loaded

from tests.daemon.grammar_support import small_tokenizer

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                           "ok": {"type": "boolean"}},
          "required": ["city", "days", "ok"], "additionalProperties": False}


class NoiseRunner:
    """A model that knows nothing: seeded noise for logits (V + 7 padding ids, as real models pad)."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab + 7
        self.rng = np.random.default_rng(0)

    def prefill(self, seq_id: str, token_ids: Sequence[int], start: int) -> np.ndarray:
        return self.rng.normal(0, 3, self.vocab).astype(np.float32)

    def decode(self, seq_ids: Sequence[str], token_ids: Sequence[int]) -> np.ndarray:
        return self.rng.normal(0, 3, (len(seq_ids), self.vocab)).astype(np.float32)

    def release(self, seq_id: str) -> None:
        pass

    def close(self) -> None:
        pass


class NoiseEngine(BatchingEngine):
    def _load_blocking(self) -> Loaded:
        tokenizer = small_tokenizer()
        info = ModelInfo("noise", "test", "none", "none", 4096, "cpu")
        return Loaded(NoiseRunner(tokenizer.vocab_size), tokenizer, info)


async def run(engine: BatchingEngine, request_id: str, constraint: Constraint | None, max_tokens: int):
    free = constraint is None  # free text runs to max_tokens: its steps overlap the constrained ones'
    params = SamplingParams(max_tokens=max_tokens, seed=1, ignore_eos=free)
    deltas = [d async for d in engine.generate(GenerationRequest(request_id, (5, 6, 7), params, constraint))]
    return "".join(d.text for d in deltas), deltas[-1].finish_reason, deltas[-1].completion_tokens


@pytest.fixture
async def engine():
    engine = NoiseEngine(BatchingSection(max_batch_tokens=4096))
    await engine.load()
    yield engine
    await engine.close()


async def test_constrained_requests_batched_with_free_ones_all_answer_valid_json(engine):
    constraint = Constraint(json_schema_grammar(SCHEMA))
    jobs = [run(engine, f"json-{i}", constraint, 120) for i in range(6)] + \
           [run(engine, f"free-{i}", None, 30) for i in range(2)]
    results = await asyncio.gather(*jobs)
    for text, finish, _ in results[:6]:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert [(finish, n) for _, finish, n in results[6:]] == [("length", 30), ("length", 30)]


async def test_a_constraint_that_cannot_start_fails_only_its_request(engine):
    good = Constraint(json_schema_grammar(SCHEMA))
    broken = Constraint('{"grammars": [{"lark_grammar": "start: @nonsense"}]}', param="structured_outputs.grammar")
    results = await asyncio.gather(run(engine, "broken", broken, 40), run(engine, "good", good, 120),
                                   return_exceptions=True)
    assert isinstance(results[0], ConstraintFailed)  # a 400: the client's grammar, not the node
    assert results[0].param == "structured_outputs.grammar"  # the 400 names where the grammar came from
    text, finish, _ = results[1]
    assert finish == "stop" and json.loads(text)["city"] is not None
