"""The fast tier's own parts: the trained tokenizer and the fake runner's checks on the engine."""

from __future__ import annotations

import pytest
from dsnode.central.bundled.tokenizer import IM_END

from tests.support.engines import FakeRunner, reply_script

from .test_batching import collect, request


def test_the_fast_tokenizer_renders_chatml_and_ends_at_im_end(fast_tokenizer):
    messages = [{"role": "user", "content": "Call me Ishmael."}]
    rendered = fast_tokenizer.render_chat(messages)
    assert rendered == "<|im_start|>user\nCall me Ishmael.<|im_end|>\n<|im_start|>assistant\n"
    ids = fast_tokenizer.encode_chat(messages)
    assert fast_tokenizer.decode(ids, skip_special_tokens=False) == rendered
    assert fast_tokenizer.eos_token_ids == {fast_tokenizer.tokenizer.token_to_id(IM_END)}


async def test_each_request_can_get_its_own_answer(make_engine):
    engine = await make_engine()
    engine.answer(lambda r: f"Reply to {r.request_id}.")
    texts = [(await collect(engine.generate(request(rid))))[0] for rid in ("a", "b")]
    assert texts == ["Reply to a.", "Reply to b."]
    assert [r.request_id for r in engine.requests] == ["a", "b"] and engine.aborted == []


def test_the_runner_refuses_positions_fed_out_of_order(fast_tokenizer):
    runner = FakeRunner(fast_tokenizer.vocab_size, reply_script((7,), end=None))
    runner.expect(request("r"))
    runner.prefill("r#0", (1, 2, 3), start=0)
    with pytest.raises(AssertionError, match="prefilled at 5, its cache holds 3"):
        runner.prefill("r#0", (4,), start=5)
    runner.release("r#0")
    with pytest.raises(AssertionError, match="no cache"):
        runner.decode(["r#0"], [7])
