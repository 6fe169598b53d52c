"""Expert parallelism for the `deepspeed` backend: each rank holds a contiguous range of every MoE
layer's routed experts, and one all-reduce per MoE layer sums the ranks' outputs.

The scheme is transformers 5's `AllReduceEP` (every rank sees the whole batch; routes to experts of
other ranks get weight 0 and a sentinel index the experts' forward skips), written here on plain
tensors because transformers' own plan does not survive DeepSpeed: its DTensor-sharded layers are
re-wrapped by AutoTP and the first forward fails ("aten.mm.default got mixed torch.Tensor and
DTensor"; docs/central.md, "Expert parallelism"), and it refuses expert counts the ranks do not
divide. Here ranges may differ by one expert (`dsnode.sizing.spread_experts`).

The router (float32 where transformers keeps it so), its correction bias and the shared experts
stay whole on every rank: their `nn.Linear`s become `ReplicatedLinear`, which AutoTP (it shards only
`nn.Linear`) leaves alone, so the MoE block needs no collective but the experts' all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class MoeLayout:
    """Where an architecture keeps its MoE parts, in transformers 5 and in Hugging Face checkpoints."""

    model_type: str
    replicated: tuple[str, ...]  # children of the MoE block kept whole on every rank (besides the router)
    expert_weights: tuple[str, str, str]  # per-expert checkpoint names of gate, up, down
    renames: tuple[tuple[str, str], ...] = ()  # checkpoint key part → model key part


MOE_LAYOUTS = {
    "deepseek_v3": MoeLayout("deepseek_v3", ("shared_experts",), ("gate_proj", "up_proj", "down_proj")),
    "qwen2_moe": MoeLayout("qwen2_moe", ("shared_expert", "shared_expert_gate"),
                           ("gate_proj", "up_proj", "down_proj")),
    "mixtral": MoeLayout("mixtral", (), ("w1", "w3", "w2"), renames=((".block_sparse_moe.", ".mlp."),)),
}
DENSE_TYPES = ("llama", "mistral", "qwen2")  # no experts: the shard loader reads them 1:1


class ShardingError(Exception):
    """A model this rank cannot shard as configured; the message says why."""


class ReplicatedLinear(nn.Module):
    """`nn.Linear` under another type: AutoTP replaces `nn.Linear` only, so this one stays whole on
    every rank. Same parameter names, so checkpoints load into it unchanged."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def replicate_linears(module: nn.Module) -> None:
    """Make every `nn.Linear` under `module` (or `module` itself, via its parent) a ReplicatedLinear."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, ReplicatedLinear(child))
        else:
            replicate_linears(child)


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every MoE block: a module whose `experts` child holds fused 3-D weights."""
    found = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, nn.Module) and _fused_experts(experts):
            found.append((name, module))
    return found


def _fused_experts(experts: nn.Module) -> bool:
    weights = [getattr(experts, n, None) for n in ("gate_up_proj", "down_proj")]
    return all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in weights)


def keep_shared_parts_whole(block: nn.Module, layout: MoeLayout) -> None:
    for child_name in layout.replicated:
        child = getattr(block, child_name)
        if isinstance(child, nn.Linear):
            setattr(block, child_name, ReplicatedLinear(child))
        else:
            replicate_linears(child)


def shrink_experts(experts: nn.Module, held: range) -> None:
    """Give the (meta) expert weights this rank's expert count along dim 0."""
    for name in ("gate_up_proj", "down_proj"):
        full = getattr(experts, name)
        local = torch.empty((len(held), *full.shape[1:]), dtype=full.dtype, device=full.device)
        setattr(experts, name, nn.Parameter(local, requires_grad=False))
    experts.num_experts = len(held)
    experts._is_expert_parallel = True  # transformers' grouped_mm/batched_mm paths then skip sentinels


def install_expert_parallel(experts: nn.Module, held: range, all_reduce: Callable[[torch.Tensor], Any]
                            ) -> None:
    """Route each token's experts to this rank's range, then sum the ranks with one all-reduce."""
    local_forward = experts.forward
    first, count = held.start, len(held)

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        # hidden_states (T, H); top_k_index, top_k_weights (T, k), global expert ids
        local_index = top_k_index - first
        elsewhere = (local_index < 0) | (local_index >= count)
        local_index = torch.where(elsewhere, count, local_index)  # `count`: the sentinel experts skip
        out = local_forward(hidden_states, local_index, top_k_weights.masked_fill(elsewhere, 0.0))  # (T, H)
        all_reduce(out)  # in place: the sum of every rank's experts
        return out

    experts.forward = forward


def deepspeed_all_reduce(tensor: torch.Tensor) -> Any:
    """The all-reduce DeepSpeed's own AutoTP layers use (its shared-memory op where it has one)."""
    import deepspeed.comm as dist

    return dist.inference_all_reduce(tensor)


# --- weights by kind, as this rank holds them -------------------------------------------------------
def weight_kind(name: str, tensor: torch.Tensor) -> str:
    """The `dsnode.sizing.KINDS` kind of a parameter, from its name (transformers 5 naming)."""
    if ".experts." in name:  # the fused weights (E, ., .), and their 8-bit scales
        return "routed_experts"
    if ".shared_expert" in name:
        return "shared_experts"
    if ".mlp.gate." in name:
        return "router"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings_head"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "dense_mlp"
    return "norms"


def bytes_by_kind(model: nn.Module) -> dict[str, int]:
    totals: dict[str, int] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        # 8-bit weights (dsnode.central.eight_bit) count too
        weights = tensor.is_floating_point() or tensor.dtype in (torch.int8, torch.uint8)
        if weights and not _non_persistent(model, name):
            kind = weight_kind(name, tensor)
            totals[kind] = totals.get(kind, 0) + tensor.numel() * tensor.element_size()
    return totals


def _non_persistent(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return leaf in getattr(module, "_non_persistent_buffers_set", ())
