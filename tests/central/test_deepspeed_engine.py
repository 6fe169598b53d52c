"""`backend = "deepspeed"` on the bundled tiny MoE (DeepSeek-V3 architecture), for real: worker
processes, `deepspeed.init_inference`, tensor parallel 2 over gloo on CPU, and a rank killed mid-request."""

from __future__ import annotations

import asyncio
import os
import signal

import psutil
import pytest
from dsnode.config import BatchingSection
from dsnode.inference.engine import EngineNotReady, GenerationRequest, SamplingParams

from .conftest import (
    PROMPTS,
    collect,
    model_section,
    next_turn_reuses_the_cache,
    shared_prompt_is_reused,
    third_turn_reuses_two_turns,
    token_ids,
)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]


async def test_tp1_tokens_equal_plain_transformers(deepspeed_tp1, reference_greedy):
    assert deepspeed_tp1.info.extra["deepspeed_init_inference"] is True
    for prompt in PROMPTS:
        ids = deepspeed_tp1.tokenizer.encode(prompt)
        assert token_ids(await collect(deepspeed_tp1, ids, max_tokens=24, temperature=0.0)) == reference_greedy(ids, 24)


async def test_tp2_gives_the_same_greedy_tokens_as_tp1(deepspeed_tp2, deepspeed_tp1):
    info = deepspeed_tp2.info
    assert (info.backend, info.tensor_parallel, info.device) == ("deepspeed", 2, "cpu")
    assert info.extra["sharded_linears"] > 0  # AutoTP really split layers between the ranks
    for prompt in PROMPTS:
        ids = deepspeed_tp2.tokenizer.encode(prompt)
        tp1 = token_ids(await collect(deepspeed_tp1, ids, max_tokens=24, temperature=0.0, ignore_eos=True))
        tp2 = token_ids(await collect(deepspeed_tp2, ids, max_tokens=24, temperature=0.0, ignore_eos=True))
        assert tp2 == tp1, prompt


async def test_tp2_scores_the_prompt_as_transformers_does(deepspeed_tp2, hf_moe):
    """prompt_logprobs (echo + logprobs) through the ranks' `prefill_all`: the model's own log-softmax."""
    import torch

    ids = deepspeed_tp2.tokenizer.encode(PROMPTS[0])
    first = (await collect(deepspeed_tp2, ids, max_tokens=1, temperature=0.0, prompt_logprobs=1))[0]
    with torch.no_grad():
        rows = torch.log_softmax(hf_moe(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
    entries = first.prompt_logprobs
    assert [e.token_id for e in entries] == ids and entries[0].logprob is None
    want = rows[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    assert [e.logprob for e in entries[1:]] == pytest.approx(want, abs=1e-4)
    assert [e.top[0][0] for e in entries[1:]] == rows.argmax(-1).tolist()


async def test_tp2_concurrent_requests_match_each_alone(deepspeed_tp2):
    prompts = [deepspeed_tp2.tokenizer.encode(p) for p in PROMPTS]
    alone = [token_ids(await collect(deepspeed_tp2, ids, max_tokens=16, temperature=0.0, ignore_eos=True))
             for ids in prompts]
    together = await asyncio.gather(
        *(collect(deepspeed_tp2, ids, max_tokens=16, temperature=0.0, ignore_eos=True) for ids in prompts * 2)
    )
    assert [token_ids(d) for d in together] == alone * 2
    assert deepspeed_tp2.load_figures().running == 0


async def test_tp2_ranks_reuse_a_conversations_prefix_together(deepspeed_tp2, reference_greedy):
    """Each rank keeps its shard's prompt cache; they look a sequence up alike (and check that they
    agree), so the next turn of a conversation computes only its new tokens, on every rank."""
    await next_turn_reuses_the_cache(deepspeed_tp2, reference_greedy, "We hold these truths to be self-evident, "
                                     "that all men are created equal, that", " It was the best of times", 10)
    assert deepspeed_tp2.load_figures().prompt_cache_bytes > 0  # rank 0's, as of the last admission


async def test_tp2_refuses_over_the_model_context(deepspeed_tp2):
    from dsnode.inference.engine import ContextLengthExceeded

    ids = deepspeed_tp2.tokenizer.encode(PROMPTS[0])
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 2048 tokens"):
        await collect(deepspeed_tp2, ids, max_tokens=2048)


async def test_a_killed_rank_fails_requests_cleanly_and_the_node_goes_not_ready(moe_dir):
    from dsnode.central.deepspeed_engine import DeepSpeedEngine

    engine = DeepSpeedEngine(model_section(moe_dir, "deepspeed", tensor_parallel=2, device="cpu"), BatchingSection())
    await engine.load()
    try:
        pids = engine.rank_pids
        assert len(pids) == 2 and engine.health().ready
        ids = tuple(engine.tokenizer.encode(PROMPTS[0]))
        stream = engine.generate(GenerationRequest("doomed", ids, SamplingParams(max_tokens=1500, temperature=0.0,
                                                                                ignore_eos=True)))
        await anext(stream)
        os.kill(pids[1], signal.SIGKILL)  # a follower rank dies mid-request
        with pytest.raises(EngineNotReady, match=r"rank 1 \(pid \d+\) was killed by SIGKILL"):
            async for _ in stream:
                pass
        await asyncio.wait_for(engine.failed.wait(), 60)  # the server exits 1 on this
        health = engine.health()
        assert not health.ready and "rank 1" in health.reason
        with pytest.raises(EngineNotReady):
            await collect(engine, ids, max_tokens=4)
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                       for pid in pids)  # the surviving rank was killed, not left in a collective
    finally:
        await asyncio.wait_for(engine.close(), 60)


async def test_a_rank_that_cannot_load_fails_the_load_with_its_reason(moe_dir, tmp_path):
    """With bitsandbytes (nf4) the rank reads the checkpoint through transformers, so a broken file is
    found by the rank (otherwise the daemon names it first: test_bad_checkpoints.py)."""
    import shutil

    from dsnode.central.deepspeed_engine import DeepSpeedEngine

    for item in moe_dir.iterdir():
        shutil.copy(item, tmp_path / item.name)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    engine = DeepSpeedEngine(model_section(tmp_path, "deepspeed", device="cpu", quantization="nf4"),
                             BatchingSection())
    with pytest.raises(Exception, match="rank 0 failed to load the model"):
        await engine.load()
    assert not engine.health().ready and "failed to load" in engine.health().reason
    assert not engine.failed.is_set()  # a failed load is not a death: the server exits on the load itself
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in engine.rank_pids)
    await engine.close()


async def test_n_choices_share_a_prompt_prefilled_once(deepspeed_tp2, reference_greedy):
    """The first of `n` choices keeps its prompt once prefilled (every rank its shard); the others take it."""
    await shared_prompt_is_reused(deepspeed_tp2, reference_greedy, "We hold these truths to be self-evident, that all "
                                  "men are created equal, that they are endowed", 8)


async def test_a_third_turn_takes_its_prefix_from_two_turns_copies(deepspeed_tp2, reference_greedy):
    await third_turn_reuses_two_turns(deepspeed_tp2, reference_greedy, "It was the best of times, it was the worst of "
                                      "times, it was", (" We hold these truths to be", " Four score and seven"), 10)
