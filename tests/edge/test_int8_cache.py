"""`dsnode convert --kv-cache int8`: the cache is int8 with per-channel scales in the graph; a prompt's
first chunk attends in float32 and writes the cache rounded, every other step is GroupQueryAttention
over the int8 cache. What is rounded where must not depend on how a prompt was fed or batched."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import onnx
import pytest
import torch
from dsnode.edge.onnx_runner import open_session
from dsnode.edge.slot_runner import SlotRunner

from .conftest import convert_cli, onnx_engine, run, tokens_of

PROMPTS = {"a": [5, 17, 99, 200, 31, 8, 77, 4, 300, 12], "b": [40, 41, 42], "c": [300, 12, 12, 64, 7, 7]}
THEN = [3, 150, 9, 77]
# How far logits of one prompt fed two ways may differ, where one way attends over rounded keys and
# values: a tenth of their spread. How much the rounding moves them depends on the trained weights
# (under 0.05 of the spread on the bundled model CI built, 0.057 on one built on another machine); a
# wrong cache moves them by the spread itself, and the argmax with them.
ROUNDING = 0.1
# Against the source model the error is measured per position (each row of logits: a wrong position
# or step moves its row by about the spread) as an RMS, not a largest value: over a model's whole
# vocabulary a few logits stray furthest, and how far depends on the build (largest 0.10-0.14 of the
# spread, RMS 0.010-0.022 on one built on a 2-core machine).
SOURCE_RMS = 0.05


def runner_for(folder):
    return SlotRunner(open_session(folder / "model.onnx", "cpu", threads=1), max_length=256)


@pytest.fixture()
def fp32_weights(int8_cache_dirs):
    runner = runner_for(int8_cache_dirs["none"])
    yield runner
    runner.close()


def cached_rows(runner, seq, length):
    """The int8 keys and values of `seq`'s first `length` positions, every layer."""
    slot = runner.slot_of[seq]
    return [value.numpy()[slot, :, :length].copy() for value in runner.cache.values]


def test_the_graph_and_the_manifest_say_the_cache_is_int8(int8_cache_dirs):
    for folder in int8_cache_dirs.values():
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        caches = [i for i in graph.input if i.name.startswith("past_key_values.")]
        assert caches and {i.type.tensor_type.elem_type for i in caches} == {onnx.TensorProto.INT8}
        scales = [t for t in graph.initializer if t.name.endswith("_cache_scale")]
        assert len(scales) == len(caches)  # one per layer for keys and one for values
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["kv_cache"]["dtype"] == "int8"
        assert manifest["validation"]["passed"]


def test_a_first_chunk_writes_the_cache_as_the_int8_kernel_does(fp32_weights):
    """One chunk (the float32 branch, rounded by QuantizeLinear, written by TensorScatter) and token by
    token (the int8 kernel rounding each new position itself) cache the same int8 values where their
    inputs are the same — layer 0 — and within a step of rounding after it, where the token-by-token
    path has attended over rounded keys and values."""
    prompt = PROMPTS["a"]
    whole = fp32_weights.prefill("whole", prompt, 0)
    for start, token in enumerate(prompt):
        one_by_one = fp32_weights.prefill("steps", [token], start)
    chunk = cached_rows(fp32_weights, "whole", len(prompt))
    steps = cached_rows(fp32_weights, "steps", len(prompt))
    np.testing.assert_array_equal(chunk[0], steps[0])  # layer 0's keys
    np.testing.assert_array_equal(chunk[1], steps[1])  # and values
    for a, b in zip(chunk, steps):
        assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max() <= 2
        assert np.count_nonzero(a) > a.size // 2  # written, not left at zero
    assert whole.argmax() == one_by_one.argmax()
    assert np.abs(whole - one_by_one).max() < ROUNDING * whole.std()


def test_a_later_chunk_continues_over_the_int8_cache(fp32_weights):
    """A chunk after position 0 goes through the int8 kernel over what the first chunk cached."""
    prompt = PROMPTS["a"]
    whole = fp32_weights.prefill("whole", prompt, 0)
    fp32_weights.prefill("chunked", prompt[:4], 0)
    last = fp32_weights.prefill("chunked", prompt[4:], 4)
    assert last.argmax() == whole.argmax()
    assert np.abs(last - whole).max() < ROUNDING * whole.std()
    assert len(fp32_weights.fed["chunked"]) == len(prompt)


def test_each_row_of_a_batch_is_what_the_sequence_gives_alone(int8_cache_dirs):
    """Rows of different lengths decode together, a row leaves and another joins in its slot; each
    row's logits are those of its sequence decoded alone (the rounding is per position, not per batch)."""
    alone = {}
    for seq, prompt in PROMPTS.items():
        runner = runner_for(int8_cache_dirs["none"])
        alone[seq] = [runner.prefill(seq, prompt, 0)] + [runner.decode([seq], [t])[0] for t in THEN]
        runner.close()
    runner = runner_for(int8_cache_dirs["none"])
    got = {seq: [runner.prefill(seq, prompt, 0)] for seq, prompt in PROMPTS.items()}
    for step, token in enumerate(THEN[:2]):
        for seq, row in zip(["c", "a", "b"], runner.decode(["c", "a", "b"], [token] * 3)):
            got[seq].append(row)
    runner.release("a")  # a hole below the running rows; "d" takes it
    got["d"] = [runner.prefill("d", PROMPTS["a"], 0)]
    for token in THEN[2:]:
        for seq, row in zip(["b", "c"], runner.decode(["b", "c"], [token] * 2)):
            got[seq].append(row)
    got["d"] += [runner.decode(["d"], [t])[0] for t in THEN[:1]]
    runner.close()
    for seq in ("b", "c"):
        np.testing.assert_allclose(np.stack(got[seq]), np.stack(alone[seq]), atol=1e-4)
    np.testing.assert_allclose(np.stack(got["a"]), np.stack(alone["a"][:3]), atol=1e-4)
    np.testing.assert_allclose(np.stack(got["d"]), np.stack(alone["a"][:2]), atol=1e-4)


def test_the_rounded_cache_stays_close_to_the_source_model(int8_cache_dirs, dense_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()
    runner = runner_for(int8_cache_dirs["none"])
    for seq, prompt in PROMPTS.items():
        got = np.stack([runner.prefill(seq, prompt, 0)] + [runner.decode([seq], [t])[0] for t in THEN])
        with torch.inference_mode():
            want = model(input_ids=torch.tensor([prompt + THEN])).logits[0, len(prompt) - 1:].numpy()
        spread = want.std()
        rms_per_position = np.sqrt(((got - want) ** 2).mean(-1))
        assert rms_per_position.max() < SOURCE_RMS * spread  # float32 weights: only the cache is rounded
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8
    runner.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "block"), [("int8", 128), ("int8-b64", 64)])
async def test_the_engine_serves_an_int8_cache_folder_alone_and_batched(int8_cache_dirs, name, block):
    engine = onnx_engine(int8_cache_dirs[name])
    await engine.load()
    try:
        prompts = ["It was the best of times", "The quick brown fox", "Once upon a time"]
        alone = [tokens_of(await run(engine, p, f"a{i}", max_tokens=12)) for i, p in enumerate(prompts)]
        together = await asyncio.gather(*(run(engine, p, f"b{i}", max_tokens=12) for i, p in enumerate(prompts)))
        assert [tokens_of(d) for d in together] == alone
        assert all(len(tokens) == 12 for tokens in alone)
        assert engine.info.extra["weights"]["method"] == "MatMulNBits"
        assert engine.info.extra["weights"]["block_size"] == block
        assert engine.info.extra["kv_cache"] == "int8"
    finally:
        await engine.close()


def test_a_convert_reads_the_source_once_for_calibration_and_validation(int8_cache_dirs, dense_dir, tmp_path,
                                                                         monkeypatch):
    """The validation's references come from the load that calibrates the cache (a 7B source is ~15 GB
    to read); the report is the one the command line wrote for the same conversion."""
    from dsnode.edge import convert
    from dsnode.edge.convert_options import ConvertOptions

    loads = []
    real_load = convert._load
    monkeypatch.setattr(convert, "_load", lambda *args, **kwargs: loads.append(args[0]) or real_load(*args, **kwargs))
    result = convert.convert_model(dense_dir, tmp_path / "kv8", options=ConvertOptions(quant="int8", kv_cache="int8"))
    assert loads == [dense_dir]
    want = json.loads((int8_cache_dirs["int8"] / "validation.json").read_text())
    assert json.loads(result.report.to_json()) == want


def cache_scales(folder):
    from onnx import numpy_helper

    graph = onnx.load(str(folder / "model.onnx")).graph
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("_cache_scale")}


def test_the_operator_s_calibration_text_sets_the_scales_and_is_recorded(int8_cache_dirs, dense_dir, tmp_path):
    text = tmp_path / "shop.txt"
    text.write_text("Order 1182: two blue mugs, one teapot. Shipped on Monday.\n\n"
                    "Refund requested for order 1175: the lid was cracked.\n\n" + "Customer asks about delivery. " * 40)
    folder = tmp_path / "kv8-shop"
    run = convert_cli(str(dense_dir), str(folder), "--quant", "int8", "--kv-cache", "int8", "--calibration-text",
                      str(text), "--quiet")
    assert run.code == 0, run.stderr
    calibration = json.loads((folder / "manifest.json").read_text())["kv_cache"]["calibration"]
    assert calibration["text"] == str(text) and calibration["passages"] == 3
    built_in = cache_scales(int8_cache_dirs["int8"])
    mine = cache_scales(folder)
    assert mine.keys() == built_in.keys()
    assert any(not np.array_equal(mine[name], built_in[name]) for name in mine)


def test_a_missing_calibration_text_stops_the_convert_before_it_starts(dense_dir, tmp_path):
    run = convert_cli(str(dense_dir), str(tmp_path / "out"), "--kv-cache", "int8", "--calibration-text",
                      str(tmp_path / "nowhere.txt"), "--quiet")
    assert run.code == 1
    assert f"--calibration-text {tmp_path / 'nowhere.txt'}: No such file or directory" in run.stderr
    assert not (tmp_path / "out").exists()
