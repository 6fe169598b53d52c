"""The GQA builder's path on a checkpoint laid out like a real 7B one (bf16, several safetensors shards),
small enough for CI: weights streamed shard by shard, and a layer the blocks do not divide kept float."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from dsnode.edge.checkpoint import Checkpoint
from dsnode.edge.manifest import read_manifest

from tests.edge.conftest import convert_quietly, copy_tokenizer


@pytest.fixture(scope="module")
def bf16_shards(tmp_path_factory, dense_dir) -> Path:
    """A random Qwen2 in bf16, in shards; intermediate 320 is not a multiple of the 128 block."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=3)
    folder = tmp_path_factory.mktemp("bf16") / "src"
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size="300KB")
    copy_tokenizer(dense_dir, folder)
    return folder


def test_bf16_tensors_widen_exactly(bf16_shards):
    from safetensors.torch import load_file

    assert len(list(bf16_shards.glob("*.safetensors"))) > 1
    checkpoint = Checkpoint(bf16_shards)
    assert checkpoint.dtype() == "BF16"
    for shard in bf16_shards.glob("*.safetensors"):
        for name, tensor in load_file(shard).items():
            np.testing.assert_array_equal(checkpoint.float32(name), tensor.float().numpy())
    checkpoint.close()


def test_layers_the_blocks_do_not_divide_stay_float_and_are_reported(tmp_path, bf16_shards):
    result = convert_quietly(bf16_shards, tmp_path / "out", "int8")  # random weights: the bar still applies
    why = "K=320 is not a multiple of the block size 128"
    expected = {"layers.0.down_proj": why, "layers.1.down_proj": why}
    manifest = read_manifest(result.path)
    assert manifest.weights["float_layers"] == expected
    assert json.loads((result.path / "validation.json").read_text())["float_layers"] == expected
    assert "not quantized (kept float): layers.0.down_proj: K=320" in result.report.render()
    graph = onnx.load(str(result.path / "model.onnx"), load_external_data=False).graph
    kinds = {n.name: n.op_type for n in graph.node if n.name.endswith("_proj")}
    assert kinds["layers.0.down_proj"] == "MatMul" and kinds["layers.0.gate_up_proj"] == "MatMulNBits"
    assert result.report.agreement >= 0.9


@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (256, 256), (513, 257), (1000, 64)])
@pytest.mark.parametrize("stored", ["F32", "BF16"])
def test_the_tiled_transpose_is_the_transpose(shape, stored):
    from dsnode.edge.checkpoint import transpose_into

    source = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    if stored == "BF16":  # the top halves: bf16 bits, widened tile by tile
        bits = (source.view(np.uint32) >> 16).astype(np.uint16)
        source = (bits.astype(np.uint32) << 16).view(np.float32)
    wide = np.full((shape[1] + 3, shape[0]), np.nan, np.float32)
    out = wide[1:shape[1] + 1]  # into a slice of a larger array, as the builder does
    transpose_into(bits if stored == "BF16" else source, out, bf16=stored == "BF16")
    assert np.array_equal(out, source.T)
    assert np.isnan(wide[0]).all() and np.isnan(wide[shape[1] + 1:]).all()


def test_tensors_read_in_another_float_type_equal_the_float32_ones(bf16_shards):
    checkpoint = Checkpoint(bf16_shards)
    name = "model.embed_tokens.weight"
    widened = checkpoint.float32(name)
    for dtype in (np.float16, np.float32):
        np.testing.assert_array_equal(checkpoint.read_as(name, np.dtype(dtype)), widened.astype(dtype))
    out = np.empty(widened.shape[::-1], np.float32)
    checkpoint.read_transposed(name, out)
    np.testing.assert_array_equal(out, widened.T)


def test_the_output_does_not_depend_on_the_thread_count(tmp_path, bf16_shards):
    from dsnode.edge.convert import ConvertOptions, convert_model

    folders = [convert_model(bf16_shards, tmp_path / f"threads-{n}", options=ConvertOptions(threads=n),
                             validate=False).path for n in (1, 3)]
    for name in ("model.onnx", "model.onnx.data"):
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes()


@pytest.mark.parametrize("threads", ["1", "3"])
def test_a_weight_in_a_type_the_builder_cannot_read_stops_the_convert_naming_it(tmp_path, bf16_shards, threads):
    """Read on a preparing thread or not, the error reaches the command line and no DST is left."""
    import threading

    from safetensors.torch import load_file, save_file

    from tests.edge.conftest import convert_cli

    src = tmp_path / "src"
    shutil.copytree(bf16_shards, src)
    name = "model.layers.1.mlp.gate_proj.weight"
    shard = next(p for p in src.glob("*.safetensors") if name in load_file(p))
    tensors = load_file(shard)
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    run = convert_cli(str(src), str(tmp_path / "out"), "--threads", threads, "--quiet")
    assert run.code == 1
    assert f"{name} is I8; only F32, F16 and BF16 weights are read" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no DST, no staging folder
    assert not [t for t in threading.enumerate() if t.name.startswith("dsnode-convert")]
