"""Does every node of a graph have a CUDA kernel for its input types? (No torch; onnx only.)

The kernel list is `edge/data/cuda_kernels.json`: an excerpt of onnxruntime's docs/OperatorKernels.md
(CUDA section; its header says which commit). Types flow from the graph's inputs and initializers
through each node: an output's type is the type its kernel signature binds (MatMulNBits' Y is A's T1),
or, for operators outside the list, what onnx's own type inference found. A node is covered when a
kernel row exists for its operator at the version the graph's opset selects and every typed input is
one of the types that row lists. What onnxruntime would run on the CPU beside the CUDA provider is
exactly what this reports as uncovered (except nodes folded away at load, such as Constant).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

KERNELS_FILE = Path(__file__).with_name("data") / "cuda_kernels.json"
FOLDED_AT_LOAD = {"Constant"}  # onnxruntime turns these into initializers before placing nodes
_NAMES = {value: name.lower() for name, value in TensorProto.DataType.items()}


@dataclass(frozen=True)
class Uncovered:
    node: str
    op: str  # "domain:Op" for non-default domains
    why: str


def kernel_table(path: Path = KERNELS_FILE) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def _type_name(elem_type: int) -> str:
    return _NAMES.get(elem_type, str(elem_type))


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node holds: the branches of `If`, the bodies of `Loop` and `Scan`."""
    return [sub for attribute in node.attribute
            for sub in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs))]


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """`graph` and every subgraph in it, outermost first."""
    return [graph] + [inner for node in graph.node for sub in _subgraphs(node) for inner in _graphs(sub)]


def _nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node, a subgraph's right after the node that holds it (the order values are defined in)."""
    return [found for node in graph.node for found in [node, *(n for sub in _subgraphs(node) for n in _nodes(sub))]]


def _known_types(model: onnx.ModelProto) -> dict[str, str]:
    """Value name → element type, from onnx's inference (complete for standard operators)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types: dict[str, str] = {}
    for graph in _graphs(inferred.graph):
        for value in [*graph.input, *graph.value_info, *graph.output]:
            if value.type.tensor_type.elem_type:
                types[value.name] = _type_name(value.type.tensor_type.elem_type)
        for init in graph.initializer:
            types[init.name] = _type_name(init.data_type)
    return types


def _schema_version(op: str, domain: str, opsets: dict[str, int]) -> int:
    """The operator version the graph's opset selects (contrib operators are all version 1)."""
    if domain not in ("", "ai.onnx"):
        return 1
    try:
        return int(onnx.defs.get_schema(op, opsets.get("", 1), "").since_version)
    except onnx.defs.SchemaError:  # onnxruntime's own operators registered in the ONNX domain
        return 1


def _row(rows: list[dict[str, Any]], version: int) -> dict[str, Any] | None:
    for row in rows:
        start, end = row["versions"]
        if start <= version and (end is None or version <= end):
            return row
    return None


def _allowed(row: dict[str, Any], param: str, sets: dict[str, list[str]]) -> list[str] | None:
    """The types a signature parameter takes; a literal type (e.g. "int64") stands for itself."""
    if param in row["types"]:
        value = row["types"][param]
        return sets[value] if isinstance(value, str) else list(value)
    return [param] if param in _NAMES.values() else None


def _check_node(node: onnx.NodeProto, row: dict[str, Any], types: dict[str, str],
                sets: dict[str, list[str]]) -> tuple[str | None, dict[str, str]]:
    """(why it is not covered or None, the type each signature parameter is bound to)."""
    bound: dict[str, str] = {}
    signature = row["inputs"]
    for i, name in enumerate(node.input):
        if not name or name not in types:
            continue
        param = signature[min(i, len(signature) - 1)]  # variadic inputs repeat the last parameter
        allowed = _allowed(row, param, sets)
        if allowed is not None and types[name] not in allowed:
            return f"input {i} ({name}) is {types[name]}; the CUDA kernel takes {param} in {allowed}", bound
        bound.setdefault(param, types[name])
    return None, bound


def _output_types(node: onnx.NodeProto, row: dict[str, Any] | None, bound: dict[str, str],
                  types: dict[str, str]) -> None:
    if node.op_type == "Cast":
        to = next(a.i for a in node.attribute if a.name == "to")
        types[node.output[0]] = _type_name(to)
        return
    for i, name in enumerate(node.output):
        if not name or name in types or row is None or i >= len(row["outputs"]):
            continue
        param = row["outputs"][i]
        if param in bound:
            types[name] = bound[param]
        elif len(row["types"].get(param, [])) == 1 and isinstance(row["types"][param], list):
            types[name] = row["types"][param][0]


def uncovered_nodes(model: onnx.ModelProto, table: dict[str, Any] | None = None) -> list[Uncovered]:
    """Every node the CUDA provider has no kernel for (empty: the whole graph runs on the GPU), the
    nodes of subgraphs included."""
    table = table or kernel_table()
    kernels, sets = table["kernels"], table["type_sets"]
    opsets = {o.domain: o.version for o in model.opset_import}
    types = _known_types(model)
    found: list[Uncovered] = []
    for node in _nodes(model.graph):
        if node.op_type in FOLDED_AT_LOAD:
            continue
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"
        version = _schema_version(node.op_type, node.domain, opsets)
        row = _row(kernels[key], version) if key in kernels else None
        if row is None:
            why = "not in the CUDA kernel list" if key not in kernels else f"no CUDA kernel for version {version}"
            found.append(Uncovered(node.name or node.output[0], key, why))
            _output_types(node, None, {}, types)
            continue
        why, bound = _check_node(node, row, types, sets)
        if why:
            found.append(Uncovered(node.name or node.output[0], key, why))
        _output_types(node, row, bound, types)
    return found


def check_file(path: Path) -> list[Uncovered]:
    return uncovered_nodes(onnx.load(str(path), load_external_data=False))
