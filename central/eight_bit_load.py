"""A rank's linears and routed experts as 8-bit weights, converted as each tensor is read.

`to_eight_bit` swaps, on the meta model, every linear of the decoder layers (attention, dense MLPs,
shared experts; not the routers, the embeddings or the head) and the fused routed experts for the
modules of `dsnode.central.eight_bit`: `Fp8*` where the weights stay FP8 (`weights = "fp8"`, an FP8
checkpoint on a GPU that computes in FP8), `Int8*` otherwise. `module_reads` then fills them from the
checkpoint: FP8 bits copied as they are, or any source (FP8 blocks × their scales, BF16, F32) turned
into int8 rows `CHUNK_ROWS` at a time. So the only wider copy a rank ever holds is one chunk of one
tensor (128 rows × K float32: 3.7 MB for DeepSeek-R1's widest), never its shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .checkpoint import FP8, SCALE_SUFFIX, Checkpoint, CheckpointError
from .eight_bit import (
    BLOCK,
    EIGHT_BIT,
    Fp8Experts,
    Fp8Linear,
    Int8Experts,
    Int8Linear,
    blocks,
    dequantize_fp8,
    quantize_rows,
)
from .expert_parallel import ReplicatedLinear

CHUNK_ROWS = BLOCK  # one FP8 block row: its scales apply to whole chunks
ROUTERS = ("gate", "shared_expert_gate")  # tiny, and they pick the experts: kept in their dtype

ModuleRead = Callable[[Checkpoint, dict[str, torch.Tensor]], None]  # fills an 8-bit module's tensors


@dataclass(frozen=True)
class ExpertKeys:
    """Checkpoint names of one fused expert weight, for every expert of the layer: per expert
    (`parts[e]`: (gate, up) or (down,)) or one fused tensor (`fused`, rows = experts)."""

    parts: list[tuple[str, ...]] | None = None
    fused: str | None = None


# --- the modules ----------------------------------------------------------------------------------------
def to_eight_bit(model: nn.Module, checkpoint: Checkpoint, names: dict[str, str], weights: str) -> int:
    """Swap the meta model's linears and fused experts for 8-bit modules; returns how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if ".layers." not in f".{name}." or isinstance(module, EIGHT_BIT):
            continue
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}"
            if isinstance(child, (nn.Linear, ReplicatedLinear)) and child_name not in ROUTERS:
                fp8 = weights == "fp8" and _stored_fp8(checkpoint, names, f"{full}.weight")
                kind = Fp8Linear if fp8 else Int8Linear
                setattr(module, child_name, kind(child.in_features, child.out_features, child.bias))
                swapped += 1
            elif child_name == "experts" and _fused(child):
                fp8 = weights == "fp8" and _experts_fp8(checkpoint, names, full)
                setattr(module, child_name, (Fp8Experts if fp8 else Int8Experts)(child))
                swapped += 1
    return swapped


def _fused(experts: nn.Module) -> bool:
    weights = [getattr(experts, n, None) for n in ("gate_up_proj", "down_proj")]
    return all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in weights)


def _stored_fp8(checkpoint: Checkpoint, names: dict[str, str], model_name: str) -> bool:
    key = names.get(model_name)
    return key is not None and checkpoint.entries[key].dtype == FP8


def _experts_fp8(checkpoint: Checkpoint, names: dict[str, str], prefix: str) -> bool:
    """Whether this layer's experts are stored FP8 (expert 0's first weight says for all)."""
    first = [key for model_name, key in names.items() if model_name.startswith(f"{prefix}.0.")]
    weights = [k for k in first if not k.endswith(SCALE_SUFFIX)]
    return bool(weights) and all(checkpoint.entries[k].dtype == FP8 for k in weights)


# --- what to read -----------------------------------------------------------------------------------------
def module_reads(model: nn.Module, names: dict[str, str], experts: range,
                 expert_keys: Callable[[str, str], ExpertKeys]) -> dict[str, ModuleRead]:
    """Module name → how to fill its 8-bit tensors; `experts` are this rank's (global ids)."""
    reads: dict[str, ModuleRead] = {}
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Fp8Linear)):
            key = names.get(f"{name}.weight")
            if key is None:
                raise CheckpointError(f"no tensor {name + '.weight'!r} in the checkpoint")
            reads[name] = _linear_read(module, key)
        elif isinstance(module, (Int8Experts, Fp8Experts)):
            gate_up, down = expert_keys(name, "gate_up_proj"), expert_keys(name, "down_proj")
            reads[name] = _experts_read(module, experts, gate_up, down)
    return reads


def _linear_read(module: nn.Module, key: str) -> ModuleRead:
    if isinstance(module, Fp8Linear):
        return lambda ck, t: copy_fp8(ck, key, t["weight"], t["weight_scale_inv"])
    return lambda ck, t: to_int8(ck, key, t["weight"], t["weight_scale"])


def _experts_read(module: nn.Module, experts: range, gate_up: ExpertKeys, down: ExpertKeys) -> ModuleRead:
    def read(checkpoint: Checkpoint, t: dict[str, torch.Tensor]) -> None:
        for i, expert in enumerate(experts):
            if isinstance(module, Fp8Experts):
                _fp8_expert(checkpoint, module, t, i, _parts(gate_up, expert), _parts(down, expert))
            else:
                _int8_expert(checkpoint, t, i, expert, gate_up, down)

    return read


def _parts(keys: ExpertKeys, expert: int) -> tuple[str, ...]:
    if keys.parts is None:
        raise CheckpointError(f"{keys.fused!r}: fused expert tensors cannot be kept in FP8 (no block scales)")
    return keys.parts[expert]


def _int8_expert(checkpoint: Checkpoint, t: dict[str, torch.Tensor], i: int, expert: int,
                 gate_up: ExpertKeys, down: ExpertKeys) -> None:
    half = t["gate_up_proj"].shape[1] // 2  # I
    for keys, weight, scale in ((gate_up, t["gate_up_proj"][i], t["gate_up_proj_scale"][i]),
                                (down, t["down_proj"][i], t["down_proj_scale"][i])):
        if keys.fused is not None:
            fused_to_int8(checkpoint, keys.fused, expert, weight, scale)
        elif len(keys.parts[expert]) == 2:  # type: ignore[index]
            gate, up = keys.parts[expert]  # type: ignore[index]
            to_int8(checkpoint, gate, weight[:half], scale[:half])
            to_int8(checkpoint, up, weight[half:], scale[half:])
        else:
            to_int8(checkpoint, keys.parts[expert][0], weight, scale)  # type: ignore[index]


def _fp8_expert(checkpoint: Checkpoint, module: Fp8Experts, t: dict[str, torch.Tensor], i: int,
                gate_up: tuple[str, ...], down: tuple[str, ...]) -> None:
    size, hidden = module.intermediate, module.hidden
    pad = t["gate_up_proj"].shape[1] // 2  # Ip: gate rows 0..I, up rows Ip..Ip+I
    bits, scale = t["gate_up_proj"][i], t["gate_up_proj_scale_inv"][i]
    copy_fp8(checkpoint, gate_up[0], bits[:size, :hidden], scale[: blocks(size)])
    copy_fp8(checkpoint, gate_up[1], bits[pad:pad + size, :hidden],
             scale[pad // BLOCK: pad // BLOCK + blocks(size)])
    copy_fp8(checkpoint, down[0], t["down_proj"][i][:hidden, :size],
             t["down_proj_scale_inv"][i][: blocks(hidden)])


# --- reading ------------------------------------------------------------------------------------------------
def to_int8(checkpoint: Checkpoint, key: str, weight: torch.Tensor, scale: torch.Tensor) -> None:
    """Tensor `key` (n, K) — FP8 with block scales, or any float — into int8 `weight` (n, K) and
    per-row `scale` (n,), CHUNK_ROWS rows at a time."""
    entry = checkpoint.entry(key)
    if tuple(entry.shape) != tuple(weight.shape):
        raise CheckpointError(f"{entry.file}: tensor {key!r} has shape {list(entry.shape)}; "
                              f"the model's config.json wants {list(weight.shape)}")
    scale_inv = _scales(checkpoint, key) if entry.dtype == FP8 else None
    for start in range(0, entry.shape[0], CHUNK_ROWS):
        rows = range(start, min(entry.shape[0], start + CHUNK_ROWS))
        quantized, row_scale = quantize_rows(_float_rows(checkpoint, key, rows, scale_inv))
        weight[rows.start:rows.stop] = quantized
        scale[rows.start:rows.stop] = row_scale


def fused_to_int8(checkpoint: Checkpoint, key: str, expert: int, weight: torch.Tensor,
                  scale: torch.Tensor) -> None:
    """One expert of a fused float tensor (E, n, K) into int8 (n, K): one expert's floats at a time."""
    whole = torch.empty((1, *weight.shape), dtype=torch.float32)
    checkpoint.read_into(key, whole, rows=range(expert, expert + 1))
    quantized, row_scale = quantize_rows(whole[0])
    weight.copy_(quantized)
    scale.copy_(row_scale)


def copy_fp8(checkpoint: Checkpoint, key: str, bits: torch.Tensor, scale_inv: torch.Tensor) -> None:
    """FP8 tensor `key` (n, K) as it is into `bits` (the top-left (n, K) of a padded uint8 buffer),
    and its block scales into the top-left of `scale_inv`."""
    entry = checkpoint.entry(key)
    if entry.dtype != FP8:
        raise CheckpointError(f"{entry.file}: tensor {key!r} is {entry.dtype}, not {FP8}: "
                              "cannot keep it in FP8")
    rows, cols = entry.shape
    for start in range(0, rows, CHUNK_ROWS):
        span = range(start, min(rows, start + CHUNK_ROWS))
        chunk = torch.empty((len(span), cols), dtype=torch.float8_e4m3fn)
        checkpoint.read_into(key, chunk, rows=span)
        bits[span.start:span.stop, :cols] = chunk.view(torch.uint8)
    scales = _scales(checkpoint, key)
    scale_inv[: scales.shape[0], : scales.shape[1]] = scales


def _scales(checkpoint: Checkpoint, key: str) -> torch.Tensor:
    entry = checkpoint.entry(key + SCALE_SUFFIX)
    scales = torch.empty(entry.shape, dtype=torch.float32)
    checkpoint.read_into(entry.name, scales)
    return scales


def _float_rows(checkpoint: Checkpoint, key: str, rows: range,
                scale_inv: torch.Tensor | None) -> torch.Tensor:
    """Rows of tensor `key` as float32 (len(rows), K), FP8 blocks multiplied by their scales."""
    cols = checkpoint.entry(key).shape[1]
    if scale_inv is None:
        out = torch.empty((len(rows), cols), dtype=torch.float32)
        checkpoint.read_into(key, out, rows=rows)
        return out
    bits = torch.empty((len(rows), cols), dtype=torch.float8_e4m3fn)
    checkpoint.read_into(key, bits, rows=rows)
    first = rows.start // BLOCK
    return dequantize_fp8(bits, scale_inv[first: first + blocks(len(rows))])
