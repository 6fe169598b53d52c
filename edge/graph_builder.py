"""Build the edge's decoder graph directly from the checkpoint, one layer at a time (convert time; no torch).

The graph (what `edge/slot_runner.py` drives):
  in   input_ids (B, S) int64; seqlens_k (B,) int32: each row's valid tokens after this step, minus 1;
       total_sequence_length () int32: the largest of those + 1;
       past_key_values.{i}.key/value (B, kv_heads, max_len, head_dim): the cache buffer, shared with
       present.{i}.key/value (out: the same buffer; GroupQueryAttention writes the new positions in place);
       last_position int64: -1 (a scalar) for each row's last position only (prefill never pays S x V
       for the LM head), or k positions (1-D) for k rows per row: a prompt being scored
       (`SlotRunner.prefill_all`).
  out  logits (B, V) float32, or (B x k, V).
Per layer: RMSNorm → one MatMulNBits for q, k and v together → attention → MatMulNBits → residual +
RMSNorm → SiLU-gated MLP (gate and up in one MatMulNBits, then down).

Attention, by target:
- cuda: GroupQueryAttention (rotary positions from seqlens_k, grouped KV heads read without repeating
  them, the cache written in place) for every step. These are the operators onnxruntime-genai's builder
  emits; every one has a CUDA kernel at compute capability 7.5 for fp16 (see `edge/op_coverage.py`).
- cpu: the same GroupQueryAttention for prefill (S > 1) and for a decode step of one row, and for a
  decode step of several rows (S = 1, B > 1) an `If` branch of plain operators: RotaryEmbedding,
  TensorScatter (the new position written into the same in-place buffer), scores as keys (L x d) @
  q^T (d x G) — one product per KV head for its whole group of query heads, each key read once and
  not repacked — a mask of the positions past each row's length, Softmax over L, then one 1 x L by
  L x d product per query head. The CPU GroupQueryAttention kernel multiplies each query head alone
  against a transposed, repacked copy of its keys: at batch 8 and ~520 cached tokens it is half the
  step (15 of 31.5 ms), and the branch makes the batch-8 step ~11% faster; at batch 1 the branch's
  extra nodes cost what its products save, so one row keeps GroupQueryAttention (docs/performance.md,
  run G; `benchmarks/decode_parts.py attention`).
- cpu with an int8 cache (`--kv-cache int8`): an `If` per layer: a prompt's first chunk attends in
  float32 over its own keys and values and writes them into the cache rounded per channel; every other
  step is GroupQueryAttention over the int8 cache (docs/edge.md, "An int8 KV cache").

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
from .kv_calibration import KVScales
from .manifest import LOGIT_POSITIONS
from .model_shape import ModelShape
from .nbits import BITS, NBitsWeight, fits_blocks, quantize_weight
from .weight_pipeline import WeightPipeline

OPSET = 21  # the cuda target's graph (GroupQueryAttention only)
OPSET_SPLIT_ATTENTION = 24  # the cpu target's graph: TensorScatter is opset 24
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
    kv_cache: str = "float"  # "int8": int8 cache with per-channel scales (cpu)
    threads: int = 1  # linear weights prepared at once (edge/weight_pipeline.py); the output is the same

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.target == "cuda" else np.float32)

    @property
    def decode_by_matmul(self) -> bool:
        """Batched decode steps attend with plain operators (cpu); GroupQueryAttention does the rest, and
        every step on cuda, and every step over an int8 cache (its kernel reads int8 faster than these
        operators read float32)."""
        return self.target == "cpu" and self.kv_cache == "float"

    @property
    def opset(self) -> int:
        return OPSET_SPLIT_ATTENTION if self.target == "cpu" else OPSET


@dataclass
class BuildReport:
    quantized: list[str] = field(default_factory=list)  # MatMulNBits weights
    float_layers: dict[str, str] = field(default_factory=dict)  # weight → why it stayed float


@dataclass(frozen=True)
class LinearWeight:
    """One linear layer's weight as the graph stores it: MatMulNBits blocks, or a float (K, N) matrix
    (and, when quantizing, why it stayed float)."""

    blocks: NBitsWeight | None = None
    matrix: np.ndarray | None = None
    why_float: str = ""


@dataclass(frozen=True)
class DecodeStep:
    """Names of the per-step values and shape constants the decode branches read (outer scope)."""

    batched_decode: str  # () bool: S == 1 and B > 1
    write_at: str  # (B,) int64: each row's length before this step
    positions: str  # (B, 1) int64: the rotary position of the new token
    mask: str  # (B, 1, L, 1): 0 up to the new token's position, the dtype's lowest after it
    scale: str  # () 1/sqrt(d)
    qkv_widths: str
    query_groups: str
    kv_heads: str
    merged_heads: str
    axis2: str
    axis3: str


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
        data = np.ascontiguousarray(array).reshape(-1)
        self._file.write(data.data.cast("B"))  # the array's own bytes: no copy of a large weight
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(data.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.offset += data.nbytes
        return proto

    def close(self) -> None:
        self._file.close()


class DecoderBuilder:
    def __init__(self, checkpoint: Checkpoint, shape: ModelShape, options: BuildOptions, weights: WeightFile,
                 linear_weights: WeightPipeline[tuple[str, ...], LinearWeight],
                 kv_scales: KVScales | None = None) -> None:
        self.ckpt, self.shape, self.options, self.weights = checkpoint, shape, options, weights
        self.linear_weights = linear_weights
        if (kv_scales is None) != (options.kv_cache == "float"):
            raise ValueError(f"kv_cache {options.kv_cache!r} needs scales exactly when it is int8")
        self.kv_scales = kv_scales
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

    @property
    def cache_type(self) -> int:
        return TensorProto.INT8 if self.kv_scales is not None else _ONNX_TYPE[self.options.dtype]

    def stored(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.weights.tensor(name, array))
        return name

    def float_weight(self, hf_name: str) -> np.ndarray:
        return self.ckpt.float32(hf_name)

    # --- layers ----------------------------------------------------------------------------------
    def linear(self, x: str, hf_names: tuple[str, ...], name: str, bias: np.ndarray | None = None) -> str:
        """x (..., K) @ the weights `hf_names` side by side (K, N) [+ bias (N)]: MatMulNBits when quantizing
        and K fits the blocks, else MatMul."""
        weight = self.linear_weights.take(hf_names)
        if weight.blocks is not None:
            (y,) = self._nbits(x, weight.blocks, name)
        else:
            assert weight.matrix is not None
            if weight.why_float:
                self.report.float_layers[name] = weight.why_float
            (y,) = self.node("MatMul", [x, self.stored(f"{name}.weight", weight.matrix)], name)
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
        stored = np.dtype(np.float16 if self.options.quant != "none" else self.options.dtype)
        table = self.ckpt.read_as("model.embed_tokens.weight", stored)  # (V, H)
        (x,) = self.node("Gather", [self.stored("embed.weight", table), ids], "embed")
        del table
        if stored != self.options.dtype:
            (x,) = self.node("Cast", [x], "embed/cast", to=_ONNX_TYPE[self.options.dtype])
        return x

    def attention(self, x: str, layer: int, cos: str, sin: str, step: DecodeStep | None) -> str:
        s, prefix = self.shape, f"model.layers.{layer}.self_attn"
        bias = None
        if s.qkv_bias:
            bias = np.concatenate([self.float_weight(f"{prefix}.{p}_proj.bias") for p in ("q", "k", "v")])
        qkv = self.linear(x, qkv_names(layer), f"layers.{layer}.qkv_proj", bias)  # (B, S, (H + 2 Hkv) d)
        if s.qk_norm:
            qkv = self.qk_normed(qkv, layer)
        if self.kv_scales is not None:
            attn = self.int8_cache_attention(qkv, layer, cos, sin)
        elif step is None:
            attn, _, _ = self.grouped_query_attention(qkv, layer, cos, sin)
        else:
            grouped = self.subgraph(f"layers.{layer}.gqa_branch",
                                    lambda: self.grouped_query_attention(qkv, layer, cos, sin))
            batched = self.subgraph(f"layers.{layer}.batched_decode",
                                    lambda: self.matmul_decode_attention(qkv, layer, cos, sin, step))
            (attn, _, _) = self.node("If", [step.batched_decode], f"layers.{layer}.attn", outputs=3,
                                     then_branch=batched, else_branch=grouped)
        self.nodes[-1].output[1:] = [f"present.{layer}.key", f"present.{layer}.value"]  # the graph's outputs
        return self.linear(attn, o_names(layer), f"layers.{layer}.o_proj")

    def qk_normed(self, qkv: str, layer: int) -> str:
        """Qwen3: each query and key head RMS-normalised over its head_dim (its own weights) before the
        rotary embedding, which every attention path applies to the packed q/k/v: so the heads are
        normalised here and packed again."""
        s, c, name = self.shape, self.constant, f"layers.{layer}.qk_norm"
        widths = c(f"{name}.widths", np.array([s.heads * s.head_dim, s.kv_heads * s.head_dim,
                                               s.kv_heads * s.head_dim], np.int64))
        q, k, v = self.node("Split", [qkv, widths], f"{name}/split", outputs=3, axis=-1)
        normed = []
        for part, x, heads in (("q", q, s.heads), ("k", k, s.kv_heads)):
            (x,) = self.node("Reshape", [x, c(f"{name}.{part}_heads", np.array([0, 0, heads, s.head_dim], np.int64))],
                             f"{name}/{part}_heads")
            x = self.rms_norm(x, f"model.layers.{layer}.self_attn.{part}_norm.weight", f"{name}/{part}")
            (x,) = self.node("Reshape", [x, c(f"{name}.{part}_flat", np.array([0, 0, heads * s.head_dim], np.int64))],
                             f"{name}/{part}_flat")
            normed.append(x)
        (packed,) = self.node("Concat", [*normed, v], f"{name}/packed", axis=-1)
        return packed

    def subgraph(self, name: str, build: Callable[[], tuple[str, ...]]) -> onnx.GraphProto:
        """A branch of an `If`: the nodes `build` adds, with the names it returns as the outputs (it reads
        the outer graph's values by name): (attention, present key, present value)."""
        outer, self.nodes = self.nodes, []
        try:
            outputs = build()
            elem = _ONNX_TYPE[self.options.dtype]
            types = (elem, *[self.cache_type] * (len(outputs) - 1))
            values = [helper.make_tensor_value_info(o, t, None) for o, t in zip(outputs, types)]
            return helper.make_graph(self.nodes, name, [], values)
        finally:
            self.nodes = outer

    def grouped_query_attention(self, qkv: str, layer: int, cos: str, sin: str,
                                int8_scales: tuple[str, str] | None = None) -> tuple[str, str, str]:
        """Any S: rotary, the new positions written into the cache buffer in place, causal attention.
        `int8_scales` (key, value): the cache is int8 with these per-channel scales. Returns (attention
        (B, S, H d), present key, present value)."""
        inputs = [qkv, "", "", f"past_key_values.{layer}.key", f"past_key_values.{layer}.value", "seqlens_k",
                  "total_sequence_length", cos, sin]
        quantized: dict[str, object] = {}
        if int8_scales is not None:
            inputs += ["", "", "", *int8_scales]  # position_ids, attention_bias, head_sink, k_scale, v_scale
            quantized = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
        return self.gqa_node(inputs, f"layers.{layer}.gqa", **quantized)

    def gqa_node(self, inputs: list[str], name: str, **quantized: object) -> tuple[str, str, str]:
        """GroupQueryAttention with this model's heads, rotary inside, causal: (attention, keys, values)."""
        s = self.shape
        attn, keys, values = self.node(
            "GroupQueryAttention", inputs, name, outputs=3, domain="com.microsoft", num_heads=s.heads,
            kv_num_heads=s.kv_heads, scale=1.0 / math.sqrt(s.head_dim), do_rotary=1, rotary_interleaved=0,
            local_window_size=-1, **quantized)
        return attn, keys, values

    def int8_cache_attention(self, qkv: str, layer: int, cos: str, sin: str) -> str:
        """Over an int8 cache: a prompt's first chunk attends in float32 over its own keys and values
        and then writes them into the cache quantized (the kernel's prefill over an int8 cache took 3.5x
        as long); every other step (decode, a later chunk) is GroupQueryAttention over the int8 cache,
        which quantizes the new positions itself."""
        s, name = self.shape, f"layers.{layer}.attn"
        assert self.kv_scales is not None
        # (1, Hkv, 1, d): broadcasts over the cache for the rounding; GroupQueryAttention reads it flat
        per_channel = (1, s.kv_heads, 1, s.head_dim)
        k_scale, v_scale = (self.stored(f"layers.{layer}.{kind}_cache_scale",
                                        scales[layer].astype(np.float32).reshape(per_channel))
                            for kind, scales in (("key", self.kv_scales.key), ("value", self.kv_scales.value)))
        first = self.subgraph(f"{name}.first_chunk", lambda: self.first_chunk_attention(qkv, layer, cos, sin,
                                                                                        k_scale, v_scale))
        cached = self.subgraph(f"{name}.int8_cache", lambda: self.grouped_query_attention(
            qkv, layer, cos, sin, int8_scales=(k_scale, v_scale)))
        (attn, _, _) = self.node("If", ["step/first_chunk"], name, outputs=3, then_branch=first, else_branch=cached)
        return attn

    def first_chunk_attention(self, qkv: str, layer: int, cos: str, sin: str, k_scale: str,
                              v_scale: str) -> tuple[str, str, str]:
        """S > 1 at position 0, one row: causal attention over the chunk's own float32 keys and values
        (GroupQueryAttention without a past), which are then rounded to int8 per channel and written at
        position 0 of the bound cache buffer (TensorScatter: in place)."""
        name = f"layers.{layer}.first_chunk"
        attn, keys, values = self.gqa_node([qkv, "", "", "", "", "seqlens_k", "total_sequence_length", cos, sin],
                                           f"{name}/gqa")
        written = []
        for kind, fresh, scale in (("key", keys, k_scale), ("value", values, v_scale)):
            (scaled,) = self.node("Div", [fresh, scale], f"{name}/{kind}_scaled")
            (rounded,) = self.node("QuantizeLinear", [scaled, "step.unit_scale", "step.int8_zero"],
                                   f"{name}/{kind}_int8")  # round half to even, saturate at -128..127
            (cache,) = self.node("TensorScatter", [f"past_key_values.{layer}.{kind}", rounded],
                                 f"{name}/write_{kind}", axis=2)
            written.append(cache)
        return attn, written[0], written[1]

    def matmul_decode_attention(self, qkv: str, layer: int, cos: str, sin: str,
                                step: DecodeStep) -> tuple[str, str, str]:
        """S = 1, B > 1: scores as keys (L x d) @ q^T (d x G), one product per KV head for its whole group of
        query heads, each key read once and not repacked (onnxruntime's kernels pack the second operand:
        here it is q, G x d); positions past a row's length masked; then per query head one 1 x L by
        L x d product (a batch-1 product reads the values as they lie). k and v are written at each
        row's length (TensorScatter over the bound buffer: in place). Returns (attention (B, 1, H d),
        present key, present value)."""
        s, name = self.shape, f"layers.{layer}.decode"
        q, k, v = self.node("Split", [qkv, step.qkv_widths], f"{name}/split", outputs=3, axis=-1)
        (q,) = self.node("RotaryEmbedding", [q, step.positions, cos, sin], f"{name}/rotary_q",
                         domain="com.microsoft", num_heads=s.heads, interleaved=0)
        (k,) = self.node("RotaryEmbedding", [k, step.positions, cos, sin], f"{name}/rotary_k",
                         domain="com.microsoft", num_heads=s.kv_heads, interleaved=0)
        (q,) = self.node("Reshape", [q, step.query_groups], f"{name}/q_groups")  # (B, Hkv, G, d): h = kv * G + g
        (k,) = self.node("Reshape", [k, step.kv_heads], f"{name}/k_heads")  # (B, Hkv, 1, d)
        (v,) = self.node("Reshape", [v, step.kv_heads], f"{name}/v_heads")
        (keys,) = self.node("TensorScatter", [f"past_key_values.{layer}.key", k, step.write_at], f"{name}/write_key",
                            axis=2)
        (values,) = self.node("TensorScatter", [f"past_key_values.{layer}.value", v, step.write_at],
                              f"{name}/write_value", axis=2)
        (q,) = self.node("Mul", [q, step.scale], f"{name}/scale")
        (q,) = self.node("Transpose", [q], f"{name}/q_columns", perm=[0, 1, 3, 2])  # (B, Hkv, d, G)
        (scores,) = self.node("MatMul", [keys, q], f"{name}/scores")  # (B, Hkv, L, G)
        (scores,) = self.node("Add", [scores, step.mask], f"{name}/masked")
        (probs,) = self.node("Softmax", [scores], f"{name}/softmax", axis=2)
        (probs,) = self.node("Transpose", [probs], f"{name}/probs_rows", perm=[0, 1, 3, 2])  # (B, Hkv, G, L)
        (probs,) = self.node("Unsqueeze", [probs, step.axis3], f"{name}/probs_1xL")  # (B, Hkv, G, 1, L)
        (vals,) = self.node("Unsqueeze", [values, step.axis2], f"{name}/values_shared")  # (B, Hkv, 1, L, d)
        (context,) = self.node("MatMul", [probs, vals], f"{name}/context")  # (B, Hkv, G, 1, d)
        (out,) = self.node("Reshape", [context, step.merged_heads], f"{name}/merge")  # (B, 1, H d)
        return out, keys, values

    def decode_step(self) -> DecodeStep:
        """What every layer's decode branch shares, computed once per step from the graph's inputs:
        whether this is a batched decode step (S = 1, B > 1; batch 1 stays with GroupQueryAttention,
        where the branch's extra nodes cost what its products save), each row's write position (its
        length before the step: seqlens_k + 1 - S), its rotary position (B, 1), and the mask (B, 1, L, 1)
        of the buffer positions after it. Cheap for prefill too (B x L), where only the first is used."""
        s, c = self.shape, self.constant
        group = s.heads // s.kv_heads
        one, zero, tokens, rows = self.step_sizes()
        (single,) = self.node("Equal", [tokens, one], "step/one_token")
        (several,) = self.node("Greater", [rows, one], "step/several_rows")
        (batched,) = self.node("And", [single, several], "step/batched_decode")
        (after,) = self.node("Cast", ["seqlens_k"], "step/after", to=TensorProto.INT64)  # valid after the step - 1
        (after,) = self.node("Add", [after, one], "step/lengths_after")
        (write_at,) = self.node("Sub", [after, tokens], "step/write_at")  # (B,)
        axis1 = c("step.axis1", np.array([1], np.int64))
        (positions,) = self.node("Unsqueeze", [write_at, axis1], "step/positions")  # (B, 1)
        (cache_shape,) = self.node("Shape", ["past_key_values.0.key"], "step/cache_shape")
        (length,) = self.node("Gather", [cache_shape, c("step.two", np.array(2, np.int64))], "step/length", axis=0)
        (buffer_positions,) = self.node("Range", [zero, length, one], "step/buffer_positions")  # (L,)
        (buffer_positions,) = self.node("Unsqueeze", [buffer_positions, axis1], "step/buffer_column")  # (L, 1)
        (last,) = self.node("Unsqueeze", [write_at, c("step.axes123", np.array([1, 2, 3], np.int64))],
                            "step/last_position")  # (B, 1, 1, 1)
        (visible,) = self.node("LessOrEqual", [buffer_positions, last], "step/visible")  # (B, 1, L, 1)
        lowest = np.array(np.finfo(self.options.dtype).min, self.options.dtype)
        (mask,) = self.node("Where", [visible, c("step.visible", np.array(0, self.options.dtype)),
                                      c("step.hidden", lowest)], "step/mask")
        return DecodeStep(
            batched_decode=batched, write_at=write_at, positions=positions, mask=mask,
            scale=c("step.scale", np.array(1.0 / math.sqrt(s.head_dim), self.options.dtype)),
            qkv_widths=c("step.qkv_widths", np.array([s.heads * s.head_dim, s.kv_heads * s.head_dim,
                                                       s.kv_heads * s.head_dim], np.int64)),
            query_groups=c("step.query_groups", np.array([0, s.kv_heads, group, s.head_dim], np.int64)),
            kv_heads=c("step.kv_heads", np.array([0, s.kv_heads, 1, s.head_dim], np.int64)),
            merged_heads=c("step.merged_heads", np.array([0, 1, s.heads * s.head_dim], np.int64)),
            axis2=c("step.axis2", np.array([2], np.int64)), axis3=c("step.axis3", np.array([3], np.int64)))

    def step_sizes(self) -> tuple[str, str, str, str]:
        """The int64 constants 1 and 0, and this step's S and B (from input_ids' shape)."""
        one = self.constant("step.one", np.array(1, np.int64))
        zero = self.constant("step.zero", np.array(0, np.int64))
        (ids_shape,) = self.node("Shape", ["input_ids"], "step/ids_shape")
        (tokens,) = self.node("Gather", [ids_shape, one], "step/tokens", axis=0)  # S
        (rows,) = self.node("Gather", [ids_shape, zero], "step/rows", axis=0)  # B
        return one, zero, tokens, rows

    def first_chunk_condition(self) -> None:
        """`step/first_chunk`: one row, several tokens, nothing cached before them (a prompt's first
        chunk); and the constants the int8 rounding uses."""
        self.constant("step.unit_scale", np.array(1.0, np.float32))
        self.constant("step.int8_zero", np.array(0, np.int8))
        one, zero, tokens, rows = self.step_sizes()
        (first_length,) = self.node("Gather", ["seqlens_k", zero], "step/first_row_seqlen", axis=0)
        (after,) = self.node("Cast", [first_length], "step/first_row_after", to=TensorProto.INT64)
        (after,) = self.node("Add", [after, one], "step/first_row_length")  # valid after this step
        (from_start,) = self.node("Equal", [after, tokens], "step/from_start")
        (several,) = self.node("Greater", [tokens, one], "step/several_tokens")
        (alone,) = self.node("Equal", [rows, one], "step/one_row")
        (both,) = self.node("And", [from_start, several], "step/chunk_from_start")
        self.node("And", [both, alone], "step/first_chunk_cond")
        self.nodes[-1].output[0] = "step/first_chunk"

    def mlp(self, x: str, layer: int) -> str:
        """down(silu(gate(x)) * up(x)), with gate and up as one matmul: one pass over x (and, on the CPU,
        one int8 quantization of it) instead of two; its (B, S, 2I) output is split in halves."""
        width = self.shape.intermediate
        both = self.linear(x, gate_up_names(layer), f"layers.{layer}.gate_up_proj")  # (B, S, 2I)
        halves = self.constant(f"layers.{layer}.gate_up_split", np.array([width, width], dtype=np.int64))
        gate, up = self.node("Split", [both, halves], f"layers.{layer}.gate_up_split", outputs=2, axis=-1)
        (sig,) = self.node("Sigmoid", [gate], f"layers.{layer}.silu/sigmoid")
        (silu,) = self.node("Mul", [gate, sig], f"layers.{layer}.silu")
        (gated,) = self.node("Mul", [silu, up], f"layers.{layer}.gated")
        return self.linear(gated, down_names(layer), f"layers.{layer}.down_proj")

    def lm_head(self, residual: str) -> str:
        """The positions `last_position` names (a scalar -1: the last of each row) → final norm → logits
        (B, V) float32; k positions (1-D: a prompt being scored) give (B x k, V)."""
        (picked,) = self.node("Gather", [residual, LOGIT_POSITIONS], "last_position_hidden",
                              axis=1)  # (B, H), or (B, k, H)
        rows_shape = self.constant("logit_rows_shape", np.array([-1, self.shape.hidden], dtype=np.int64))
        (rows,) = self.node("Reshape", [picked, rows_shape], "logit_rows")  # (B, H) or (B x k, H)
        normed = self.rms_norm(rows, "model.norm.weight", "final_norm")
        logits = self.linear(normed, head_names(self.shape), "lm_head")  # (B, V)
        if self.options.dtype != np.float32:
            (logits,) = self.node("Cast", [logits], "logits/float32", to=TensorProto.FLOAT)
        (out,) = self.node("Identity", [logits], "logits")
        self.nodes[-1].output[0] = "logits"
        return out

    def decoder(self, on_layer: Callable[[int], None]) -> None:
        cos, sin = (self.stored(n, c.astype(self.options.dtype)) for n, c in zip(("cos_cache", "sin_cache"),
                                                                                 self.shape.rotary_caches()))
        step = self.decode_step() if self.options.decode_by_matmul else None
        if self.kv_scales is not None:
            self.first_chunk_condition()
        x = self.embedding("input_ids")
        normed = self.rms_norm(x, "model.layers.0.input_layernorm.weight", "layers.0.input_norm")
        for layer in range(self.shape.layers):
            attn = self.attention(normed, layer, cos, sin, step)
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
        s = self.shape
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                  helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
                  helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
                  # which positions get logits: -1 (a scalar), or k positions (1-D); any rank, so no shape
                  helper.make_tensor_value_info(LOGIT_POSITIONS, TensorProto.INT64, None)]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", s.vocab])]
        cache = ["batch", s.kv_heads, "max_length", s.head_dim]
        for i in range(s.layers):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", self.cache_type, cache))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", self.cache_type, cache))
        graph = helper.make_graph(self.nodes, "dsnode-decoder", inputs, outputs, self.initializers)
        return helper.make_model(graph, producer_name="dsnode", ir_version=10 if self.options.opset <= 21 else 12,
                                 opset_imports=[helper.make_opsetid("", self.options.opset),
                                                helper.make_opsetid("com.microsoft", 1)])


def qkv_names(layer: int) -> tuple[str, ...]:
    return tuple(f"model.layers.{layer}.self_attn.{p}_proj.weight" for p in ("q", "k", "v"))


def o_names(layer: int) -> tuple[str, ...]:
    return (f"model.layers.{layer}.self_attn.o_proj.weight",)


def gate_up_names(layer: int) -> tuple[str, ...]:
    return tuple(f"model.layers.{layer}.mlp.{p}_proj.weight" for p in ("gate", "up"))


def down_names(layer: int) -> tuple[str, ...]:
    return (f"model.layers.{layer}.mlp.down_proj.weight",)


def head_names(shape: ModelShape) -> tuple[str, ...]:
    return ("model.embed_tokens.weight" if shape.tied_embeddings else "lm_head.weight",)


def linear_order(shape: ModelShape) -> list[tuple[str, ...]]:
    """The linear weights in the order the builder writes them: per layer q/k/v, o, gate/up, down; the
    LM head last."""
    per_layer = (qkv_names, o_names, gate_up_names, down_names)
    return [names(layer) for layer in range(shape.layers) for names in per_layer] + [head_names(shape)]


def prepare_linear(checkpoint: Checkpoint, hf_names: tuple[str, ...], options: BuildOptions) -> LinearWeight:
    """Linear weights (out, in) of one input, transposed side by side into the (in, sum of outs) float32
    operand of a MatMul, then quantized when the blocks divide its input size (thread-safe: each read
    opens its file)."""
    weight = matmul_weight(checkpoint, hf_names)
    k = weight.shape[0]
    bits = BITS.get(options.quant)
    if bits and fits_blocks(k, options.block_size):
        return LinearWeight(blocks=quantize_weight(weight, bits, options.block_size, options.symmetric))
    why = f"K={k} is not a multiple of the block size {options.block_size}" if bits else ""
    return LinearWeight(matrix=weight.astype(options.dtype, copy=False), why_float=why)


def matmul_weight(checkpoint: Checkpoint, hf_names: tuple[str, ...]) -> np.ndarray:
    """The weights read one at a time and written transposed side by side: C-contiguous (K, N) float32,
    as the quantizer reads it."""
    shapes = [checkpoint.shape(name) for name in hf_names]
    out = np.empty((shapes[0][1], sum(rows for rows, _ in shapes)), np.float32)
    start = 0
    for name, (rows, _) in zip(hf_names, shapes):
        checkpoint.read_transposed(name, out[:, start:start + rows])
        start += rows
    return out


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
        if shape.qk_norm:
            names += [f"{prefix}.self_attn.{p}_norm.weight" for p in ("q", "k")]
    return names


def build_decoder(src: Path, shape: ModelShape, options: BuildOptions, target: Path,
                  on_layer: Callable[[int], None] = lambda layer: None, kv_scales: KVScales | None = None) -> BuildReport:
    """Write `target` (the graph) and `target.data` (its weights) from the checkpoint in `src`; an int8
    cache (`options.kv_cache`) with the per-channel `kv_scales`."""
    checkpoint = Checkpoint(src)
    weights = WeightFile(target.with_name(target.name + DATA_SUFFIX))
    try:
        linear_weights = WeightPipeline(linear_order(shape), lambda names: prepare_linear(checkpoint, names, options),
                                        options.threads)
        try:
            builder = DecoderBuilder(checkpoint, shape, options, weights, linear_weights, kv_scales)
            builder.decoder(on_layer)
            model = builder.model()
        finally:
            linear_weights.close()
    finally:
        weights.close()
        checkpoint.close()
    onnx.save_model(model, str(target))
    return builder.report
