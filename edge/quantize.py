"""int8 weight quantization of an exported graph (convert time; onnx + onnxruntime, no torch).

- MatMul weights become int8 with one scale each (onnxruntime's `quantize_dynamic`); activations are
  quantized on the fly and multiplied in integers (`MatMulInteger`): no calibration data needed.
- One change to what onnxruntime writes: its `DynamicQuantizeLinear` picks one activation scale for the
  whole tensor, i.e. for every sequence of the batch together, so a request's tokens would depend on
  what else is being decoded with it. Each is replaced by a per-row quantizer (symmetric, scale =
  max|x| / 127 per token, zero point 128): a row's quantization depends on that row only, and one
  outlier token no longer coarsens everyone's scale. (Float32 noise between batch shapes, ~1e-6, can
  still tip a value across a rounding boundary now and then: a ~1e-2 logit change, not a new scale.)
- Embedding tables (a Gather of a 2-D weight: a quarter of a 7B model's bytes, `quantize_dynamic` leaves
  them float32) are stored as int8 with one scale per row, dequantized after the lookup.
  MoE expert weights (3-D, gathered by expert) stay float32.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Above this an ONNX protobuf cannot hold its weights: they go to `<file>.data` beside it.
EXTERNAL_DATA_BYTES = 1_800_000_000
_ROW = "dsnode_row_quant"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def quantize_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = folder_bytes(source.parent) > EXTERNAL_DATA_BYTES
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing" advice, once per run
    try:
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            per_channel=False,
            use_external_data_format=large,
        )
    finally:
        logging.getLogger().setLevel(quiet)
    model = onnx.load(str(target), load_external_data=large)
    per_row_activations(model)
    quantize_embeddings(model)
    _save(model, target, large)


def per_row_activations(model: onnx.ModelProto) -> int:
    """Replace every DynamicQuantizeLinear by a per-row quantizer; returns how many were replaced.

    quantize_dynamic writes, per weight: x → DynamicQuantizeLinear → (xq, x_scale, x_zp);
    MatMulInteger(xq, Wq, x_zp, W_zp) → Cast → Mul(·, x_scale · W_scale) → y. The row scale (..., 1)
    is not put in x_scale's place: onnxruntime fuses MatMulInteger+Cast+Mul into MatMulIntegerToFloat,
    whose activation scale must be a scalar (a per-row one there gives wrong numbers). x_scale becomes
    1 and y is multiplied by the row scale after the fused part instead.
    """
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    nodes: list[onnx.NodeProto] = []
    rescale: dict[str, str] = {}  # the Mul output y of a quantized MatMul → its row scale
    replaced = 0
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        prefix = f"{_ROW}/{replaced}"
        quantized, scale, zero_point = node.output
        nodes += _row_quantizer(node.input[0], quantized, f"{prefix}/scale", prefix)
        nodes += [helper.make_node("Identity", [f"{_ROW}/one"], [scale]),
                  helper.make_node("Identity", [f"{_ROW}/zero_point"], [zero_point])]
        for matmul in consumers.get(quantized, []):
            rescale[_scaled_output(matmul, consumers)] = f"{prefix}/scale"
        replaced += 1
    ordered: list[onnx.NodeProto] = []
    for node in nodes:
        ordered.append(node)
        for i, y in enumerate(node.output):
            if y in rescale:
                node.output[i] = f"{y}/unscaled"
                ordered.append(helper.make_node("Mul", [f"{y}/unscaled", rescale[y]], [y]))
    if replaced:
        graph.initializer.extend([
            numpy_helper.from_array(np.array([-1], np.int64), f"{_ROW}/axes"),
            numpy_helper.from_array(np.array(1e-12, np.float32), f"{_ROW}/eps"),
            numpy_helper.from_array(np.array(127.0, np.float32), f"{_ROW}/qmax"),
            numpy_helper.from_array(np.array(1.0, np.float32), f"{_ROW}/one"),
            numpy_helper.from_array(np.array(128, np.uint8), f"{_ROW}/zero_point"),
        ])
        del graph.node[:]
        graph.node.extend(ordered)
    return replaced


def _scaled_output(matmul: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> str:
    """The output of the MatMulInteger → Cast → Mul chain that quantize_dynamic builds."""
    chain = [matmul]
    for op in ("Cast", "Mul"):
        following = consumers.get(chain[-1].output[0], [])
        if len(following) != 1 or following[0].op_type != op:
            raise ValueError(f"unexpected quantized graph after {chain[-1].name or chain[-1].op_type}: "
                             f"{[n.op_type for n in following]}, expected {op}")
        chain.append(following[0])
    if matmul.op_type != "MatMulInteger":
        raise ValueError(f"a quantized activation feeds {matmul.op_type}, expected MatMulInteger")
    return str(chain[-1].output[0])


def _row_quantizer(x: str, quantized: str, scale: str, prefix: str) -> list[onnx.NodeProto]:
    """x (..., K) float → quantized uint8 (..., K) and scale (..., 1), with zero point 128:
    x ≈ (quantized - 128) * scale, scale = max|x| / 127 over the last axis."""
    c = _ROW
    return [
        helper.make_node("Abs", [x], [f"{prefix}/abs"]),
        helper.make_node("ReduceMax", [f"{prefix}/abs", f"{c}/axes"], [f"{prefix}/amax"], keepdims=1),
        helper.make_node("Max", [f"{prefix}/amax", f"{c}/eps"], [f"{prefix}/amax_safe"]),
        helper.make_node("Div", [f"{prefix}/amax_safe", f"{c}/qmax"], [scale]),
        helper.make_node("Div", [x, scale], [f"{prefix}/scaled"]),
        # round half to even, + 128, saturate to uint8: one node instead of Round, Add, Cast
        helper.make_node("QuantizeLinear", [f"{prefix}/scaled", f"{c}/one", f"{c}/zero_point"], [quantized]),
    ]


def quantize_embeddings(model: onnx.ModelProto, min_elements: int = 1 << 16) -> int:
    """Gather(table (V, H) float, ids) → Gather(int8 table, ids) · Gather(row scales (V, 1), ids)."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes: list[onnx.NodeProto] = []
    quantized: set[str] = set()
    for node in graph.node:
        table = initializers.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (table is None or axis != 0 or len(table.dims) != 2 or table.data_type != TensorProto.FLOAT
                or table.dims[0] * table.dims[1] < min_elements):
            nodes.append(node)
            continue
        name, ids, out = table.name, node.input[1], node.output[0]
        if name not in quantized:
            weights = numpy_helper.to_array(table)  # (V, H)
            scales = np.maximum(np.abs(weights).max(axis=1, keepdims=True), 1e-12) / 127.0  # (V, 1)
            values = np.clip(np.rint(weights / scales), -127, 127).astype(np.int8)
            graph.initializer.extend([numpy_helper.from_array(values, f"{name}/int8"),
                                      numpy_helper.from_array(scales.astype(np.float32), f"{name}/row_scale")])
            quantized.add(name)
        nodes += [
            helper.make_node("Gather", [f"{name}/int8", ids], [f"{out}/int8"]),  # (..., H)
            helper.make_node("Cast", [f"{out}/int8"], [f"{out}/float"], to=TensorProto.FLOAT),
            helper.make_node("Gather", [f"{name}/row_scale", ids], [f"{out}/scale"]),  # (..., 1)
            helper.make_node("Mul", [f"{out}/float", f"{out}/scale"], [out]),
        ]
        uses[name] -= 1
    if quantized:
        del graph.node[:]
        graph.node.extend(nodes)
        unused = [init for init in graph.initializer if init.name in quantized and uses[init.name] == 0]
        for init in unused:
            graph.initializer.remove(init)
    return len(quantized)


def _save(model: onnx.ModelProto, target: Path, large: bool) -> None:
    if large:
        data = target.with_name(target.name + ".data")
        data.unlink(missing_ok=True)
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(target))


def place_float(source: Path, target: Path) -> None:
    """The unquantized graph as `target`: moved as is, or with its weights gathered into one
    `<target>.data` file when the exporter spread them over one file per tensor (> 2 GB models)."""
    if folder_bytes(source.parent) == source.stat().st_size:
        os.replace(source, target)
        return
    model = onnx.load(str(source), load_external_data=True)
    _save(model, target, large=True)


def quantize_nbits(source: Path, target: Path, bits: int, block_size: int, accuracy_level: int,
                   symmetric: bool) -> dict[str, str]:
    """The traced graph's MatMul weights as MatMulNBits (weight-only, `bits` per weight, a zero point
    per block unless `symmetric`); returns the MatMuls left float, with why. A weight whose input size
    is not a multiple of the block stays float (the same rule as the GQA builder's)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    large = folder_bytes(source.parent) > EXTERNAL_DATA_BYTES
    model = onnx.load(str(source), load_external_data=True)
    weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
    excluded: dict[str, str] = {}
    for node in model.graph.node:
        dims = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if dims and len(dims) == 2 and dims[0] % block_size:
            excluded[node.name] = f"K={dims[0]} is not a multiple of the block size {block_size}"
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # one INFO line per MatMul otherwise
    try:
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                         accuracy_level=accuracy_level, nodes_to_exclude=list(excluded))
        quantizer.process()
    finally:
        logging.getLogger().setLevel(quiet)
    quantized = quantizer.model.model
    quantize_embeddings(quantized)
    _save(quantized, target, large)
    return excluded
