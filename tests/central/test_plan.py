"""`dsnode plan` and its arithmetic (`dsnode.sizing`): DeepSeek-V3's published config against counts
written out here from the architecture, published totals of Mixtral and Qwen-MoE, and every kind of
weight against the parameters transformers really builds for tiny models of each architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dsnode.cli import main
from dsnode.ops.plan import Gpus, build_plan, parse_gpus
from dsnode.sizing import FORMATS, KINDS, USABLE_FRACTION, fit, model_shape, spread_experts

V3_CONFIG = Path(__file__).parent / "data" / "deepseek-v3-config.json"  # DeepSeek-V3/R1's config.json
GIB = 2**30

# DeepSeek-V3, from its config: hidden H, 61 layers of which the first 3 dense, 128 heads, vocabulary V
H, LAYERS, DENSE, MOE, HEADS, V = 7168, 61, 3, 58, 128, 129280
# q_a_proj, q_a_layernorm, kv_a_proj_with_mqa, kv_a_layernorm: whole on every rank
ATTENTION_WHOLE = H * 1536 + 1536 + H * (512 + 64) + 512
ATTENTION_SPLIT = 1536 * HEADS * (128 + 64) + 512 * HEADS * (128 + 128) + HEADS * 128 * H  # q_b, kv_b, o_proj
EXPERT = 3 * H * 2048  # gate, up, down of one expert
COUNTS = {
    "attention": LAYERS * (ATTENTION_WHOLE + ATTENTION_SPLIT),
    "dense_mlp": DENSE * 3 * H * 18432,
    "shared_experts": MOE * EXPERT,
    "routed_experts": MOE * 256 * EXPERT,
    "router": MOE * (256 * H + 256),  # weight + e_score_correction_bias
    "embeddings_head": 2 * V * H,
    "norms": LAYERS * 2 * H + H,
}


@pytest.fixture(scope="module")
def v3_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("deepseek-v3")
    (folder / "config.json").write_text(V3_CONFIG.read_text())
    return folder


def v3_shape():
    return model_shape(json.loads(V3_CONFIG.read_text()))


def test_deepseek_v3_parameters_by_kind():
    shape = v3_shape()
    planned = {kind: part.whole + part.split for kind, part in shape.parts.items()}
    planned["routed_experts"] = shape.routed_expert_params
    assert planned == COUNTS
    assert round(shape.total_params / 1e9, 1) == 671.0  # README_WEIGHTS.md: 671B without the MTP layer
    assert round(shape.routed_expert_params / 1e9, 1) == 653.9


def test_published_totals_of_mixtral_and_qwen_moe():
    mixtral = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "vocab_size": 32000, "num_local_experts": 8}
    qwen = {"model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632,
            "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts": 60,
            "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
            "vocab_size": 151936}
    assert model_shape(mixtral).total_params == 46_702_792_704  # Mixtral-8x7B
    assert round(model_shape(qwen).total_params / 1e9, 1) == 14.3  # Qwen1.5-MoE-A2.7B


def per_rank_int8_bytes(ranks: int, experts_per_rank: int) -> int:
    """Rank 0 with 8-bit weights: its routed experts, attention, dense MLPs and shared experts at one
    byte a weight, all but the experts whole on every rank (AutoTP cannot split 8-bit linears, so it
    does not run); embeddings and head whole in bf16; router float32; norms 16-bit. (`ranks` only
    decides `experts_per_rank`.)"""
    whole = COUNTS["attention"] + COUNTS["dense_mlp"] + COUNTS["shared_experts"]
    eight_bit = whole + experts_per_rank * MOE * EXPERT
    return eight_bit + 2 * COUNTS["embeddings_head"] + 4 * COUNTS["router"] + 2 * COUNTS["norms"]


def per_rank_bf16_bytes(ranks: int) -> int:
    """Rank 0 with bf16 weights, experts sharded: AutoTP splits q_b/kv_b/o, the dense MLPs and the head."""
    split = LAYERS * ATTENTION_SPLIT + COUNTS["dense_mlp"] + V * H  # + the head
    whole = LAYERS * ATTENTION_WHOLE + COUNTS["shared_experts"] + V * H  # + the embedding
    routed = 256 // ranks * MOE * EXPERT
    return 2 * (whole + -(-split // ranks) + routed) + 4 * COUNTS["router"] + 2 * COUNTS["norms"]


def test_16x80gb_with_experts_replicated_does_not_fit():
    plan = build_plan(v3_shape(), Gpus(8, 80 * GIB), hosts=2, kv_tokens=32768)
    for name in ("bf16", "fp8", "int8"):
        assert not plan.replicated[name].fits
    assert plan.replicated["int8"].weights == per_rank_int8_bytes(16, 256)  # ≈ 673 GB
    assert "does not fit: weights 673.2 GB > usable 77.3 GB" in plan.replicated["int8"].verdict


def test_16x80gb_experts_sharded_16_ways_fits_at_8_bits():
    plan = build_plan(v3_shape(), Gpus(8, 80 * GIB), hosts=2, kv_tokens=32768)
    int8 = plan.sharded["int8"]
    assert int8.fits and int8.weights == per_rank_int8_bytes(16, 16)
    # ≈ 60.2 GB: 8-bit attention is whole on every rank (the "about 54 GB" counted it whole
    # at 8 bits too, but the embeddings and head at 8 bits; here they stay bf16)
    assert 60e9 < int8.weights < 60.5e9
    assert plan.sharded["bf16"].weights == per_rank_bf16_bytes(16)  # ≈ 92.6 GB: AutoTP splits attention
    assert int8.kv_bytes_per_token == LAYERS * (512 + 64) * 2  # MLA latent, bf16, on every rank
    assert int8.kv_tokens_fit == (int(80 * GIB * USABLE_FRACTION) - int8.weights) // int8.kv_bytes_per_token
    assert plan.sharded["fp8"].fits and not plan.sharded["bf16"].fits


def test_the_kv_cache_can_be_what_does_not_fit():
    shape = v3_shape()
    roomy = fit(shape, 16, 80 * GIB, FORMATS["int8"], kv_tokens_needed=200_000)
    tight = fit(shape, 16, 80 * GIB, FORMATS["int8"], kv_tokens_needed=300_000)
    assert roomy.fits and not tight.fits
    assert tight.verdict == f"does not fit: KV cache for {tight.kv_tokens_fit} tokens, 300000 needed"


def test_experts_spread_over_ranks_that_do_not_divide_them():
    assert [len(r) for r in spread_experts(256, 12)] == [22] * 4 + [21] * 8
    assert [(r.start, r.stop) for r in spread_experts(18, 4)] == [(0, 5), (5, 10), (10, 14), (14, 18)]


def test_plan_command_prints_the_table(v3_folder, capsys):
    assert main(["plan", str(v3_folder), "--gpus", "8x80GB", "--hosts", "2"]) == 0
    out = capsys.readouterr().out
    assert "256 routed experts per MoE layer, 16 on each of 16 ranks" in out
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert lines["routed experts"].split()[-2:] == ["40.9", "GB"]  # int8: 16 experts × 58 layers
    assert lines["verdict"].endswith("fits      fits") and "does not fit" in lines["verdict"]
    assert "KV cache per token (MLA latent)" in out and "68.6 KiB" in out


def test_plan_command_json(v3_folder, capsys):
    assert main(["plan", str(v3_folder), "--gpus", "16x80GB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["ranks"] == 16 and plan["model"]["routed_experts"] == 256
    assert plan["experts_sharded"]["int8"]["fits"] and not plan["experts_sharded"]["bf16"]["fits"]
    assert not plan["experts_replicated"]["int8"]["fits"]
    assert plan["experts_sharded"]["int8"]["weights_bytes"] == per_rank_int8_bytes(16, 16)
    assert set(plan["experts_sharded"]["int8"]["weights_bytes_by_kind"]) == set(KINDS)


def test_fp8_is_not_offered_on_gpus_without_fp8(v3_folder, capsys):
    assert main(["plan", str(v3_folder), "--gpus", "2xA40", "--json"]) == 0
    fp8 = json.loads(capsys.readouterr().out)["experts_sharded"]["fp8"]
    assert fp8["unusable"] == "needs compute capability 8.9+ (these GPUs: 8.6)" and not fp8["fits"]


@pytest.mark.parametrize("text,error", [
    ("16x", "expected COUNTxMEMORY"), ("0x80GB", "expected COUNTxMEMORY"), ("8xB200", "unknown GPU 'B200'"),
])
def test_bad_gpus_argument(v3_folder, capsys, text, error):
    assert main(["plan", str(v3_folder), "--gpus", text]) == 2
    assert error in capsys.readouterr().err


def test_gpu_names_and_sizes():
    assert parse_gpus("8xH100") == Gpus(8, 80 * GIB, "H100", "9.0")
    assert parse_gpus("16 x 80GB") == Gpus(16, 80 * GIB)
    assert parse_gpus("2xa40").name == "A40"


def test_without_gpus_here_or_on_the_command_line(v3_folder, capsys, monkeypatch):
    monkeypatch.setattr("dsnode.probe.probe_gpus", lambda: [])
    assert main(["plan", str(v3_folder)]) == 1
    assert "describe the GPUs with --gpus" in capsys.readouterr().err


def test_an_unknown_architecture_is_one_line(tmp_path, capsys):
    config = {"architectures": ["PhiForCausalLM"], "model_type": "phi"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["plan", str(tmp_path), "--gpus", "8x80GB"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_type 'phi'" in err


def test_the_plan_module_needs_no_torch():
    import subprocess
    import sys

    code = ("import sys, dsnode.ops.plan, dsnode.sizing, dsnode.central.preflight, "
            "dsnode.central.checkpoint; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.model  # builds each architecture with transformers
@pytest.mark.parametrize("architecture", ["deepseek_v3", "mixtral", "qwen2_moe", "qwen2", "llama"])
def test_every_kind_matches_the_parameters_transformers_builds(architecture):
    """Tiny models of each architecture: the sizing's count of each kind equals the parameters (and
    persistent buffers) transformers creates, classified by name as the ranks report them."""
    from accelerate import init_empty_weights
    from dsnode.central.expert_parallel import weight_kind
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from . import tiny_moe

    dense = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    if architecture == "qwen2":
        config = Qwen2Config(**dense)
    elif architecture == "llama":
        config = LlamaConfig(attention_bias=True, **dense)
    else:
        config = tiny_moe.model_config(architecture)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    built: dict[str, int] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and "rotary" not in name:
            built[weight_kind(name, tensor)] = built.get(weight_kind(name, tensor), 0) + tensor.numel()
    shape = model_shape(config.to_dict())
    planned = {kind: part.whole + part.split for kind, part in shape.parts.items()}
    planned["routed_experts"] = shape.routed_expert_params
    assert built == {kind: n for kind, n in planned.items() if n}


def test_what_crosses_hosts_per_token():
    """DeepSeek-V3 on 2 hosts of 8: every all-reduce carries the hidden state (7168 × 2 bytes, bf16
    activations) per token; bf16 adds AutoTP's attention, dense-MLP and head all-reduces to the 58
    MoE ones; 8-bit keeps those linears whole. A ring over 16 ranks puts 2·15/16 of each on a host link."""
    plan = build_plan(v3_shape(), Gpus(8, 80 * GIB), hosts=2, kv_tokens=32768)
    bf16, int8 = plan.traffic["bf16"], plan.traffic["int8"]
    assert bf16.per_layer == int8.per_layer == H * 2 == 14336
    assert bf16.all_reduces == {"attention": LAYERS, "dense_mlp": DENSE, "moe": MOE} and bf16.head == V * 2
    assert int8.all_reduces == {"moe": MOE} and int8.head == 0
    assert int8.per_token == MOE * H * 2
    assert int8.per_host_link == -(-MOE * H * 2 * 2 * 15 // 16)  # ≈ 1.49 MiB per token, each way
    assert bf16.per_host_link == -(-((LAYERS + DENSE + MOE) * H * 2 + V * 2) * 2 * 15 // 16)
    one_host = build_plan(v3_shape(), Gpus(8, 80 * GIB), hosts=1, kv_tokens=32768)
    assert one_host.traffic["int8"].per_host_link == 0
    assert one_host.traffic["int8"].per_token == int8.per_token


def test_plan_command_says_what_crosses_hosts(v3_folder, capsys):
    assert main(["plan", str(v3_folder), "--gpus", "8xA100-80GB", "--hosts", "2"]) == 0
    out = capsys.readouterr().out
    assert "one all-reduce per layer = 14.0 KiB (the hidden state of 7168)" in out
    assert "int8  58 all-reduces (58 MoE) = 812.0 KiB; crosses hosts: 1.49 MiB per host link, each way" in out
    assert "bf16  122 all-reduces (61 attention, 3 dense MLP, 58 MoE) + head logits 252.5 KiB" in out
    assert main(["plan", str(v3_folder), "--gpus", "8xA100-80GB", "--hosts", "2", "--json"]) == 0
    between = json.loads(capsys.readouterr().out)["between_ranks"]["int8"]
    assert between["all_reduce_bytes_per_token_per_layer"] == 14336
    assert between["all_reduces_per_token"] == {"moe": 58}
    assert between["bytes_per_token_per_host_link"] == -(-58 * 14336 * 30 // 16)
    assert main(["plan", str(v3_folder), "--gpus", "8xH100"]) == 0
    assert "crosses hosts: nothing (one host)" in capsys.readouterr().out
