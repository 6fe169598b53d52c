"""What each generated token makes the ranks of the `deepspeed` backend exchange, and how much of it
crosses the links between hosts: `dsnode plan --hosts` (`dsnode.ops.plan`). Pure arithmetic from the
model's shape (`dsnode.sizing.model_shape`) and the weight format, like the sizing itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .sizing import ModelShape, WeightFormat

ACTIVATION_BYTES = 2  # bf16 activations on GPUs, whatever the weight format (W8A16 and FP8 both)


@dataclass(frozen=True)
class Traffic:
    """What one generated token makes the ranks exchange in one step, and how much of it crosses
    hosts. Ring all-reduce with a host's ranks adjacent: each of the `hosts` links between hosts
    carries 2(N−1)/N of every all-reduce, each way (NCCL's bus-bandwidth model)."""

    ranks: int
    hosts: int
    per_layer: int  # bytes of one all-reduce for one token: the hidden state
    all_reduces: dict[str, int]  # per token: "attention" / "dense_mlp" / "moe" → how many
    head: int  # bytes of the head's all-reduce (the logits) per token; 0 when the head is whole

    @property
    def per_token(self) -> int:
        return sum(self.all_reduces.values()) * self.per_layer + self.head

    @property
    def per_host_link(self) -> int:
        """Bytes per token each link between hosts carries, each way; 0 on one host."""
        if self.hosts < 2:
            return 0
        return math.ceil(self.per_token * 2 * (self.ranks - 1) / self.ranks)


def traffic(shape: ModelShape, ranks: int, hosts: int, fmt: WeightFormat) -> Traffic:
    """The all-reduces of the `deepspeed` backend's layout: one per MoE layer (the experts of every
    rank summed); with 16/32-bit weights AutoTP adds one per attention block (o_proj), one per dense
    MLP (down_proj) and the head's logits; 8-bit linears are whole on every rank and add none."""
    counts: dict[str, int] = {}
    if ranks > 1 and fmt.split_linears:
        counts["attention"] = shape.layers
        counts["dense_mlp"] = shape.layers - shape.moe_layers
    if ranks > 1 and shape.routed_experts:
        counts["moe"] = shape.moe_layers
    head = shape.vocab_size * ACTIVATION_BYTES if ranks > 1 and fmt.split_linears else 0
    counts = {kind: n for kind, n in counts.items() if n}
    return Traffic(ranks, hosts, shape.hidden_size * ACTIVATION_BYTES, counts, head)
