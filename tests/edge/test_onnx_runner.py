"""`OnnxRunner`: the KV cache kept between steps, left-padded batches, chunked prefill, provider choice."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")  # the `edge` extra: the fast tier's venv has none of it

from dsnode.edge.onnx_runner import CPU, CUDA, OnnxRunner, RunnerError, choose_providers, open_session  # noqa: E402

pytestmark = pytest.mark.model  # ONNX Runtime (and, but for test_provider_choice, the bundled model)

PROMPTS = {"a": [5, 17, 99, 200, 31, 8, 77], "b": [40, 41], "c": [300, 12, 12, 64]}


@pytest.fixture(scope="module")
def runner(int8_dynamic_dir):
    runner = OnnxRunner(open_session(int8_dynamic_dir / "model.onnx", "cpu", threads=1))
    yield runner
    runner.close()


def test_provider_choice():
    assert choose_providers("cpu", [CUDA, CPU]) == [CPU]
    assert choose_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("auto", ["AzureExecutionProvider", CPU]) == [CPU]
    with pytest.raises(RunnerError, match="no CUDAExecutionProvider .*dsnode\\[edge-gpu\\]"):
        choose_providers("cuda", [CPU])


def test_the_cache_layout_is_read_from_the_graph(runner):
    assert runner.io.num_layers == 4
    assert runner.io.kv_shapes == (((2, 32), (2, 32)),) * 4
    assert runner.provider == CPU


def alone(runner: OnnxRunner, prompt: list[int], then: list[int]) -> list[np.ndarray]:
    """Logits of `prompt` then one decode step per token of `then`, as the only sequence."""
    logits = [runner.prefill("alone", prompt, 0)]
    for token in then:
        logits.append(runner.decode(["alone"], [token])[0])
    runner.release("alone")
    return logits


def test_a_left_padded_batch_gives_each_row_its_alone_logits(runner):
    then = [3, 150, 9]
    expected = {seq: alone(runner, prompt, then) for seq, prompt in PROMPTS.items()}
    got = {seq: [runner.prefill(seq, prompt, 0)] for seq, prompt in PROMPTS.items()}
    order = ["c", "a", "b"]  # any order: rows are mapped, not assumed
    for token in then:
        for seq, row in zip(order, runner.decode(order, [token] * 3)):
            got[seq].append(row)
    for seq in PROMPTS:
        np.testing.assert_allclose(np.stack(got[seq]), np.stack(expected[seq]), atol=1e-4)
        runner.release(seq)
    assert runner.kv.rows == [] and runner.kv.pending == {}


def test_a_row_leaving_does_not_disturb_the_others(runner):
    expected = alone(runner, PROMPTS["a"], [3, 4, 5])
    runner.prefill("a", PROMPTS["a"], 0)
    runner.prefill("b", PROMPTS["b"], 0)
    first = runner.decode(["a", "b"], [3, 8])[0]
    runner.release("b")
    rest = [runner.decode(["a"], [t])[0] for t in (4, 5)]
    runner.release("a")
    np.testing.assert_allclose(np.stack([first, *rest]), np.stack(expected[1:]), atol=1e-4)


def test_chunked_prefill_equals_one_shot(runner):
    prompt = PROMPTS["a"]
    one_shot = runner.prefill("x", prompt, 0)
    runner.release("x")
    runner.prefill("y", prompt[:3], 0)
    chunked = runner.prefill("y", prompt[3:], 3)
    runner.release("y")
    np.testing.assert_allclose(chunked, one_shot, atol=1e-4)


def test_prefill_past_zero_needs_a_cache(runner):
    with pytest.raises(RunnerError, match="without a cache"):
        runner.prefill("ghost", [1, 2], 5)
