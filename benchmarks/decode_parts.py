"""What bounds a CPU decode step: int8 MatMulNBits bandwidth, and GroupQueryAttention vs plain operators.

    taskset -c 1 .venv/bin/python benchmarks/decode_parts.py matmul [--copies 40] [--rows 1]
    taskset -c 1 .venv/bin/python benchmarks/decode_parts.py attention [--batch 1] [--kind gqa|gqa-int8|plain]

`matmul`: one int8 MatMulNBits of the benchmark model's gate/up shape (K 1024, N 5632, block 128,
symmetric, accuracy level 4), run alone (weights hot in the cache) and as `--copies` distinct weights in
one graph (as a decode step reads ~212 MB of them): microseconds per matmul and GB/s of int8 weights.
`attention`: 16 layers of batch-`--batch` decode attention over distinct, written caches (16 heads / 4
KV heads, head 64, 513 of 640 positions valid): GroupQueryAttention, or the same attention as plain
operators over the same cache layout (scores = K x Q^T, one product per KV head; softmax over the valid
positions; P x V as batch-1 products), or GroupQueryAttention over an int8 cache with per-channel
scales (`gqa-int8`, as `dsnode convert --kv-cache int8` builds). Only the GroupQueryAttention kinds
write the new position; none applies rotary embeddings: the comparison is of the attention arithmetic. Median over 55 runs, one intra-op thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
HEADS, KV_HEADS, HEAD_DIM, CAPACITY, VALID, LAYERS = 16, 4, 64, 640, 513, 16
FLOAT = TensorProto.FLOAT


def session(nodes: list, inputs: list, outputs: list, initializers: list) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "parts", inputs, outputs, initializers)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                  helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def median_s(run, *args, repeats: int = 60) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times[5:])


def matmul(copies: int, rows: int) -> None:
    from dsnode.edge.nbits import quantize_weight

    k, n, rng = 1024, 5632, np.random.default_rng(0)
    for count in (1, copies):
        nodes, inits = [], []
        for c in range(count):
            q = quantize_weight(rng.standard_normal((k, n)).astype(np.float32) * 0.02, 8, 128, symmetric=True)
            inits += [numpy_helper.from_array(q.packed, f"B{c}"), numpy_helper.from_array(q.scales, f"S{c}")]
            nodes.append(helper.make_node("MatMulNBits", ["A", f"B{c}", f"S{c}"], [f"Y{c}"],
                                          domain="com.microsoft", K=k, N=n, bits=8, block_size=128, accuracy_level=4))
        s = session(nodes, [helper.make_tensor_value_info("A", FLOAT, [rows, k])],
                    [helper.make_tensor_value_info(f"Y{c}", FLOAT, [rows, n]) for c in range(count)], inits)
        a = rng.standard_normal((rows, k)).astype(np.float32)
        per = median_s(s.run, None, {"A": a}) / count
        print(f"{count:3d} distinct weight(s), M={rows}: {per * 1e6:.1f} us per matmul, "
              f"{k * n / per / 1e9:.1f} GB/s of int8 weights")


def attention_graph(kind: str, batch: int) -> tuple[ort.InferenceSession, dict[str, np.ndarray]]:
    rng, vi, group = np.random.default_rng(0), helper.make_tensor_value_info, HEADS // KV_HEADS
    cache = [batch, KV_HEADS, CAPACITY, HEAD_DIM]
    nodes, inputs, outputs, inits, feeds = [], [], [], [], {}
    gqa = kind.startswith("gqa")
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM if gqa else HEADS * HEAD_DIM
    cached = TensorProto.INT8 if kind == "gqa-int8" else FLOAT
    quantized: dict[str, object] = {}
    extra: list[str] = []
    if kind == "gqa-int8":  # scales for standard-normal values: |x| <= 4 onto +-127
        quantized = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
        extra = ["", "", "", "", "", "kv_scale", "kv_scale"]  # cos, sin, position_ids, bias, sink, k, v scales
        inits.append(numpy_helper.from_array(np.full(KV_HEADS * HEAD_DIM, 4 / 127, np.float32), "kv_scale"))
    for layer in range(LAYERS):
        q, k, v = f"q{layer}", f"k{layer}", f"v{layer}"
        inputs += [vi(q, FLOAT, [batch, 1, width]), vi(k, cached, cache), vi(v, cached, cache)]
        outputs.append(vi(f"out{layer}", FLOAT, [batch, 1, HEADS * HEAD_DIM]))
        feeds[q] = rng.standard_normal((batch, 1, width)).astype(np.float32)
        feeds[k], feeds[v] = (rng.standard_normal(cache).astype(np.float32) for _ in range(2))
        if kind == "gqa-int8":
            feeds[k], feeds[v] = (np.clip(np.rint(feeds[n] * 127 / 4), -127, 127).astype(np.int8) for n in (k, v))
        if gqa:
            outputs += [vi(f"k_out{layer}", cached, cache), vi(f"v_out{layer}", cached, cache)]
            nodes.append(helper.make_node("GroupQueryAttention", [q, "", "", k, v, "seqlens", "total", *extra],
                                          [f"out{layer}", f"k_out{layer}", f"v_out{layer}"], domain="com.microsoft",
                                          num_heads=HEADS, kv_num_heads=KV_HEADS, **quantized))
            continue
        n = f"l{layer}"
        nodes += [helper.make_node("Mul", [q, "scale"], [f"{n}.q_scaled"]),  # 1/sqrt(D), as GQA's default
                  helper.make_node("Reshape", [f"{n}.q_scaled", "q_shape"], [f"{n}.q"]),  # (B, KVH, G, D)
                  helper.make_node("Transpose", [f"{n}.q"], [f"{n}.qt"], perm=[0, 1, 3, 2]),  # (B, KVH, D, G)
                  helper.make_node("MatMul", [k, f"{n}.qt"], [f"{n}.scores"]),  # (B, KVH, T, G): K read once
                  helper.make_node("Add", [f"{n}.scores", "mask"], [f"{n}.masked"]),
                  helper.make_node("Softmax", [f"{n}.masked"], [f"{n}.p"], axis=2),
                  helper.make_node("Transpose", [f"{n}.p"], [f"{n}.pt"], perm=[0, 1, 3, 2]),  # (B, KVH, G, T)
                  helper.make_node("Unsqueeze", [f"{n}.pt", "axis3"], [f"{n}.p5"]),  # (B, KVH, G, 1, T)
                  helper.make_node("Unsqueeze", [v, "axis2"], [f"{n}.v5"]),  # (B, KVH, 1, T, D)
                  helper.make_node("MatMul", [f"{n}.p5", f"{n}.v5"], [f"{n}.a"]),  # batch-1 products
                  helper.make_node("Reshape", [f"{n}.a", "out_shape"], [f"out{layer}"])]
    if gqa:
        inputs += [vi("seqlens", TensorProto.INT32, [batch]), vi("total", TensorProto.INT32, [])]
        feeds["seqlens"], feeds["total"] = np.full(batch, VALID - 1, np.int32), np.array(VALID, np.int32)
    else:
        inputs.append(vi("mask", FLOAT, [batch, 1, CAPACITY, 1]))
        feeds["mask"] = np.where(np.arange(CAPACITY) < VALID, 0.0, -1e30).astype(np.float32).reshape(1, 1, -1, 1)
        feeds["mask"] = np.repeat(feeds["mask"], batch, axis=0)
        for name, value in (("q_shape", [batch, KV_HEADS, group, HEAD_DIM]), ("out_shape", [batch, 1, HEADS * HEAD_DIM]),
                            ("axis2", [2]), ("axis3", [3])):
            inits.append(numpy_helper.from_array(np.array(value, np.int64), name))
        inits.append(numpy_helper.from_array(np.array(HEAD_DIM ** -0.5, np.float32), "scale"))
    return session(nodes, inputs, outputs, inits), feeds


def attention(kind: str, batch: int) -> None:
    s, feeds = attention_graph(kind, batch)
    binding, values = s.io_binding(), {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in feeds.items()}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for out in s.get_outputs():
        if out.name.startswith(("k_out", "v_out")):  # GQA's present cache: the same buffer, as the engine binds it
            binding.bind_ortvalue_output(out.name, values[out.name.replace("_out", "")])
        else:
            binding.bind_output(out.name)
    per = median_s(s.run_with_iobinding, binding)
    print(f"{kind} attention, batch {batch}, {VALID} of {CAPACITY} positions: {per * 1e3:.2f} ms for {LAYERS} layers")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("matmul", "attention"))
    parser.add_argument("--copies", type=int, default=40)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kind", choices=("gqa", "gqa-int8", "plain"), default=None,
                        help="attention: one kind (default all three)")
    args = parser.parse_args()
    if args.part == "matmul":
        matmul(args.copies, args.rows)
    else:
        for kind in [args.kind] if args.kind else ["gqa", "gqa-int8", "plain"]:
            attention(kind, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
