"""Expert parallelism in the `deepspeed` backend, for real: 2 and 4 CPU ranks over gloo, each holding a
range of the routed experts, on the bundled MoE and on a tiny DeepSeek-V3 with 18 routed experts (4
ranks hold 5, 5, 4, 4), a non-zero correction bias and a checkpoint in 9 shards."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
from dsnode.config import BatchingSection
from dsnode.sizing import FORMATS, model_shape, rank_bytes, spread_experts

from . import tiny_moe
from .conftest import PROMPTS, _loaded, collect, model_section, token_ids

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

MAX_TOKENS = 16
LOAD_OVERHEAD = 32 * 2**20  # resident bytes a rank may add while loading beyond the tensors it reads


@pytest.fixture(scope="module")
def v3_reference(v3):
    _, model = v3
    return {prompt: tiny_moe.greedy(model, _ids(prompt), MAX_TOKENS) for prompt in PROMPTS}


def _ids(prompt: str) -> list[int]:
    from dsnode.inference.tokenizer import TextTokenizer

    from tests.support.models import bundled_models

    return TextTokenizer.from_folder(bundled_models().moe).encode(prompt)


async def _engine(folder, ranks: int):
    from dsnode.central.deepspeed_engine import DeepSpeedEngine

    section = model_section(folder, "deepspeed", tensor_parallel=ranks, device="cpu")
    return DeepSpeedEngine(section, BatchingSection())


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def v3_ep2(v3):
    async for engine in _loaded(await _engine(v3[0], 2)):
        yield engine


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def v3_ep4(v3):
    async for engine in _loaded(await _engine(v3[0], 4)):
        yield engine


async def _greedy(engine, prompt: str) -> list[int]:
    ids = engine.tokenizer.encode(prompt)
    return token_ids(await collect(engine, ids, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))


def test_the_correction_bias_decides_routes(v3, v3_reference):
    """Without it the greedy tokens change: the equality tests below would see a rank that lost it."""
    import torch

    _, model = v3
    biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    saved = [b.clone() for b in biases]
    try:
        for b in biases:
            b.zero_()
        assert any(tiny_moe.greedy(model, _ids(p), MAX_TOKENS) != want for p, want in v3_reference.items())
    finally:
        with torch.no_grad():
            for b, s in zip(biases, saved):
                b.copy_(s)


async def test_deepseek_v3_tokens_equal_single_process_transformers(v3_ep2, v3_ep4, v3_reference):
    for engine in (v3_ep2, v3_ep4):
        assert engine.info.extra["expert_parallel"]["ranks"] == engine.info.tensor_parallel
        for prompt, want in v3_reference.items():
            assert await _greedy(engine, prompt) == want, (engine.info.tensor_parallel, prompt)


async def test_bundled_moe_tokens_equal_single_process_transformers(deepspeed_tp2, deepspeed_tp4,
                                                                    reference_greedy):
    for engine in (deepspeed_tp2, deepspeed_tp4):
        held = [r["routed_experts_held"] for r in engine.info.extra["ranks"]]
        assert held == [8 // engine.info.tensor_parallel] * engine.info.tensor_parallel
        for prompt in PROMPTS:
            ids = engine.tokenizer.encode(prompt)
            want = reference_greedy(ids, 24)
            got = token_ids(await collect(engine, ids, max_tokens=24, temperature=0.0))
            assert got == want, (engine.info.tensor_parallel, prompt)


async def test_concurrent_requests_equal_each_alone(v3_ep4, v3_reference):
    together = await asyncio.gather(*(_greedy(v3_ep4, p) for p in PROMPTS * 2))
    assert together == list(v3_reference.values()) * 2
    assert v3_ep4.load_figures().running == 0


async def test_each_rank_holds_its_share_of_the_routed_experts(v3_ep4, v3):
    """18 experts on 4 ranks: contiguous ranges 0-4, 5-9, 10-13, 14-17; bytes = total/4 ± one expert."""
    from dsnode.hfconfig import read_hf_config

    shape = model_shape(read_hf_config(v3[0]))
    ranks = v3_ep4.info.extra["ranks"]
    assert [r["routed_experts"] for r in ranks] == [[0, 4], [5, 9], [10, 13], [14, 17]]
    assert "ranks 0-1 hold 5, ranks 2-3 hold 4" in v3_ep4.info.extra["expert_parallel"]["spread"]
    total = shape.routed_expert_params * 4  # float32
    one_expert = shape.moe_layers * shape.expert_params * 4
    per_rank = [r["weights_bytes_by_kind"]["routed_experts"] for r in ranks]
    assert sum(per_rank) == total
    assert all(abs(b - total / 4) <= one_expert for b in per_rank), per_rank


async def test_weights_per_rank_are_what_dsnode_plan_says(v3_ep2, v3_ep4, deepspeed_tp2, deepspeed_tp4):
    """The plan's arithmetic (`dsnode.sizing`) against what each rank really holds, kind by kind:
    exactly where every split dimension divides into 64-row shards (AutoTP's grain), and summed
    over the ranks where it does not (the bundled MoE on 4 ranks)."""
    from dsnode.hfconfig import read_hf_config

    for engine in (v3_ep2, v3_ep4, deepspeed_tp2, deepspeed_tp4):
        shape, ranks = model_shape(read_hf_config(engine._model.path)), engine.info.tensor_parallel
        measured = [r["weights_bytes_by_kind"] for r in engine.info.extra["ranks"]]
        planned = [{k: v for k, v in rank_bytes(shape, ranks, r, FORMATS["fp32"]).items() if v}
                   for r in range(ranks)]
        if engine is deepspeed_tp4:  # hidden 128 over 4 ranks: AutoTP gives 64, 64, 0, 0 rows of the head
            assert _summed(measured) == _summed(planned)
        else:
            assert measured == planned, ranks


def _summed(per_rank: list[dict[str, int]]) -> dict[str, int]:
    return {kind: sum(r.get(kind, 0) for r in per_rank) for kind in per_rank[0]}


async def test_a_rank_reads_only_its_share_while_loading(v3_ep4, v3):
    """Peak resident memory while loading ≤ the bytes this rank reads + a fixed overhead; the whole
    checkpoint is far above that bound, so loading the whole model on a rank would fail here."""
    from dsnode.central.checkpoint import Checkpoint

    checkpoint = Checkpoint.open(v3[0])
    assert len({e.file for e in checkpoint.entries.values()}) >= 4  # several shards
    experts = [e.nbytes for n, e in checkpoint.entries.items() if ".mlp.experts." in n]
    whole = sum(e.nbytes for e in checkpoint.entries.values())
    rest = whole - sum(experts)
    spread = spread_experts(18, 4)
    for rank in v3_ep4.info.extra["ranks"]:
        assert rank["load_peak_rss_exact"]
        share = rest + sum(experts) * len(spread[rank["rank"]]) // 18
        grew = rank["load_peak_rss_bytes"] - rank["load_rss_before_bytes"]
        assert grew <= share + LOAD_OVERHEAD, (rank["rank"], grew, share)
        assert share + LOAD_OVERHEAD < whole * 0.6  # the test can tell a whole-model load apart


@pytest.mark.parametrize("architecture", ["mixtral", "qwen2_moe"])
async def test_other_moe_architectures_with_two_ranks_equal_transformers(architecture, tmp_path, moe_dir):
    import torch

    torch.set_num_threads(1)
    model = tiny_moe.build(architecture, tmp_path, moe_dir)
    async for engine in _loaded(await _engine(tmp_path, 2)):
        assert [r["routed_experts"] for r in engine.info.extra["ranks"]] == [[0, 2], [3, 5]]
        for prompt in PROMPTS[:3]:
            assert await _greedy(engine, prompt) == tiny_moe.greedy(model, _ids(prompt), MAX_TOKENS), prompt


async def test_bfloat16_ranks_keep_the_router_in_float32(moe_dir, deepspeed_tp2):
    """init_inference casts the whole module to the model dtype; the router (and its correction bias)
    get their float32 values back, as transformers keeps them: 4 bytes a parameter in the plan too."""
    from dsnode.central.deepspeed_engine import DeepSpeedEngine
    from dsnode.hfconfig import read_hf_config

    section = model_section(moe_dir, "deepspeed", tensor_parallel=2, device="cpu", dtype="bfloat16")
    async for engine in _loaded(DeepSpeedEngine(section, BatchingSection())):
        shape = model_shape(read_hf_config(moe_dir))
        for measured in engine.info.extra["ranks"]:
            planned = rank_bytes(shape, 2, measured["rank"], FORMATS["bf16"])
            assert measured["weights_bytes_by_kind"] == planned
        fp32 = {r["rank"]: r["weights_bytes_by_kind"]["router"] for r in deepspeed_tp2.info.extra["ranks"]}
        assert [r["weights_bytes_by_kind"]["router"] for r in engine.info.extra["ranks"]] == [fp32[0], fp32[1]]
        ids = engine.tokenizer.encode(PROMPTS[0])
        assert token_ids(await collect(engine, ids, max_tokens=8, temperature=0.0))  # it serves
