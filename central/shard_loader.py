"""Build a model on the meta device and read from the checkpoint only what this rank keeps.

A rank's weights: its range of every MoE layer's routed experts (read expert by expert, or as rows
of a fused tensor, straight into the rank's buffers) and everything else whole (DeepSpeed AutoTP
then keeps its slice of attention, the dense MLPs and the head, and frees the rest). Peak host
memory while loading is therefore this rank's experts plus the model's non-expert weights, not the
model: for DeepSeek-R1 on 16 ranks, 41B + 17B parameters instead of 671B.

Names: the model's parameters (transformers 5: fused `mlp.experts.gate_up_proj` (E, 2I, H) and
`mlp.experts.down_proj` (E, H, I)) are found in the checkpoint as they are, or per expert in the
Hugging Face layout (`mlp.experts.{e}.gate_proj.weight` (I, H), ...; Mixtral: `block_sparse_moe`,
`w1`/`w3`/`w2`), as transformers' own conversion mapping reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from dsnode.sizing import spread_experts
from torch import nn

from .checkpoint import FP8, Checkpoint, CheckpointError
from .eight_bit import EIGHT_BIT, eight_bit_tensors
from .eight_bit_load import ExpertKeys, ModuleRead, module_reads, to_eight_bit
from .expert_parallel import (
    DENSE_TYPES,
    MOE_LAYOUTS,
    MoeLayout,
    ShardingError,
    install_expert_parallel,
    keep_shared_parts_whole,
    moe_blocks,
    shrink_experts,
)

Read = Callable[[Checkpoint, torch.Tensor], None]  # fills one tensor of the model from the checkpoint


@dataclass(frozen=True)
class RankShard:
    rank: int
    ranks: int
    experts: range  # this rank's routed experts (the same range in every MoE layer)
    routed_experts: int  # per MoE layer, all ranks


@dataclass
class EmptyShard:
    """A rank's model before its weights are read: parameters on the meta device, experts shrunk."""

    model: nn.Module
    shard: RankShard
    layout: MoeLayout | None
    folder: Path
    dtype: torch.dtype


def empty_shard(folder: Path, dtype: torch.dtype, rank: int, ranks: int,
                all_reduce: Callable[[torch.Tensor], Any], weights: str = "model") -> EmptyShard:
    """This rank's model without weights: what `read_shard` fills. Costs the model code's imports
    (about 100 MB of resident memory for transformers' modeling modules), not the weights.
    `weights`: "model" (the model dtype), "int8" or "fp8" (`dsnode.central.eight_bit_load`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    layout = _layout(config)
    model = _empty_model(AutoModelForCausalLM, config, dtype)
    blocks = moe_blocks(model)
    experts = blocks[0][1].experts.num_experts if blocks else 0
    if blocks and ranks > experts:
        raise ShardingError(f"tensor_parallel = {ranks} is more than the {experts} routed experts per layer: "
                            "a rank would hold none")
    shard = RankShard(rank, ranks, spread_experts(experts, ranks)[rank] if experts else range(0), experts)
    for _, block in blocks:
        assert layout is not None  # _layout refused MoE types it does not know
        keep_shared_parts_whole(block, layout)
        if ranks > 1:
            shrink_experts(block.experts, shard.experts)
    if weights != "model":  # after shrinking (8-bit experts take the rank's count), before routing
        with Checkpoint.open(Path(folder)) as checkpoint:
            to_eight_bit(model, checkpoint, _checkpoint_names(checkpoint, layout), weights)
    if ranks > 1:
        for _, block in blocks:
            install_expert_parallel(block.experts, shard.experts, all_reduce)
    return EmptyShard(model, shard, layout, Path(folder), dtype)


def read_shard(empty: EmptyShard) -> nn.Module:
    """Fill the model from the checkpoint: on the CPU, in the model dtype (float32 where transformers
    keeps it so). Every name is checked before any byte is read."""
    model = empty.model
    with Checkpoint.open(empty.folder) as checkpoint:
        reads = _plan_reads(model, checkpoint, empty.layout, empty.shard)
        names = _checkpoint_names(checkpoint, empty.layout)
        layout, shard = empty.layout, empty.shard
        eight_bit = module_reads(model, names, shard.experts,
                                 lambda prefix, part: expert_keys(prefix, part, names, layout, shard))
        _materialize(model, reads, checkpoint, _fp32_names(model, empty.dtype), empty.dtype)
        _materialize_eight_bit(model, eight_bit, checkpoint)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def _layout(config: Any) -> MoeLayout | None:
    model_type = getattr(config, "model_type", None)
    if model_type in MOE_LAYOUTS:
        return MOE_LAYOUTS[model_type]
    if model_type in DENSE_TYPES:
        return None
    supported = ", ".join([*MOE_LAYOUTS, *DENSE_TYPES])
    raise ShardingError(f"config.json: model_type {model_type!r} is not supported by the deepspeed backend's "
                        f"shard loader (supported: {supported})")


def _empty_model(auto_class: Any, config: Any, dtype: torch.dtype) -> nn.Module:
    """Parameters on the meta device (no memory), buffers real: rotary tables are computed, not read."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return auto_class.from_config(config, dtype=dtype)


def _fp32_names(model: nn.Module, dtype: torch.dtype) -> tuple[str, ...]:
    """Name parts transformers keeps in float32 at this dtype (DeepSeek-V3: the router)."""
    names = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return tuple(names) if dtype in (torch.float16, torch.bfloat16) else ()


# --- what to read ---------------------------------------------------------------------------------
def _plan_reads(model: nn.Module, checkpoint: Checkpoint, layout: MoeLayout | None, shard: RankShard
                ) -> dict[str, Read]:
    names = _checkpoint_names(checkpoint, layout)
    tied = _tied_targets(model)
    eight_bit = _eight_bit_names(model)  # filled by their module's read (dsnode.central.eight_bit_load)
    reads: dict[str, Read] = {}
    for name, tensor in _loadable(model):
        if name in eight_bit:
            continue
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")) and tensor.dim() == 3:
            reads[name] = _expert_read(name, names, layout, shard)
        elif name in names:
            reads[name] = _whole_read(names[name], checkpoint)
        elif name not in tied:
            raise CheckpointError(f"{checkpoint.source}: no tensor {name!r} in the checkpoint")
    return reads


def _checkpoint_names(checkpoint: Checkpoint, layout: MoeLayout | None) -> dict[str, str]:
    """Model-side name → checkpoint name, after the architecture's renames."""
    renames = layout.renames if layout else ()
    names = {}
    for key in checkpoint.entries:
        model_key = key
        for old, new in renames:
            model_key = model_key.replace(old, new)
        names[model_key] = key
    return names


def _tied_targets(model: nn.Module) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if isinstance(tied, dict) else set(tied)


def _loadable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers, each once."""
    found = list(model.named_parameters())
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf not in module._non_persistent_buffers_set:
            found.append((name, buffer))
    return found


def _eight_bit_names(model: nn.Module) -> set[str]:
    return {f"{name}.{leaf}" for name, module in model.named_modules() if isinstance(module, EIGHT_BIT)
            for leaf in eight_bit_tensors(module)}


def _whole_read(key: str, checkpoint: Checkpoint) -> Read:
    entry = checkpoint.entry(key)
    if entry.dtype == FP8:  # its values mean nothing without their block scales
        raise CheckpointError(f"{entry.file}: tensor {key!r} is {FP8}, but this module is kept in the "
                              "model dtype; dsnode reads FP8 weights of the decoder layers' linears and "
                              "experts only")
    return lambda checkpoint, out: checkpoint.read_into(key, out)


def expert_keys(prefix: str, part: str, names: dict[str, str], layout: MoeLayout | None, shard: RankShard
                ) -> ExpertKeys:
    """Checkpoint names of `prefix`.`part` (gate_up_proj or down_proj) for every expert of the layer
    (all of them named, not only this rank's: a missing one is an error on every rank)."""
    if f"{prefix}.{part}" in names:  # the checkpoint is fused too
        return ExpertKeys(fused=names[f"{prefix}.{part}"])
    if layout is None:
        raise ShardingError(f"{prefix}.{part}: fused experts in a model type without a known expert layout")
    gate, up, down = layout.expert_weights

    def key(expert: int, name: str) -> str:
        model_key = f"{prefix}.{expert}.{name}.weight"
        if model_key not in names:
            raise CheckpointError(f"no tensor for expert {expert} of {prefix} in the checkpoint "
                                  f"(looked for {model_key!r}, before renames)")
        return names[model_key]

    wanted = (gate, up) if part == "gate_up_proj" else (down,)
    return ExpertKeys(parts=[tuple(key(e, name) for name in wanted) for e in range(shard.routed_experts)])


def _expert_read(name: str, names: dict[str, str], layout: MoeLayout | None, shard: RankShard) -> Read:
    """This rank's experts of one fused weight: rows of a fused checkpoint tensor, or expert by expert."""
    prefix, part = name.rsplit(".", 1)  # model.layers.3.mlp.experts, gate_up_proj
    keys = expert_keys(prefix, part, names, layout, shard)
    if keys.fused is not None:
        fused, held = keys.fused, shard.experts
        return lambda checkpoint, out: checkpoint.read_into(fused, out, rows=held)
    parts = keys.parts
    assert parts is not None

    def read(checkpoint: Checkpoint, out: torch.Tensor) -> None:  # out (E_rank, 2I, H) or (E_rank, H, I)
        for i, expert in enumerate(shard.experts):
            pieces = parts[expert]
            rows = out.shape[1] // len(pieces)  # gate rows, then up rows
            for j, key in enumerate(pieces):
                checkpoint.read_into(key, out[i, j * rows:(j + 1) * rows])

    return read


# --- reading ----------------------------------------------------------------------------------------
def _materialize(model: nn.Module, reads: dict[str, Read], checkpoint: Checkpoint, fp32: tuple[str, ...],
                 dtype: torch.dtype) -> None:
    """Replace each meta tensor with a CPU one filled from the checkpoint, one tensor at a time."""
    for name, read in reads.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        current = getattr(module, leaf)
        want = torch.float32 if any(part in name for part in fp32) else (
            dtype if current.is_floating_point() else current.dtype)
        tensor = torch.empty(current.shape, dtype=want, device="cpu")
        read(checkpoint, tensor)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[leaf] = tensor


def _materialize_eight_bit(model: nn.Module, reads: dict[str, ModuleRead], checkpoint: Checkpoint) -> None:
    """Fill each 8-bit module's tensors (zeros first: FP8 buffers are padded to whole blocks)."""
    for name, read in reads.items():
        module = model.get_submodule(name)
        tensors = {leaf: torch.zeros(getattr(module, leaf).shape, dtype=getattr(module, leaf).dtype)
                   for leaf in eight_bit_tensors(module)}
        read(checkpoint, tensors)
        for leaf, tensor in tensors.items():
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
