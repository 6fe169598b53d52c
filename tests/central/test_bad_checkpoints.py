"""What a central node does with input it cannot serve: a checkpoint missing a shard or a tensor, an
FP8 weight without fitting block scales, a rank count above the expert count, an architecture the
expert-parallel loader does not know, a model too big for the host. Each is one line naming the file,
tensor or numbers; no traceback; no rank left."""

from __future__ import annotations

import json
import shutil

import psutil
import pytest
from dsnode.config import BatchingSection

from . import tiny_moe
from .conftest import model_section

pytestmark = [pytest.mark.asyncio(loop_scope="session")]

DEEPSEEK_V3_CONFIG = {  # DeepSeek-V3/R1's published sizes (see tests/central/test_plan.py)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "max_position_embeddings": 163840,
}


def _engine(folder, **model):
    from dsnode.central.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(model_section(folder, "deepspeed", device="cpu", **model), BatchingSection())


def _no_rank_left(engine) -> bool:
    return not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in engine.rank_pids)


async def _refused(engine, match: str) -> str:
    with pytest.raises(Exception, match=match) as caught:
        await engine.load()
    message = str(caught.value)
    assert "\n" not in message and _no_rank_left(engine)
    assert not engine.health().ready and message in engine.health().reason
    await engine.close()
    return message


async def test_a_missing_shard_is_named_before_any_rank_starts(v3, tmp_path):
    folder = tiny_moe.link_copy(v3[0], tmp_path / "model")
    (folder / "model-00004-of-00009.safetensors").unlink()
    engine = _engine(folder, tensor_parallel=2)
    message = await _refused(engine, r"model-00004-of-00009\.safetensors: missing "
                                     r"\(named by model\.safetensors\.index\.json for \d+ tensors")
    assert engine.rank_pids == [] and str(folder) in message


async def test_a_truncated_shard_is_named(v3, tmp_path):
    folder = tiny_moe.link_copy(v3[0], tmp_path / "model")
    shard = folder / "model-00002-of-00009.safetensors"
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data[: len(data) // 2])
    engine = _engine(folder, tensor_parallel=2)
    await _refused(engine, r"model-00002-of-00009\.safetensors: ends inside tensor")


def _fp8_copy(moe_dir, folder, name, scale=None):
    """The bundled MoE with one weight stored FP8, with `scale` as its `weight_scale_inv` (or none)."""
    import torch
    from safetensors.torch import load_file, save_file

    for item in moe_dir.iterdir():
        shutil.copy(item, folder / item.name)
    tensors = load_file(str(moe_dir / "model.safetensors"))
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    if scale is not None:
        tensors[name + "_scale_inv"] = scale
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


async def test_an_fp8_weight_without_its_block_scales_is_refused_naming_it(moe_dir, tmp_path):
    """FP8 values mean nothing without their `weight_scale_inv`: not loadable by a plain cast."""
    name = "model.layers.1.mlp.experts.0.down_proj.weight"
    _fp8_copy(moe_dir, tmp_path, name)
    engine = _engine(tmp_path, tensor_parallel=2)
    await _refused(engine, rf"model\.safetensors: FP8 tensor '{name}' has no '{name}_scale_inv' "
                           r"\(one scale per 128 x 128 block\)")
    assert engine.rank_pids == []


async def test_fp8_scales_that_do_not_fit_their_weight_are_refused_naming_them(moe_dir, tmp_path):
    """down_proj (128, 96) has 1 x 1 blocks of 128 x 128; a (2, 1) scale belongs to another shape."""
    import torch

    name = "model.layers.1.mlp.experts.0.down_proj.weight"
    _fp8_copy(moe_dir, tmp_path, name, scale=torch.ones((2, 1)))
    engine = _engine(tmp_path, tensor_parallel=2)
    await _refused(engine, rf"model\.safetensors: tensor '{name}_scale_inv' is F32 \[2, 1\], but its FP8 "
                           rf"weight '{name}' \[128, 96\] needs float scales of shape \[1, 1\]")
    assert engine.rank_pids == []


async def test_a_missing_expert_tensor_is_named_by_every_rank_and_none_is_left(moe_dir, tmp_path, capfd):
    """The files are sound, so the ranks start; each checks every name before reading, they agree on
    the first failure, rank 0 tells the daemon, and all of them exit."""
    from safetensors.torch import load_file, save_file

    for item in moe_dir.iterdir():
        shutil.copy(item, tmp_path / item.name)
    tensors = load_file(str(moe_dir / "model.safetensors"))
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]  # rank 1's expert (4-7)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    engine = _engine(tmp_path, tensor_parallel=2)
    await _refused(engine, r"cannot load the model: no tensor for expert 5 of model\.layers\.2\.mlp\.experts"
                           r" .*'model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight'.* \(rank 0\)$")
    assert len(engine.rank_pids) == 2
    assert "Traceback" not in capfd.readouterr().err


async def test_more_ranks_than_experts_is_refused_with_the_counts(moe_dir):
    engine = _engine(moe_dir, tensor_parallel=9)
    await _refused(engine, r"tensor_parallel = 9 is more than the 8 routed experts per layer")
    assert engine.rank_pids == []


async def test_an_architecture_the_loader_does_not_know_is_refused(moe_dir, tmp_path):
    for name in tiny_moe.TOKENIZER_FILES:
        shutil.copy(moe_dir / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["PhiForCausalLM"], "model_type": "phi", "hidden_size": 64, "num_hidden_layers": 2,
        "vocab_size": 512}))
    engine = _engine(tmp_path, tensor_parallel=2)
    await _refused(engine, r"config\.json: model_type 'phi' \(PhiForCausalLM\) is not supported "
                           r".*deepseek_v3")
    assert engine.rank_pids == []


async def test_a_model_too_big_for_the_host_is_refused_with_the_plan(moe_dir, tmp_path):
    from dsnode.sizing import EXIT_DOES_NOT_FIT, DoesNotFit

    for name in tiny_moe.TOKENIZER_FILES:
        shutil.copy(moe_dir / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3_CONFIG))
    engine = _engine(tmp_path, tensor_parallel=2)
    message = await _refused(engine, r"model tiny-moe \(fp32\) on 2 rank\(s\) .*: does not fit: "
                                     r"weights .* GB > usable")
    routed = 128 * 58 * 3 * 7168 * 2048 * 4  # 128 of 256 experts, 58 MoE layers, fp32
    assert f"routed experts {routed / 1e9:.1f} GB" in message
    assert f"KV cache {61 * (512 + 64) * 4} bytes/token" in message  # the MLA latent, fp32
    assert engine.rank_pids == [] and DoesNotFit.exit_code == EXIT_DOES_NOT_FIT == 78
