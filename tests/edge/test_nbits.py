"""MatMulNBits weights: onnxruntime's kernel multiplies by exactly the weight `dequantize` describes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from dsnode.edge.nbits import dequantize, fits_blocks, quantize_weight
from onnx import TensorProto, helper, numpy_helper


def matmul_nbits(q, accuracy_level: int) -> ort.InferenceSession:
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=q.k, N=q.n,
                            bits=q.bits, block_size=q.block_size, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, q.k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, q.n])],
                              [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales, "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [8, 4])
def test_the_kernel_computes_with_the_dequantized_weight(bits):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((256, 96)).astype(np.float32)  # (K, N)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    q = quantize_weight(weight, bits, 128)
    assert q.packed.shape == (96, 2, 128 * bits // 8) and q.scales.shape == (96, 2)
    y = matmul_nbits(q, accuracy_level=0).run(None, {"A": x})[0]
    np.testing.assert_allclose(y, x @ dequantize(q), atol=1e-4)
    step = np.abs(weight).max() / (127 if bits == 8 else 7)
    assert np.abs(dequantize(q) - weight).max() <= step  # round to nearest: within one step


def test_shapes_the_blocks_do_not_divide_are_refused():
    assert fits_blocks(256, 128) and not fits_blocks(320, 128)
    with pytest.raises(ValueError, match="K=320 is not a multiple of the block size 128"):
        quantize_weight(np.zeros((320, 8), np.float32), 8, 128)
