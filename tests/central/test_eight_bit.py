"""8-bit weights in the `deepspeed` backend (`dsnode.central.eight_bit`, `eight_bit_load`): DeepSeek's FP8
checkpoint layout (float8_e4m3fn weights + float32 `weight_scale_inv` per 128 × 128 block, written
here with safetensors) loaded by CPU ranks as int8 W8A16, and `quantization = "int8"` from a float
checkpoint, the routed experts included.

Agreement is measured two ways on 6 prompts × 24 greedy tokens against the fp32 reference:
- free-running: tokens equal before the first divergence (one near-tie flip loses the rest of its prompt);
- teacher-forced: at each of the 144 positions, given the reference's own prefix, the next greedy token
  equals the reference's (each step judged on its own).
Both models here are the bundled MoE (trained weights: clear margins between tokens). Random weights
are near-ties everywhere: on the 18-expert tiny DeepSeek-V3, FP8 itself agrees with fp32 on 97/144
teacher-forced tokens, so that model is used for memory, not for agreement."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import pytest_asyncio
from dsnode.config import BatchingSection
from dsnode.hfconfig import read_hf_config
from dsnode.sizing import WeightFormat, model_shape, rank_bytes, spread_experts

from . import tiny_moe
from .conftest import PROMPTS, _loaded, collect, model_section, token_ids

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

TOKENS = 24
LOAD_OVERHEAD = 32 * 2**20  # resident bytes a rank may add while loading beyond its shard (as for fp32)


def fp8_folders(tmp_path_factory, source: Path, name: str) -> tuple[Path, Path]:
    fp8, dequantized = tmp_path_factory.mktemp(f"{name}-fp8"), tmp_path_factory.mktemp(f"{name}-dequantized")
    tiny_moe.write_fp8(source, fp8, dequantized)
    return fp8, dequantized


@pytest.fixture(scope="module")
def bundled_fp8(tmp_path_factory, moe_dir):
    """(FP8 folder, the same numbers dequantized to float32) of the bundled MoE."""
    return fp8_folders(tmp_path_factory, moe_dir, "bundled")


@pytest.fixture(scope="module")
def reference(moe_dir, bundled_fp8):
    """Greedy tokens of float32 transformers: the bundled MoE itself, and its FP8 copy dequantized."""
    import torch
    from dsnode.inference.tokenizer import TextTokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    tokenizer = TextTokenizer.from_folder(moe_dir)
    out = {}
    for name, folder in (("fp32", moe_dir), ("fp8_dequantized", bundled_fp8[1])):
        model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        out[name] = {p: tiny_moe.greedy(model, tokenizer.encode(p), TOKENS) for p in PROMPTS}
    return out


def _engine(folder: Path, **model: object):
    from dsnode.central.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(model_section(folder, "deepspeed", tensor_parallel=2, device="cpu", **model),
                           BatchingSection())


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fp8_on_cpu(bundled_fp8):
    async for engine in _loaded(_engine(bundled_fp8[0])):
        yield engine


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def int8_from_fp32(moe_dir):
    async for engine in _loaded(_engine(moe_dir, quantization="int8")):
        yield engine


async def free_running(engine, want: dict[str, list[int]]) -> int:
    agree = 0
    for prompt, tokens in want.items():
        ids = engine.tokenizer.encode(prompt)
        got = token_ids(await collect(engine, ids, max_tokens=TOKENS, temperature=0.0, ignore_eos=True))
        agree += next((i for i, (a, b) in enumerate(zip(tokens, got)) if a != b), len(tokens))
    return agree


async def teacher_forced(engine, want: dict[str, list[int]]) -> int:
    async def next_token(ids: list[int]) -> int:
        return token_ids(await collect(engine, ids, max_tokens=1, temperature=0.0, ignore_eos=True))[0]

    asked = [(engine.tokenizer.encode(p) + tokens[:i], tokens[i]) for p, tokens in want.items()
             for i in range(len(tokens))]
    got = await asyncio.gather(*(next_token(ids) for ids, _ in asked))
    return sum(g == w for g, (_, w) in zip(got, asked))


def test_the_fp8_layout_loads_exactly_and_int8_closely_in_one_process(bundled_fp8, moe_dir):
    """Without ranks: the FP8 copy kept as FP8 (`weights = "fp8"`, its reference forward off-GPU)
    gives the dequantized model's logits; converted to int8 per row, logits within a few percent."""
    import torch
    from dsnode.central.eight_bit import Fp8Experts, Fp8Linear, Int8Experts, Int8Linear
    from dsnode.central.shard_loader import empty_shard, read_shard
    from dsnode.inference.tokenizer import TextTokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    reference = AutoModelForCausalLM.from_pretrained(str(bundled_fp8[1])).eval()
    ids = torch.tensor([TextTokenizer.from_folder(moe_dir).encode(PROMPTS[0])])
    with torch.no_grad():
        want = reference(ids).logits
        for weights, kinds, tolerance in (("fp8", (Fp8Linear, Fp8Experts), 1e-4),
                                          ("int8", (Int8Linear, Int8Experts), 0.05)):
            model = read_shard(empty_shard(bundled_fp8[0], torch.float32, 0, 1, lambda t: None, weights))
            assert {type(m) for m in model.modules()} >= set(kinds)
            error = ((model(ids).logits - want).norm() / want.norm()).item()
            assert error < tolerance, (weights, error)


async def test_an_fp8_checkpoint_loads_on_cpu_ranks_and_agrees_with_fp32(fp8_on_cpu, reference):
    info = fp8_on_cpu.info
    assert info.extra["weights"] == "int8" and info.extra["deepspeed_init_inference"] is False
    want = reference["fp8_dequantized"]
    free = await free_running(fp8_on_cpu, want)
    forced = await teacher_forced(fp8_on_cpu, want)
    print(f"FP8 checkpoint as int8 on 2 CPU ranks vs dequantized fp32: free-running {free}/144, "
          f"teacher-forced {forced}/144")
    assert free >= 0.9 * 144 and forced >= 0.9 * 144
    for rank in info.extra["ranks"]:  # bytes before (the model dtype) and after, per rank, in /cluster
        assert rank["weights_bytes"] < 0.45 * rank["weights_bytes_in_model_dtype"]


async def test_int8_quantizes_the_routed_experts_and_agrees_with_fp32(int8_from_fp32, moe_dir, reference):
    info = int8_from_fp32.info
    assert (info.quantization, info.extra["weights"], info.tensor_parallel) == ("int8", "int8", 2)
    config = read_hf_config(moe_dir)
    hidden, inter = config["hidden_size"], config["moe_intermediate_size"]
    shape = model_shape(config)
    for rank in info.extra["ranks"]:
        held = len(spread_experts(shape.routed_experts, 2)[rank["rank"]])
        # one byte a weight (gate, up, down), and one float32 scale per output row (2I + H)
        one_expert = 3 * hidden * inter + 4 * (2 * inter + hidden)
        assert rank["weights_bytes_by_kind"]["routed_experts"] == held * shape.moe_layers * one_expert
        # before: the same shard in float32, every linear whole as the 8-bit ranks hold them
        before = rank_bytes(shape, 2, rank["rank"], WeightFormat("fp32", 4, 4, 4, split_linears=False))
        assert rank["weights_bytes_in_model_dtype"] == sum(before.values())
        assert rank["weights_bytes"] < 0.45 * rank["weights_bytes_in_model_dtype"]
    want = reference["fp32"]
    free = await free_running(int8_from_fp32, want)
    forced = await teacher_forced(int8_from_fp32, want)
    print(f"quantization = int8 on 2 CPU ranks vs fp32: free-running {free}/144, teacher-forced {forced}/144")
    assert forced >= 0.9 * 144


async def test_a_rank_holds_its_fp8_shard_in_8_bits_while_loading(tmp_path_factory, v3):
    """The 18-expert tiny DeepSeek-V3 in FP8 (4 shards): each rank's resident memory grows by at most
    its shard in 8 bits (int8 weights, float32 row scales, the rest in float32) plus a fixed overhead,
    well below the same shard in float32."""
    from dsnode.central.checkpoint import FP8, Checkpoint

    fp8, _ = fp8_folders(tmp_path_factory, v3[0], "v3")
    checkpoint = Checkpoint.open(fp8)
    assert len({e.file for e in checkpoint.entries.values()}) == 4
    async for engine in _loaded(_engine(fp8)):
        for rank in engine.info.extra["ranks"]:
            mine = spread_experts(18, 2)[rank["rank"]]
            eight_bit, fp32 = _shard_bytes(checkpoint, FP8, mine)
            grew = rank["load_peak_rss_bytes"] - rank["load_rss_before_bytes"]
            print(f"rank {rank['rank']}: grew {grew / 2**20:.1f} MiB; "
                  f"shard in 8 bits {eight_bit / 2**20:.1f} MiB, "
                  f"in float32 {fp32 / 2**20:.1f} MiB")
            assert rank["load_peak_rss_exact"]
            assert grew <= eight_bit + LOAD_OVERHEAD, (rank["rank"], grew, eight_bit)
            assert eight_bit + LOAD_OVERHEAD < fp32  # a rank that held its shard in float32 would fail here


def _shard_bytes(checkpoint, fp8: str, experts: range) -> tuple[int, int]:
    """A rank's share of the checkpoint: (in 8 bits: int8 + a float32 scale per row; the rest float32,
    as the rank holds it on CPU) and (all of it in float32)."""
    eight_bit = fp32 = 0
    for name, entry in checkpoint.entries.items():
        if name.endswith("_scale_inv"):
            continue
        if ".mlp.experts." in name and int(name.split(".mlp.experts.")[1].split(".")[0]) not in experts:
            continue
        numel = entry.nbytes // (1 if entry.dtype == fp8 else 2)  # the rest is stored BF16
        fp32 += 4 * numel
        eight_bit += numel + 4 * entry.shape[0] if entry.dtype == fp8 else 4 * numel
    return eight_bit, fp32


def test_scales_that_do_not_fit_their_weight_end_dsnode_serve_with_exit_1(tmp_path, bundled_fp8):
    """The daemon names the tensor before any rank starts, and exits 1."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from tests.support.nodes import ServeProcess, free_port, node_toml

    folder = tmp_path / "model"
    shutil.copytree(bundled_fp8[0], folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.self_attn.q_b_proj.weight_scale_inv"  # q_b_proj (192, 96): 2 x 1 blocks
    file = folder / index[name]
    tensors = load_file(str(file))
    tensors[name] = torch.ones((1, 1))
    save_file(tensors, str(file), metadata={"format": "pt"})
    port = free_port()
    config = tmp_path / "dsnode.toml"
    config.write_text(node_toml("central-fp8", "central", port, "tiny-fp8", folder, "deepspeed",
                                model_extra='tensor_parallel = 2\ndevice = "cpu"\n'))
    node = ServeProcess("central-fp8", config, port, tmp_path / "serve.log").start()
    try:
        assert node.process.wait(timeout=120) == 1
    finally:
        node.kill()
        node.stop()
    log = node.log_text()
    assert f"tensor '{name}' is F32 [1, 1], but its FP8 weight 'model.layers.0.self_attn.q_b_proj.weight' " \
           "[192, 96] needs float scales of shape [2, 1]" in log
    assert "rank_started" not in log and "Traceback" not in log
