"""Build the edge's decoder graph directly from the checkpoint, one layer at a time (convert time; no torch).

The graph (what `edge/slot_runner.py` drives):
  in   input_ids (B, S) int64; seqlens_k (B,) int32: each row's valid tokens after this step, minus 1;
       total_sequence_length () int32: the largest of those + 1;
       past_key_values.{i}.key/value (B, kv_heads, max_len, head_dim): the cache buffer, shared with
  out  present.{i}.key/value (the same buffer: GroupQueryAttention writes the new positions in place)
       logits (B, V) float32 of each row's last position only (prefill never pays S x V for the LM head).
Per layer: RMSNorm → one MatMulNBits for q, k and v together → GroupQueryAttention (rotary positions
from seqlens_k, grouped KV heads read without repeating them) → MatMulNBits → residual + RMSNorm →
SiLU-gated MLP (gate and up in one MatMulNBits, then down). These are the operators onnxruntime-genai's builder emits; every
one has a CUDA kernel at compute capability 7.5 for fp16 (see `edge/op_coverage.py`).

Weights are read from the checkpoint, quantized and appended to `model.onnx.data` as they come, so the
builder holds one weight at a time: a 7B model converts in a few GB of memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .checkpoint import Checkpoint
from .model_shape import ModelShape
from .nbits import BITS, NBitsWeight, fits_blocks, quantize_weight

OPSET = 21
DATA_SUFFIX = ".data"
_ALIGN = 4096  # external tensors start on a page: onnxruntime can map them instead of copying
_ONNX_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


@dataclass(frozen=True)
class BuildOptions:
    quant: str  # "int8" | "int4" | "none"
    target: str  # "cpu" (float32 activations) | "cuda" (float16)
    block_size: int
    accuracy_level: int
    symmetric: bool

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.target == "cuda" else np.float32)


@dataclass
class BuildReport:
    quantized: list[str] = field(default_factory=list)  # MatMulNBits weights
    float_layers: dict[str, str] = field(default_factory=dict)  # weight → why it stayed float


class WeightFile:
    """Appends tensors to one external-data file and returns the initializers that point into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        pad = -self.offset % _ALIGN
        self._file.write(b"\0" * pad)
        self.offset += pad
        data = np.ascontiguousarray(array).tobytes()
        self._file.write(data)
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(data)))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.offset += len(data)
        return proto

    def close(self) -> None:
        self._file.close()


class DecoderBuilder:
    def __init__(self, checkpoint: Checkpoint, shape: ModelShape, options: BuildOptions, weights: WeightFile) -> None:
        self.ckpt, self.shape, self.options, self.weights = checkpoint, shape, options, weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.report = BuildReport()

    # --- small helpers ---------------------------------------------------------------------------
    def node(self, op: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "", **attrs: object) -> list[str]:
        names = [f"{name}/out{i}" if i else f"{name}/out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain, **attrs))
        return names

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def stored(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.weights.tensor(name, array))
        return name

    def float_weight(self, hf_name: str) -> np.ndarray:
        return self.ckpt.float32(hf_name)

    # --- layers ----------------------------------------------------------------------------------
    def linear(self, x: str, weight: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
        """x (..., K) @ weight (K, N) [+ bias (N)]: MatMulNBits when quantizing and K fits the blocks."""
        k, n = weight.shape
        bits = BITS.get(self.options.quant)
        if bits and fits_blocks(k, self.options.block_size):
            q = quantize_weight(weight, bits, self.options.block_size, self.options.symmetric)
            (y,) = self._nbits(x, q, name)
        else:
            if bits:
                self.report.float_layers[name] = f"K={k} is not a multiple of the block size {self.options.block_size}"
            (y,) = self.node("MatMul", [x, self.stored(f"{name}.weight", weight.astype(self.options.dtype))], name)
        if bias is not None:
            (y,) = self.node("Add", [y, self.stored(f"{name}.bias", bias.astype(self.options.dtype))], f"{name}/bias")
        return y

    def _nbits(self, x: str, q: NBitsWeight, name: str) -> list[str]:
        self.report.quantized.append(name)
        packed = self.stored(f"{name}.weight_q{q.bits}", q.packed)
        scales = self.stored(f"{name}.weight_scales", q.scales.astype(self.options.dtype))
        inputs = [x, packed, scales]
        if q.zero_points is not None:
            inputs.append(self.stored(f"{name}.weight_zero_points", q.zero_points))
        return self.node("MatMulNBits", inputs, name, domain="com.microsoft", K=q.k, N=q.n,
                         bits=q.bits, block_size=q.block_size, accuracy_level=self.options.accuracy_level)

    def rms_norm(self, x: str, hf_name: str, name: str) -> str:
        weight = self.stored(hf_name, self.float_weight(hf_name).astype(self.options.dtype))
        (y,) = self.node("SimplifiedLayerNormalization", [x, weight], name, axis=-1,
                         epsilon=self.shape.rms_eps, stash_type=1)
        return y

    def skip_rms_norm(self, x: str, skip: str, hf_name: str, name: str) -> tuple[str, str]:
        """(norm(x + skip), x + skip): the residual add fused into the norm."""
        weight = self.stored(hf_name, self.float_weight(hf_name).astype(self.options.dtype))
        normed, _, _, summed = self.node("SkipSimplifiedLayerNormalization", [x, skip, weight], name, outputs=4,
                                         domain="com.microsoft", epsilon=self.shape.rms_eps)
        return normed, summed

    def embedding(self, ids: str) -> str:
        """(B, S) ids → (B, S, H). When quantizing, the table is stored as float16: a gather of
        MatMulNBits blobs has no kernel on every provider, and int8 rows (a scale each) cost ~10%
        top-1 agreement on a random-weight model where float16 costs nothing measurable; float16
        keeps an int8 7B model at ~27% of its float32 bytes."""
        table = self.float_weight("model.embed_tokens.weight")  # (V, H)
        stored = np.float16 if self.options.quant != "none" else self.options.dtype
        (x,) = self.node("Gather", [self.stored("embed.weight", table.astype(stored)), ids], "embed")
        if np.dtype(stored) != self.options.dtype:
            (x,) = self.node("Cast", [x], "embed/cast", to=_ONNX_TYPE[self.options.dtype])
        return x

    def attention(self, x: str, layer: int, cos: str, sin: str) -> str:
        s, prefix = self.shape, f"model.layers.{layer}.self_attn"
        parts = [self.float_weight(f"{prefix}.{p}_proj.weight") for p in ("q", "k", "v")]  # (out, in) each
        bias = None
        if s.qkv_bias:
            bias = np.concatenate([self.float_weight(f"{prefix}.{p}_proj.bias") for p in ("q", "k", "v")])
        qkv = self.linear(x, np.concatenate(parts).T, f"layers.{layer}.qkv_proj", bias)  # (B, S, (H + 2 Hkv) d)
        del parts
        (attn, _, _) = self.node(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{layer}.key", f"past_key_values.{layer}.value", "seqlens_k",
             "total_sequence_length", cos, sin],
            f"layers.{layer}.attn", outputs=3, domain="com.microsoft", num_heads=s.heads, kv_num_heads=s.kv_heads,
            scale=1.0 / math.sqrt(s.head_dim), do_rotary=1, rotary_interleaved=0, local_window_size=-1)
        self.nodes[-1].output[1:] = [f"present.{layer}.key", f"present.{layer}.value"]
        return self.linear(attn, self.float_weight(f"{prefix}.o_proj.weight").T, f"layers.{layer}.o_proj")

    def mlp(self, x: str, layer: int) -> str:
        """down(silu(gate(x)) * up(x)), with gate and up as one matmul: one pass over x (and, on the CPU,
        one int8 quantization of it) instead of two; its (B, S, 2I) output is split in halves."""
        prefix, width = f"model.layers.{layer}.mlp", self.shape.intermediate
        gate_up = np.concatenate([self.float_weight(f"{prefix}.{p}_proj.weight") for p in ("gate", "up")]).T
        both = self.linear(x, gate_up, f"layers.{layer}.gate_up_proj")  # (B, S, 2I)
        del gate_up
        halves = self.constant(f"layers.{layer}.gate_up_split", np.array([width, width], dtype=np.int64))
        gate, up = self.node("Split", [both, halves], f"layers.{layer}.gate_up_split", outputs=2, axis=-1)
        (sig,) = self.node("Sigmoid", [gate], f"layers.{layer}.silu/sigmoid")
        (silu,) = self.node("Mul", [gate, sig], f"layers.{layer}.silu")
        (gated,) = self.node("Mul", [silu, up], f"layers.{layer}.gated")
        return self.linear(gated, self.float_weight(f"{prefix}.down_proj.weight").T, f"layers.{layer}.down_proj")

    def lm_head(self, residual: str) -> str:
        """The last position of each row → final norm → logits (B, V) float32."""
        index = self.constant("last_position", np.array(-1, dtype=np.int64))
        (last,) = self.node("Gather", [residual, index], "last_position_hidden", axis=1)  # (B, H)
        normed = self.rms_norm(last, "model.norm.weight", "final_norm")
        name = "model.embed_tokens.weight" if self.shape.tied_embeddings else "lm_head.weight"
        logits = self.linear(normed, self.float_weight(name).T, "lm_head")  # (B, V)
        if self.options.dtype != np.float32:
            (logits,) = self.node("Cast", [logits], "logits/float32", to=TensorProto.FLOAT)
        (out,) = self.node("Identity", [logits], "logits")
        self.nodes[-1].output[0] = "logits"
        return out

    def decoder(self, on_layer: Callable[[int], None]) -> None:
        cos, sin = (self.stored(n, c.astype(self.options.dtype)) for n, c in zip(("cos_cache", "sin_cache"),
                                                                                 self.shape.rotary_caches()))
        x = self.embedding("input_ids")
        normed = self.rms_norm(x, "model.layers.0.input_layernorm.weight", "layers.0.input_norm")
        for layer in range(self.shape.layers):
            attn = self.attention(normed, layer, cos, sin)
            normed, x = self.skip_rms_norm(x, attn, f"model.layers.{layer}.post_attention_layernorm.weight",
                                           f"layers.{layer}.post_attention_norm")
            mlp = self.mlp(normed, layer)
            if layer + 1 < self.shape.layers:
                normed, x = self.skip_rms_norm(x, mlp, f"model.layers.{layer + 1}.input_layernorm.weight",
                                               f"layers.{layer + 1}.input_norm")
            else:
                (x,) = self.node("Add", [x, mlp], "final_residual")
            on_layer(layer)
        self.lm_head(x)

    def model(self) -> onnx.ModelProto:
        s, elem = self.shape, _ONNX_TYPE[self.options.dtype]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                  helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
                  helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", s.vocab])]
        cache = ["batch", s.kv_heads, "max_length", s.head_dim]
        for i in range(s.layers):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", elem, cache))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", elem, cache))
        graph = helper.make_graph(self.nodes, "dsnode-decoder", inputs, outputs, self.initializers)
        return helper.make_model(graph, producer_name="dsnode", ir_version=10,
                                 opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])


def weight_names(shape: ModelShape) -> list[str]:
    """The checkpoint tensors the builder reads (Hugging Face names)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not shape.tied_embeddings:
        names.append("lm_head.weight")
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        names += [f"{prefix}.input_layernorm.weight", f"{prefix}.post_attention_layernorm.weight",
                  *(f"{prefix}.self_attn.{p}_proj.weight" for p in ("q", "k", "v", "o")),
                  *(f"{prefix}.mlp.{p}_proj.weight" for p in ("gate", "up", "down"))]
        if shape.qkv_bias:
            names += [f"{prefix}.self_attn.{p}_proj.bias" for p in ("q", "k", "v")]
    return names


def build_decoder(src: Path, shape: ModelShape, options: BuildOptions, target: Path,
                  on_layer: Callable[[int], None] = lambda layer: None) -> BuildReport:
    """Write `target` (the graph) and `target.data` (its weights) from the checkpoint in `src`."""
    checkpoint = Checkpoint(src)
    weights = WeightFile(target.with_name(target.name + DATA_SUFFIX))
    try:
        builder = DecoderBuilder(checkpoint, shape, options, weights)
        builder.decoder(on_layer)
        model = builder.model()
    finally:
        weights.close()
        checkpoint.close()
    onnx.save_model(model, str(target))
    return builder.report
