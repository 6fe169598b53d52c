"""`dsnode convert`: what a conversion writes, what it prints, and how bad input is refused without a DST."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from dsnode.edge import convert as convert_module
from dsnode.edge.manifest import FORMAT, FORMAT_VERSION, folder_checksum, read_manifest, verify_files
from dsnode.inference.tokenizer import TextTokenizer

from tests.edge.conftest import TOKENIZER_FILES, convert_cli, copy_tokenizer

onnx = pytest.importorskip("onnx")  # the `convert` extra: the fast tier's venv has none of it
ort = pytest.importorskip("onnxruntime")



def no_trace_of(dst: Path) -> bool:
    """Neither DST nor a staging sibling of it exists."""
    return not dst.exists() and not list(dst.parent.glob(f".{dst.name}.partial-*"))


def hf_folder(path: Path, config: dict, dense_dir: Path, weights: bytes | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    copy_tokenizer(dense_dir, path)
    if weights is not None:
        (path / "model.safetensors").write_bytes(weights)
    return path


def test_manifest_describes_the_folder(int8_conversion, dense_dir):
    manifest = read_manifest(int8_conversion.path)
    assert (manifest.format, manifest.format_version) == (FORMAT, FORMAT_VERSION)
    assert (manifest.architecture, manifest.model_type, manifest.quantization) == ("Qwen2ForCausalLM", "qwen2", "int8")
    assert manifest.opset == 24 and manifest.context_limit == 512  # TensorScatter (the cpu target's decode attention)
    assert (manifest.kv.layers, manifest.kv.key, manifest.kv.value) == (4, (2, 32), (2, 32))
    assert manifest.source == {"path": str(dense_dir), "sha256": folder_checksum(dense_dir)}
    assert manifest.tokenizer_sha256 == TextTokenizer.from_folder(dense_dir).digest
    assert {"model.onnx", "model.onnx.data", "validation.json", "config.json", *TOKENIZER_FILES} == set(manifest.files)
    verify_files(int8_conversion.path, manifest)
    assert [p.name for p in int8_conversion.path.parent.iterdir()] == ["dense-int8"]  # no staging left


def test_validation_report_is_saved_and_summarised(int8_conversion):
    saved = json.loads((int8_conversion.path / "validation.json").read_text())
    manifest = read_manifest(int8_conversion.path)
    assert {k: v for k, v in saved.items() if k != "per_prompt"} == manifest.validation
    assert saved["passed"] and saved["agreement"] >= 0.8 and saved["prompts"] == 6
    assert all(p["tokens"] == 16 and p["max_abs_logit_error"] >= 0 for p in saved["per_prompt"])


def graph_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*"))


def test_int8_graph_is_weight_only_matmulnbits_with_gqa(int8_dir, fp32_dir):
    assert graph_bytes(int8_dir) < 0.45 * graph_bytes(fp32_dir)
    graph = onnx.load(str(int8_dir / "model.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert "MatMulNBits" in ops and not ops & {"MatMulInteger", "DynamicQuantizeLinear", "MatMul", "Expand", "Concat"}
    # attention: per layer an If, GroupQueryAttention for prefill and batch 1, plain operators for a batched decode step
    branches = [node for node in graph.node if node.op_type == "If"]
    assert len(branches) == read_manifest(int8_dir).kv.layers
    for node in branches:
        branch = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        then, otherwise = branch["then_branch"], branch["else_branch"]
        assert [n.op_type for n in otherwise.node] == ["GroupQueryAttention"]
        decode_ops = [n.op_type for n in then.node]
        assert decode_ops.count("TensorScatter") == 2 and decode_ops.count("MatMul") == 2 and "Softmax" in decode_ops
        assert "GroupQueryAttention" not in decode_ops and not set(decode_ops) & {"Expand", "Concat", "Tile"}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * 4 + 1  # per layer: qkv, o, gate+up, down; and the LM head
    attrs = {(a.name, a.i) for a in nbits[0].attribute}
    assert {("bits", 8), ("block_size", 128), ("accuracy_level", 4)} <= attrs
    assert all(len(n.input) == 3 for n in nbits)  # int8: symmetric blocks by default, no zero points
    manifest = read_manifest(int8_dir)
    assert (manifest.graph, manifest.target) == ("gqa", "cpu")
    assert manifest.weights == {"method": "MatMulNBits", "bits": 8, "block_size": 128, "accuracy_level": 4,
                                "symmetric": True, "activations": "float32", "float_layers": {}}


def nbits_nodes(folder: Path) -> list:
    return [n for n in onnx.load(str(folder / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]


def test_int4_blocks_carry_zero_points_by_default(cuda_conversions):
    nbits = nbits_nodes(cuda_conversions["int4"])
    assert nbits and all(len(n.input) == 4 and n.input[3].endswith("zero_points") for n in nbits)
    assert read_manifest(cuda_conversions["int4"]).weights["symmetric"] is False


@pytest.mark.parametrize(("quant", "zero_points", "inputs"), [("int4", "no", 3), ("int8", "yes", 4)])
def test_cli_quantization_options_reach_the_graph_and_the_manifest(tmp_path, dense_dir, quant, zero_points, inputs):
    dst = tmp_path / f"{quant}-b32"
    run = convert_cli(str(dense_dir), str(dst), "--quant", quant, "--block-size", "32", "--accuracy-level", "0",
                      "--zero-points", zero_points, "--quiet")
    assert run.code == 0, run.stderr
    nbits = nbits_nodes(dst)
    assert nbits and all(len(n.input) == inputs for n in nbits)
    bits = int(quant[-1])
    assert {("bits", bits), ("block_size", 32), ("accuracy_level", 0)} <= {(a.name, a.i) for a in nbits[0].attribute}
    weights = read_manifest(dst).weights
    assert (weights["bits"], weights["block_size"], weights["accuracy_level"], weights["symmetric"]) == \
        (bits, 32, 0, zero_points == "no")


def test_int8_dynamic_keeps_the_matmulinteger_format_with_per_row_activations(int8_dynamic_dir):
    graph = onnx.load(str(int8_dynamic_dir / "model.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" not in ops  # one scale per row, not per batch
    tables = {init.name: (init.data_type, tuple(init.dims)) for init in graph.initializer}
    gathered = [tables[n.input[0]] for n in graph.node if n.op_type == "Gather" and n.input[0] in tables]
    vocab = json.loads((int8_dynamic_dir / "config.json").read_text())["vocab_size"]  # 512 + the format markers
    assert sorted(gathered) == [(onnx.TensorProto.FLOAT, (vocab, 1)), (onnx.TensorProto.INT8, (vocab, 128))]
    assert read_manifest(int8_dynamic_dir).graph == "export"


def test_cli_shows_each_stage_and_prints_the_report(fp32_cli_run):
    dst, run = fp32_cli_run
    assert run.code == 0
    for line in ("[1/5] load", "[2/5] export", "[3/5] quantize skipped (--quant none)", "[4/5] validate",
                 "[5/5] write"):
        assert line in run.stderr
    assert "validation: float32 ONNX vs the source model" in run.stdout
    assert "top-1 agreement 100.0% (96/96)" in run.stdout  # float32 = torch up to summation order
    assert f"wrote {dst}" in run.stdout
    assert read_manifest(dst).quantization == "none"


def test_missing_or_non_causal_source_is_refused(tmp_path, dense_dir):
    bert = hf_folder(tmp_path / "bert", {"architectures": ["BertModel"], "model_type": "bert"}, dense_dir, b"x")
    for src, why in ((tmp_path / "nowhere", "not a folder"), (bert, "not a causal language model")):
        dst = tmp_path / "out"
        run = convert_cli(str(src), str(dst))
        assert run.code == 1 and why in run.stderr and run.stderr.startswith("dsnode convert: error:")
        assert no_trace_of(dst)


def test_unsupported_architecture_is_refused_with_the_choices(tmp_path, dense_dir):
    src = hf_folder(tmp_path / "phi", {"architectures": ["PhiForCausalLM"], "model_type": "phi"}, dense_dir, b"x")
    run = convert_cli(str(src), str(tmp_path / "out"))
    assert run.code == 1
    assert "unsupported architecture PhiForCausalLM" in run.stderr and "qwen2" in run.stderr
    assert no_trace_of(tmp_path / "out")


def test_existing_destination_is_left_alone(tmp_path, dense_dir):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    run = convert_cli(str(dense_dir), str(dst))
    assert run.code == 1 and "already exists" in run.stderr
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_not_enough_space_is_refused_before_writing(tmp_path, dense_dir, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(convert_module.shutil, "disk_usage", lambda p: real(p)._replace(free=1_000_000))
    run = convert_cli(str(dense_dir), str(tmp_path / "out"))
    assert run.code == 1 and "not enough free space" in run.stderr
    assert no_trace_of(tmp_path / "out")


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def test_unreadable_weights_are_refused(tmp_path, dense_dir):
    config = json.loads((dense_dir / "config.json").read_text())
    src = hf_folder(tmp_path / "garbage", config, dense_dir, weights=safetensors_bytes({})[:8] + b"{not json")
    run = convert_cli(str(src), str(tmp_path / "out"))
    assert run.code == 1 and "not a readable safetensors file" in run.stderr
    assert no_trace_of(tmp_path / "out")


def test_a_failure_while_converting_leaves_no_destination(tmp_path, dense_dir):
    config = json.loads((dense_dir / "config.json").read_text())
    truncated = safetensors_bytes({"lm_head.weight": {"dtype": "F32", "shape": [512, 128],
                                                      "data_offsets": [0, 512 * 128 * 4]}}, b"\0" * 16)
    src = hf_folder(tmp_path / "truncated", config, dense_dir, weights=truncated)
    run = convert_cli(str(src), str(tmp_path / "out"))
    assert run.code == 1 and "[1/5] load     failed" in run.stderr and "error:" in run.stderr
    assert no_trace_of(tmp_path / "out")


def test_sliding_window_models_are_refused(tmp_path, dense_dir):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=64)
    src = tmp_path / "mistral"
    MistralForCausalLM(config).save_pretrained(src)
    copy_tokenizer(dense_dir, src)
    run = convert_cli(str(src), str(tmp_path / "out"), "--quiet")
    assert run.code == 1 and "sliding-window attention" in run.stderr
    assert no_trace_of(tmp_path / "out")


def test_bad_quant_and_agreement_values_are_usage_errors(tmp_path, dense_dir):
    for args in (["--quant", "int3"], ["--min-agreement", "2"], ["--target", "tpu"], ["--zero-points", "maybe"],
                 ["--kv-cache", "fp8"]):
        with pytest.raises(SystemExit) as exit_:
            convert_cli(str(dense_dir), str(tmp_path / "out"), *args)
        assert exit_.value.code == 2
    assert no_trace_of(tmp_path / "out")


def test_an_int8_kv_cache_for_a_gpu_is_refused_before_anything_is_written(tmp_path, dense_dir):
    run = convert_cli(str(dense_dir), str(tmp_path / "out"), "--kv-cache", "int8", "--target", "cuda")
    assert run.code == 1
    assert "--kv-cache int8 is built for --target cpu" in run.stderr
    assert no_trace_of(tmp_path / "out")


def test_onnxruntime_graph_fusions_keep_the_per_row_numbers(int8_dynamic_dir):
    # MatMulIntegerToFloat (fused at session start) only takes a scalar activation scale; the per-row
    # rewrite must keep the optimized graph computing what the plain graph computes.
    feeds = {"input_ids": np.array([[5, 17, 99, 200, 31, 8, 77]]), "attention_mask": np.ones((1, 7), np.int64),
             "position_ids": np.arange(7).reshape(1, 7)}
    outputs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(int8_dynamic_dir / "model.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        for arg in session.get_inputs()[3:]:
            feeds[arg.name] = np.zeros((1, arg.shape[1], 0, arg.shape[3]), np.float32)
        outputs.append(session.run(None, feeds))
    for plain, fused in zip(*outputs):
        np.testing.assert_allclose(fused, plain, atol=1e-4)


def test_an_int8_kv_cache_is_refused_for_a_model_on_the_traced_export_path(tmp_path, moe_dir):
    run = convert_cli(str(moe_dir), str(tmp_path / "out"), "--kv-cache", "int8")
    assert run.code == 1
    assert "--kv-cache int8: this model takes the traced-export path" in run.stderr
    assert no_trace_of(tmp_path / "out")
