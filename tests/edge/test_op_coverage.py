"""Every node of the CUDA-target int8 and int4 graphs has a CUDA kernel for its types (the list kept in
edge/data/cuda_kernels.json); the MatMulInteger graph and the float32-activation graph do not."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnx")  # the checker reads graphs with onnx (a convert-time package)

from dsnode.edge.op_coverage import check_file, kernel_table  # noqa: E402


def test_the_kernel_list_says_where_it_came_from():
    table = kernel_table()
    assert "OperatorKernels.md" in table["source"] and "001d12d2623f" in table["source"]
    assert table["provider"] == "CUDAExecutionProvider"
    assert table["kernels"]["MatMulInteger"][0]["types"]["T1"] == ["int8"]  # uint8 activations: no kernel


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_cuda_target_graphs_run_entirely_on_the_cuda_provider(cuda_conversions, quant):
    assert check_file(cuda_conversions[quant] / "model.onnx") == []


def test_the_matmulinteger_graph_would_fall_back_to_the_cpu(int8_dynamic_dir):
    uncovered = check_file(int8_dynamic_dir / "model.onnx")
    integer = [u for u in uncovered if u.op == "MatMulInteger"]
    assert integer and all("is uint8" in u.why and "['int8']" in u.why for u in integer)


def test_a_cpu_target_graph_is_not_for_the_gpu(int8_dir):
    # GroupQueryAttention's CUDA kernel takes float16/bfloat16 only: --target cpu keeps float32; and the
    # cpu graph's decode attention writes its cache with TensorScatter, which has no CUDA kernel in this
    # onnxruntime. Both sit inside each layer's If: the check walks the branches.
    uncovered = check_file(int8_dir / "model.onnx")
    layers = json.loads((int8_dir / "config.json").read_text())["num_hidden_layers"]
    gqa = [u for u in uncovered if u.op == "com.microsoft:GroupQueryAttention"]
    assert len(gqa) == layers and all("is float;" in u.why for u in gqa)
    assert len([u for u in uncovered if u.op == "TensorScatter"]) == 2 * layers


def test_a_cuda_target_folder_says_so(cuda_conversions):
    from dsnode.edge.manifest import read_manifest

    manifest = read_manifest(cuda_conversions["int4"])
    assert (manifest.target, manifest.weights["bits"], manifest.weights["activations"]) == ("cuda", 4, "float16")
    assert manifest.validation["passed"]
