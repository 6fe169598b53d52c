"""`TransformersEngine` on the bundled tiny MoE: exact greedy tokens, sampling, stops, limits,
cancellation, admission. The same `BatchingEngine` drives the DeepSpeed engine."""

from __future__ import annotations

import asyncio
import time

import pytest
from dsnode.config import BatchingSection
from dsnode.inference.engine import (
    ContextLengthExceeded,
    EngineError,
    GenerationRequest,
    QueueFull,
    SamplingParams,
)

from .conftest import (
    PROMPTS,
    collect,
    model_section,
    next_turn_reuses_the_cache,
    shared_prompt_is_reused,
    third_turn_reuses_two_turns,
    token_ids,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_greedy_equals_model_generate(transformers_moe, reference_greedy):
    for prompt in PROMPTS:
        ids = transformers_moe.tokenizer.encode(prompt)
        deltas = await collect(transformers_moe, ids, max_tokens=24, temperature=0.0)
        assert token_ids(deltas) == reference_greedy(ids, 24), prompt
    text = "".join(d.text for d in await collect(transformers_moe, transformers_moe.tokenizer.encode(PROMPTS[0]),
                                                  max_tokens=8, temperature=0.0))
    assert text.startswith(" of times")  # the model is trained: greedy output is real text


async def test_concurrent_requests_match_each_alone(transformers_moe):
    prompts = [transformers_moe.tokenizer.encode(p) for p in PROMPTS] * 2
    alone = [token_ids(await collect(transformers_moe, ids, max_tokens=20, temperature=0.0, ignore_eos=True))
             for ids in prompts[: len(PROMPTS)]]
    together = await asyncio.gather(
        *(collect(transformers_moe, ids, max_tokens=20, temperature=0.0, ignore_eos=True) for ids in prompts)
    )
    assert [token_ids(d) for d in together] == alone * 2


async def test_same_seed_same_tokens_alone_or_batched(transformers_moe):
    ids = transformers_moe.tokenizer.encode("The quick brown fox")  # outside the corpus: seeds can differ
    params = dict(max_tokens=16, temperature=1.5, ignore_eos=True)
    first = token_ids(await collect(transformers_moe, ids, seed=7, **params))
    batched = await asyncio.gather(
        collect(transformers_moe, ids, seed=7, **params),
        *(collect(transformers_moe, transformers_moe.tokenizer.encode(p), seed=1, **params) for p in PROMPTS[2:5]),
    )
    assert token_ids(batched[0]) == first
    others = [token_ids(await collect(transformers_moe, ids, seed=seed, **params)) for seed in (8, 9, 10)]
    assert any(o != first for o in others)  # the seed matters


async def test_stop_string_ends_the_text_before_it(transformers_moe):
    ids = transformers_moe.tokenizer.encode(PROMPTS[0])
    full = "".join(d.text for d in await collect(transformers_moe, ids, max_tokens=24, temperature=0.0))
    assert "worst" in full
    deltas = await collect(transformers_moe, ids, max_tokens=24, temperature=0.0, stop=("worst",))
    assert "".join(d.text for d in deltas) == full[: full.index("worst")]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens < 24


async def test_max_tokens_ends_with_length(transformers_moe):
    ids = transformers_moe.tokenizer.encode(PROMPTS[2])
    deltas = await collect(transformers_moe, ids, max_tokens=5, temperature=0.0, ignore_eos=True)
    assert len(token_ids(deltas)) == 5
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 5
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].prompt_tokens == len(ids)


async def test_cancellation_frees_the_batch_slot(transformers_moe):
    ids = transformers_moe.tokenizer.encode(PROMPTS[3])
    stream = transformers_moe.generate(
        GenerationRequest("cancel-me", tuple(ids), SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True))
    )
    await anext(stream)
    await anext(stream)
    assert transformers_moe.load_figures().running == 1
    await stream.aclose()  # the client went away
    assert await _eventually(lambda: transformers_moe.load_figures().running == 0)
    assert transformers_moe.load_figures().batch_tokens == 0


async def test_context_limit_comes_from_the_model_config(transformers_moe, moe_dir):
    import json

    model_limit = json.loads((moe_dir / "config.json").read_text())["max_position_embeddings"]
    assert transformers_moe.info.max_context == model_limit == 2048
    ids = transformers_moe.tokenizer.encode(PROMPTS[0])
    with pytest.raises(ContextLengthExceeded) as refused:
        await collect(transformers_moe, ids, max_tokens=model_limit, temperature=0.0)
    assert f"maximum context length is {model_limit} tokens" in str(refused.value)
    assert f"{len(ids)} in the prompt, {model_limit} for the completion" in str(refused.value)


async def test_configured_context_lowers_the_limit(moe_dir):
    from dsnode.central.transformers_engine import TransformersEngine

    engine = TransformersEngine(model_section(moe_dir, "transformers", max_context=64), BatchingSection())
    await engine.load()
    try:
        assert engine.info.max_context == 64
        ids = engine.tokenizer.encode(PROMPTS[0])
        assert len(await collect(engine, ids, max_tokens=64 - len(ids), temperature=0.0, ignore_eos=True)) > 0
        with pytest.raises(ContextLengthExceeded, match="maximum context length is 64 tokens"):
            await collect(engine, ids, max_tokens=64 - len(ids) + 1)
    finally:
        await engine.close()


async def test_full_queue_refuses_at_once_with_queue_full(moe_dir):
    from dsnode.central.transformers_engine import TransformersEngine

    engine = TransformersEngine(model_section(moe_dir, "transformers"), BatchingSection(max_running=1, max_queue=1))
    await engine.load()
    try:
        ids = tuple(engine.tokenizer.encode(PROMPTS[0]))
        long = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)
        running = engine.generate(GenerationRequest("running", ids, long))
        await anext(running)  # running: the one slot is taken
        waiting = engine.generate(GenerationRequest("waiting", ids, long))
        waiting_first = asyncio.ensure_future(anext(waiting))  # admitted to the queue, waits for the slot
        assert await _eventually(lambda: engine.load_figures().waiting == 1)
        with pytest.raises(QueueFull) as full:
            await collect(engine, ids, max_tokens=4)
        assert full.value.retry_after_s >= 1
        await running.aclose()
        assert (await waiting_first).token_ids  # the queued request got the freed slot
        await waiting.aclose()
    finally:
        await engine.close()


async def test_int8_agrees_with_fp32(moe_dir, transformers_moe):
    """LLM.int8 rounds each weight row to 127 levels of its absmax (error below 0.4% of the row's
    largest weight, activations per token likewise); on a trained model that moves logits far less
    than the margin between the top two tokens, so greedy tokens should almost all agree. We require
    90% of positions to agree before the first divergence, over all prompts."""
    from dsnode.central.transformers_engine import TransformersEngine

    engine = TransformersEngine(model_section(moe_dir, "transformers", quantization="int8"), BatchingSection())
    await engine.load()
    try:
        agree = total = 0
        for prompt in PROMPTS:
            ids = engine.tokenizer.encode(prompt)
            want = token_ids(await collect(transformers_moe, ids, max_tokens=24, temperature=0.0, ignore_eos=True))
            got = token_ids(await collect(engine, ids, max_tokens=24, temperature=0.0, ignore_eos=True))
            agree += _common_prefix(want, got)
            total += len(want)
        assert agree / total >= 0.9, f"{agree}/{total} greedy tokens agree"
        assert engine.info.quantization == "int8"
        assert engine.info.extra["weights_bytes"] < transformers_moe.info.extra["weights_bytes"]
    finally:
        await engine.close()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


async def _eventually(condition, timeout: float = 30.0) -> bool:
    """Poll a condition the engine thread makes true soon; the timeout only bounds a broken run."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.mark.parametrize("architecture", ["mixtral", "qwen2_moe"])
async def test_other_moe_architectures_match_model_generate(architecture, tmp_path, moe_dir):
    """Mixtral and Qwen-MoE through the same runner (tiny, random weights, the bundled tokenizer)."""
    import shutil

    import torch
    from dsnode.central.transformers_engine import TransformersEngine
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=512, bos_token_id=0,
                  eos_token_id=2, pad_token_id=3)
    config = (MixtralConfig(num_local_experts=4, **common) if architecture == "mixtral" else
              Qwen2MoeConfig(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64, **common))
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(moe_dir / name, tmp_path / name)
    engine = TransformersEngine(model_section(tmp_path, "transformers"), BatchingSection())
    await engine.load()
    try:
        assert engine.info.extra["model_type"] == architecture
        for prompt in PROMPTS[:3]:
            ids = engine.tokenizer.encode(prompt)
            got = token_ids(await collect(engine, ids, max_tokens=12, temperature=0.0, ignore_eos=True))
            with torch.no_grad():
                want = hf.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
            assert got == want[0, len(ids):].tolist(), prompt
    finally:
        await engine.close()


async def test_a_prefill_that_raises_fails_its_own_request_only(moe_dir):
    """A prompt the model cannot take (here: an injected error) ends that request with EngineError;
    a request decoding in the same steps goes on and produces exactly what it produces alone."""
    from dsnode.central.transformers_engine import TransformersEngine

    engine = TransformersEngine(model_section(moe_dir, "transformers"), BatchingSection())
    await engine.load()
    try:
        runner = engine._require_loaded().runner
        prefill = runner.prefill

        def failing_prefill(seq_id, token_ids, start):
            if seq_id.startswith("bad"):
                raise RuntimeError("injected: this prompt breaks the model")
            return prefill(seq_id, token_ids, start)

        runner.prefill = failing_prefill
        ids = tuple(engine.tokenizer.encode(PROMPTS[0]))
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        alone = token_ids([d async for d in engine.generate(GenerationRequest("alone", ids, params))])
        good = engine.generate(GenerationRequest("good", ids, params))
        deltas = [await anext(good)]  # decoding now
        for n in range(3):  # each joins the running batch and fails at its prefill
            with pytest.raises(EngineError, match="injected: this prompt breaks the model"):
                await collect_as(engine, f"bad-{n}", ids)
        deltas += [d async for d in good]
        assert token_ids(deltas) == alone and deltas[-1].finish_reason == "length"
        assert engine.health().ready
        assert await _eventually(lambda: engine.load_figures().running == 0)
    finally:
        await engine.close()


async def collect_as(engine, request_id: str, ids: tuple[int, ...]) -> list:
    request = GenerationRequest(request_id, ids, SamplingParams(max_tokens=4, temperature=0.0))
    return [d async for d in engine.generate(request)]


async def test_a_conversations_next_turn_reuses_the_cache_and_answers_as_generate_does(transformers_moe,
                                                                                      reference_greedy):
    """The transformers engine keeps finished prompts' cache in host memory too: a prompt that begins
    with an earlier prompt and its answer computes only the rest, and answers as `generate` does."""
    await next_turn_reuses_the_cache(transformers_moe, reference_greedy, "It was the best of times, it was the "
                                     "worst of times, it was the age of wisdom", " Four score and seven years ago", 12)
    runner = transformers_moe._loaded.runner
    assert 0 < runner.prompts.nbytes <= 1024 * 2**20 and transformers_moe.load_figures().prompt_cache_bytes == \
        runner.prompts.nbytes


async def test_n_choices_share_a_prompt_prefilled_once(transformers_moe, reference_greedy):
    """The first of `n` choices keeps its prompt once prefilled; the others take it."""
    await shared_prompt_is_reused(transformers_moe, reference_greedy, "We hold these truths to be self-evident, that all "
                                  "men are created equal, that they are endowed", 8)


async def test_a_third_turn_takes_its_prefix_from_two_turns_copies(transformers_moe, reference_greedy):
    await third_turn_reuses_two_turns(transformers_moe, reference_greedy, "It was the best of times, it was the worst of "
                                      "times, it was", (" We hold these truths to be", " Four score and seven"), 10)
