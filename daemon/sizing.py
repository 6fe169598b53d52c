"""Memory per rank of a model, from its `config.json` alone: `dsnode plan`, and the check `dsnode serve`
runs before it loads a central model. Pure arithmetic: no torch, so an edge install can plan too.

What a rank holds is what the `deepspeed` backend builds (docs/central.md, "Expert parallelism"):
- routed experts spread over the ranks, whole experts, in contiguous ranges (`spread_experts`);
- the router, its correction bias, the shared experts, the embeddings, the norms and MLA's low-rank
  input projections (`q_a_proj`, `kv_a_proj_with_mqa`) whole on every rank;
- the rest of attention, the dense MLPs and the output head split by DeepSpeed AutoTP, ≈ 1/N each
  (AutoTP rounds shards to 64 rows; `ceil(n / N)` here) — with 16/32-bit weights. With 8-bit weights
  (FP8 blocks, or int8 W8A16: `dsnode.central.eight_bit`) AutoTP cannot split the 8-bit linears, so
  attention and the dense MLPs are whole on every rank too (one byte a weight); embeddings and head
  stay 16-bit and whole too (AutoTP does not run). Scales (4 bytes per int8 row, or per FP8 128 × 128 block:
  < 0.2% of DeepSeek-R1's bytes) are left out.
The KV cache of MLA is the compressed latent (kv_lora_rank + qk_rope_head_dim values per layer and
token), on every rank; multi-head attention caches K and V of the heads a rank holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .hfconfig import ModelFolderError

KINDS = ("attention", "dense_mlp", "shared_experts", "routed_experts", "router", "embeddings_head", "norms")
KIND_LABELS = {
    "attention": "attention",
    "dense_mlp": "dense MLP",
    "shared_experts": "shared experts",
    "routed_experts": "routed experts",
    "router": "router",
    "embeddings_head": "embeddings/head",
    "norms": "norms",
}
USABLE_FRACTION = 0.90  # of a GPU's memory (CUDA context, allocator slack, activations: the rest)
EXIT_DOES_NOT_FIT = 78  # EX_CONFIG; systemd/dsnode.service lists it in RestartPreventExitStatus=


class UnsupportedArchitecture(ModelFolderError):
    pass


class DoesNotFit(ModelFolderError):
    """A configuration whose weights and KV cache cannot fit; `dsnode serve` exits with `exit_code`."""

    exit_code = EXIT_DOES_NOT_FIT


@dataclass(frozen=True)
class Part:
    """Parameters of one kind: `whole` are on every rank, `split` are split over the ranks by AutoTP."""

    whole: int = 0
    split: int = 0

    def __add__(self, other: "Part") -> "Part":
        return Part(self.whole + other.whole, self.split + other.split)


@dataclass(frozen=True)
class ModelShape:
    """The parameter counts of a model by kind, and what its KV cache holds per token."""

    architecture: str
    model_type: str
    parts: dict[str, Part]  # every kind but routed_experts
    layers: int
    moe_layers: int
    routed_experts: int  # per MoE layer
    experts_per_token: int
    expert_params: int  # one routed expert of one layer
    kv_values_per_token: int  # all layers; MLA: the latent, else K and V of every KV head
    kv_heads: int  # 0 for MLA (its latent is not split by heads)
    router_fp32: bool  # transformers keeps the router in float32 (DeepSeek-V3)
    hidden_size: int = 0  # what one all-reduce per token carries (activations)
    vocab_size: int = 0  # the head's logits

    @property
    def routed_expert_params(self) -> int:
        return self.routed_experts * self.moe_layers * self.expert_params

    @property
    def total_params(self) -> int:
        return self.routed_expert_params + sum(p.whole + p.split for p in self.parts.values())


@dataclass(frozen=True)
class WeightFormat:
    """Bytes per parameter by kind, and per KV-cache value."""

    name: str
    matrix: float  # attention, MLPs, experts (and embeddings/head unless `head` says otherwise)
    small: float  # norms (and the router unless the model keeps it in float32)
    kv: int
    linear: float | None = None  # bitsandbytes: the nn.Linear kinds only (not fused experts, not the head)
    head: float | None = None  # embeddings/head, when they differ from `matrix` (8-bit: 16-bit)
    split_linears: bool = True  # AutoTP splits attention, dense MLPs and head (it does not run with 8-bit)

    def bytes_per_param(self, kind: str, shape: ModelShape) -> float:
        if kind == "router":
            return 4 if shape.router_fp32 else self.small
        if self.linear is not None and kind in LINEAR_KINDS:
            return self.linear
        if kind == "embeddings_head" and self.head is not None:
            return self.head
        return self.small if kind == "norms" else self.matrix


FORMATS = {
    "bf16": WeightFormat("bf16", 2, 2, 2),
    "fp16": WeightFormat("fp16", 2, 2, 2),
    "fp32": WeightFormat("fp32", 4, 4, 4),
    # 8-bit weights (FP8 e4m3 blocks, or int8 W8A16), the routed experts included; scales left out;
    # embeddings/head, norms, router and the KV cache stay 16-bit; attention and dense MLPs whole
    "fp8": WeightFormat("fp8", 1, 2, 2, head=2, split_linears=False),
    "int8": WeightFormat("int8", 1, 2, 2, head=2, split_linears=False),
}
DTYPE_FORMATS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
PLAN_FORMATS = ("bf16", "fp8", "int8")
LINEAR_KINDS = ("attention", "dense_mlp", "shared_experts")
BNB_BYTES = {"int8": 1.0, "nf4": 0.5}  # bitsandbytes LLM.int8 / 4-bit NormalFloat, per nn.Linear weight
MIN_COMPUTE_CAPABILITY = {"bf16": (8, 0), "fp8": (8, 9)}  # fp8 compute: H100/L40S class


# --- the model ------------------------------------------------------------------------------------
def model_shape(config: dict[str, Any]) -> ModelShape:
    """Counts from a `config.json`; UnsupportedArchitecture for a model type not listed here."""
    model_type = str(config.get("model_type"))
    count = _COUNTERS.get(model_type)
    if count is None:
        raise UnsupportedArchitecture(
            f"config.json: model_type {model_type!r} ({_architecture(config)}) is not supported by dsnode's "
            f"sizing and expert-parallel loader (supported: {', '.join(sorted(_COUNTERS))})"
        )
    return count(_Config(config))


class _Config:
    """config.json values, with transformers' defaults for keys a file leaves out."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def get(self, key: str, default: Any) -> Any:
        value = self.values.get(key)
        return default if value is None else value

    def int(self, key: str, default: int | None = None) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelFolderError(f"config.json: {key} must be an integer (got {value!r})")
        return value


def _architecture(config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or ["?"]
    return str(architectures[0])


def _deepseek_v3(c: _Config) -> ModelShape:
    hidden, layers = c.int("hidden_size", 7168), c.int("num_hidden_layers", 61)
    heads, q_lora = c.int("num_attention_heads", 128), c.get("q_lora_rank", 1536)
    kv_lora, rope = c.int("kv_lora_rank", 512), c.int("qk_rope_head_dim", 64)
    nope, v_head = c.int("qk_nope_head_dim", 128), c.int("v_head_dim", 128)
    q_head = nope + rope
    if q_lora:  # q_a_proj + q_a_layernorm whole (AutoTP leaves low-rank inputs), q_b_proj split
        q = Part(hidden * q_lora + q_lora, q_lora * heads * q_head)
    else:
        q = Part(0, hidden * heads * q_head)
    kv = Part(hidden * (kv_lora + rope) + kv_lora, kv_lora * heads * (nope + v_head))
    attention = q + kv + Part(0, heads * v_head * hidden)
    dense_layers = min(c.int("first_k_dense_replace", 3), layers)  # transformers: layer >= k is MoE
    moe_layers = layers - dense_layers
    experts, expert_inter = c.int("n_routed_experts", 256), c.int("moe_intermediate_size", 2048)
    return ModelShape(
        architecture=_architecture(c.values), model_type="deepseek_v3",
        parts=_common_parts(
            c, hidden, layers, attention_per_layer=attention,
            dense=Part(0, dense_layers * 3 * hidden * c.int("intermediate_size", 18432)),
            shared=Part(moe_layers * 3 * hidden * expert_inter * c.int("n_shared_experts", 1)),
            router=Part(moe_layers * (experts * hidden + experts)),  # weight + e_score_correction_bias
        ),
        layers=layers, moe_layers=moe_layers, routed_experts=experts,
        experts_per_token=c.int("num_experts_per_tok", 8), expert_params=3 * hidden * expert_inter,
        kv_values_per_token=layers * (kv_lora + rope), kv_heads=0, router_fp32=True,
        hidden_size=hidden, vocab_size=c.int("vocab_size"),
    )


def _mha_attention(c: _Config, hidden: int, qkv_bias: bool, o_bias: bool = False) -> tuple[Part, int, int]:
    """Multi-head (grouped-query) attention of one layer, its KV heads and head size."""
    heads = c.int("num_attention_heads")
    kv_heads = c.int("num_key_value_heads", heads)
    head_dim = c.int("head_dim", hidden // heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    weights = hidden * (q + 2 * kv) + q * hidden
    biases = (q + 2 * kv if qkv_bias else 0) + (hidden if o_bias else 0)
    return Part(0, weights + biases), kv_heads, head_dim


def _mixtral(c: _Config) -> ModelShape:
    hidden, layers = c.int("hidden_size", 4096), c.int("num_hidden_layers", 32)
    attention, kv_heads, head_dim = _mha_attention(c, hidden, qkv_bias=False)
    experts = c.int("num_local_experts", 8)
    return ModelShape(
        architecture=_architecture(c.values), model_type="mixtral",
        parts=_common_parts(c, hidden, layers, attention, dense=Part(), shared=Part(),
                            router=Part(layers * experts * hidden)),
        layers=layers, moe_layers=layers, routed_experts=experts,
        experts_per_token=c.int("num_experts_per_tok", 2),
        expert_params=3 * hidden * c.int("intermediate_size", 14336),
        kv_values_per_token=2 * layers * kv_heads * head_dim, kv_heads=kv_heads, router_fp32=False,
        hidden_size=hidden, vocab_size=c.int("vocab_size"),
    )


def _qwen2_moe(c: _Config) -> ModelShape:
    hidden, layers = c.int("hidden_size", 2048), c.int("num_hidden_layers", 24)
    attention, kv_heads, head_dim = _mha_attention(c, hidden, qkv_bias=bool(c.get("qkv_bias", True)))
    experts, step = c.int("num_experts", 60), c.int("decoder_sparse_step", 1)
    mlp_only = set(c.get("mlp_only_layers", []))
    moe_layers = sum(1 for i in range(layers) if i not in mlp_only and experts > 0 and (i + 1) % step == 0)
    dense_layers = layers - moe_layers
    shared_inter = c.int("shared_expert_intermediate_size", 5632)
    return ModelShape(
        architecture=_architecture(c.values), model_type="qwen2_moe",
        parts=_common_parts(
            c, hidden, layers, attention,
            dense=Part(0, dense_layers * 3 * hidden * c.int("intermediate_size", 5632)),
            shared=Part(moe_layers * (3 * hidden * shared_inter + hidden)),  # + shared_expert_gate
            router=Part(moe_layers * experts * hidden),
        ),
        layers=layers, moe_layers=moe_layers, routed_experts=experts,
        experts_per_token=c.int("num_experts_per_tok", 4),
        expert_params=3 * hidden * c.int("moe_intermediate_size", 1408),
        kv_values_per_token=2 * layers * kv_heads * head_dim, kv_heads=kv_heads, router_fp32=False,
        hidden_size=hidden, vocab_size=c.int("vocab_size"),
    )


def _dense(model_type: str, qkv_bias_key: str | None, qkv_bias_default: bool
           ) -> Callable[[_Config], ModelShape]:
    def count(c: _Config) -> ModelShape:
        hidden, layers = c.int("hidden_size"), c.int("num_hidden_layers")
        qkv_bias = bool(c.get(qkv_bias_key, qkv_bias_default)) if qkv_bias_key else qkv_bias_default
        o_bias = model_type == "llama" and qkv_bias
        attention, kv_heads, head_dim = _mha_attention(c, hidden, qkv_bias=qkv_bias, o_bias=o_bias)
        return ModelShape(
            architecture=_architecture(c.values), model_type=model_type,
            parts=_common_parts(c, hidden, layers, attention,
                                dense=Part(0, layers * 3 * hidden * c.int("intermediate_size")),
                                shared=Part(), router=Part()),
            layers=layers, moe_layers=0, routed_experts=0, experts_per_token=0, expert_params=0,
            kv_values_per_token=2 * layers * kv_heads * head_dim, kv_heads=kv_heads, router_fp32=False,
            hidden_size=hidden, vocab_size=c.int("vocab_size"),
        )

    return count


def _common_parts(c: _Config, hidden: int, layers: int, attention_per_layer: Part, dense: Part, shared: Part,
                  router: Part) -> dict[str, Part]:
    vocab = c.int("vocab_size")
    tied = bool(c.get("tie_word_embeddings", False))
    return {
        "attention": Part(attention_per_layer.whole * layers, attention_per_layer.split * layers),
        "dense_mlp": dense,
        "shared_experts": shared,
        "router": router,
        # AutoTP splits the head (not the embedding); a tied head is the embedding itself
        "embeddings_head": Part(vocab * hidden, 0 if tied else vocab * hidden),
        "norms": Part(layers * 2 * hidden + hidden),  # per layer: input and post-attention; final norm
    }


_COUNTERS: dict[str, Callable[[_Config], ModelShape]] = {
    "deepseek_v3": _deepseek_v3,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "llama": _dense("llama", "attention_bias", False),
    "mistral": _dense("mistral", None, False),
    "qwen2": _dense("qwen2", None, True),
}


# --- ranks ----------------------------------------------------------------------------------------
def spread_experts(experts: int, ranks: int) -> list[range]:
    """Routed experts of each rank: contiguous ranges, sizes differing by at most one (the first
    `experts % ranks` ranks hold one more). 18 experts on 4 ranks: 0-4, 5-9, 10-13, 14-17."""
    base, extra = divmod(experts, ranks)
    ranges, start = [], 0
    for rank in range(ranks):
        size = base + (1 if rank < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def describe_spread(experts: int, ranks: int) -> str:
    sizes = [len(r) for r in spread_experts(experts, ranks)]
    if min(sizes) == max(sizes):
        return f"{experts} routed experts per MoE layer, {sizes[0]} on each of {ranks} ranks"
    more = sizes.count(max(sizes))
    return (f"{experts} routed experts per MoE layer over {ranks} ranks: ranks 0-{more - 1} hold "
            f"{max(sizes)}, ranks {more}-{ranks - 1} hold {min(sizes)} (contiguous ranges)")


def rank_params(shape: ModelShape, ranks: int, rank: int, experts_sharded: bool = True,
                split_linears: bool = True) -> dict[str, int]:
    """Parameters rank `rank` of `ranks` holds, by kind (`split_linears`: AutoTP splits attention, the
    dense MLPs and the head; with 8-bit weights it does not run)."""
    params = {kind: part.whole + math.ceil(part.split / ranks) for kind, part in shape.parts.items()}
    if not split_linears:  # 8-bit weights: no AutoTP at all (it finds no nn.Linear in the layers)
        for kind in ("attention", "dense_mlp", "embeddings_head"):
            params[kind] = shape.parts[kind].whole + shape.parts[kind].split
    held = len(spread_experts(shape.routed_experts, ranks)[rank]) if experts_sharded else shape.routed_experts
    params["routed_experts"] = held * shape.moe_layers * shape.expert_params
    return {kind: params[kind] for kind in KINDS}


def kv_bytes_per_token(shape: ModelShape, ranks: int, fmt: WeightFormat) -> int:
    """KV-cache bytes one token takes on one rank (the rank with the most KV heads)."""
    if shape.kv_heads == 0:  # MLA: the latent is computed and cached whole on every rank
        return shape.kv_values_per_token * fmt.kv
    per_head = shape.kv_values_per_token // shape.kv_heads
    return per_head * math.ceil(shape.kv_heads / ranks) * fmt.kv


@dataclass(frozen=True)
class Fit:
    """One configuration's figures for its fullest rank (rank 0)."""

    format: str
    ranks: int
    experts_sharded: bool
    weights_by_kind: dict[str, int]  # bytes
    memory_per_rank: int  # bytes
    usable_per_rank: int
    kv_bytes_per_token: int
    kv_tokens_needed: int
    weights_per_rank: list[int] = field(default_factory=list)  # bytes, every rank

    @property
    def weights(self) -> int:
        return sum(self.weights_by_kind.values())

    @property
    def kv_tokens_fit(self) -> int:
        return max(0, (self.usable_per_rank - self.weights) // self.kv_bytes_per_token)

    @property
    def fits(self) -> bool:
        return self.weights <= self.usable_per_rank and self.kv_tokens_fit >= self.kv_tokens_needed

    @property
    def verdict(self) -> str:
        if self.weights > self.usable_per_rank:
            return f"does not fit: weights {gb(self.weights)} > usable {gb(self.usable_per_rank)} per rank"
        if not self.fits:
            return f"does not fit: KV cache for {self.kv_tokens_fit} tokens, {self.kv_tokens_needed} needed"
        return "fits"


def fit(shape: ModelShape, ranks: int, memory_per_rank: int, fmt: WeightFormat, kv_tokens_needed: int,
        experts_sharded: bool = True, usable_fraction: float = USABLE_FRACTION) -> Fit:
    per_rank = [rank_bytes(shape, ranks, r, fmt, experts_sharded) for r in range(ranks)]
    return Fit(
        format=fmt.name, ranks=ranks, experts_sharded=experts_sharded, weights_by_kind=per_rank[0],
        memory_per_rank=memory_per_rank, usable_per_rank=int(memory_per_rank * usable_fraction),
        # 8-bit attention is whole on every rank, and so is its KV cache
        kv_bytes_per_token=kv_bytes_per_token(shape, ranks if fmt.split_linears else 1, fmt),
        kv_tokens_needed=kv_tokens_needed,
        weights_per_rank=[sum(b.values()) for b in per_rank],
    )


def serving_format(dtype: str, quantization: str, weights: str = "model") -> WeightFormat:
    """What the central engines hold: `dtype` ("bfloat16", ...) everywhere, but
    - `weights` "int8"/"fp8" (the deepspeed backend's 8-bit loader): one byte a weight in the decoder
      layers and the experts, whole on every rank but the experts; embeddings/head in `dtype`;
    - bitsandbytes' quantized `nn.Linear`s (attention, dense and shared MLPs; never the fused experts
      or the head) for the transformers backend's int8/nf4, and nf4 on either."""
    base = FORMATS[DTYPE_FORMATS[dtype]]
    if weights in ("int8", "fp8"):
        return WeightFormat(f"{weights}+{base.name}", 1, base.small, base.kv, head=base.matrix,
                            split_linears=False)
    if quantization == "none":
        return base
    return WeightFormat(f"{base.name}+{quantization}", base.matrix, base.small, base.kv,
                        linear=BNB_BYTES[quantization])


def rank_bytes(shape: ModelShape, ranks: int, rank: int, fmt: WeightFormat, experts_sharded: bool = True
               ) -> dict[str, int]:
    params = rank_params(shape, ranks, rank, experts_sharded, fmt.split_linears)
    return {kind: math.ceil(n * fmt.bytes_per_param(kind, shape)) for kind, n in params.items()}


def gb(n: float) -> str:
    """Bytes as decimal gigabytes, or smaller units for small models."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fit_summary(model_name: str, f: Fit, where: str) -> str:
    """One line with the plan's numbers, for the log and /ready."""
    kinds = ", ".join(f"{KIND_LABELS[k]} {gb(v)}" for k, v in f.weights_by_kind.items() if v)
    kv = f.kv_bytes_per_token * f.kv_tokens_needed
    return (
        f"model {model_name} ({f.format}) on {f.ranks} rank(s) of {gb(f.memory_per_rank)} ({where}): "
        f"{f.verdict}. Per rank: weights {gb(f.weights)} ({kinds}); "
        f"KV cache {f.kv_bytes_per_token} bytes/token × {f.kv_tokens_needed} tokens ([batching] max_batch_tokens) = {gb(kv)}; "
        f"usable {gb(f.usable_per_rank)} ({USABLE_FRACTION:.0%}). See `dsnode plan MODEL_DIR`"
    )


# --- the prompt cache's host memory -------------------------------------------------------------------
PROMPT_CACHE_REFUSED = 0.7  # of the host's memory: refused at start (vLLM's rule for its CPU swap space)
PROMPT_CACHE_WARNED = 0.4  # of the host's memory: a warning


def prompt_cache_verdict(prompt_cache_mb: int, ranks_here: int, host_bytes: int) -> tuple[str, str]:
    """("ok" | "warn" | "refuse", why): `[batching] prompt_cache_mb` is host memory each rank (or the one
    engine) of this host may fill, on top of the model. As vLLM does for its swap space: over 70% of the
    host's memory is refused, over 40% warned of."""
    held = prompt_cache_mb * 2**20 * ranks_here
    share = held / host_bytes if host_bytes else 0.0
    who = f"{ranks_here} ranks x {prompt_cache_mb} MB" if ranks_here > 1 else f"{prompt_cache_mb} MB"
    why = (f"the prompt cache may hold {gb(held)} of host memory ({who}), {share:.0%} of this host's "
           f"{gb(host_bytes)}")
    if share > PROMPT_CACHE_REFUSED:
        return "refuse", (f"batching.prompt_cache_mb = {prompt_cache_mb}: {why}, over "
                          f"{PROMPT_CACHE_REFUSED:.0%}; lower it (0 turns the cache off)")
    return ("warn" if share > PROMPT_CACHE_WARNED else "ok"), why
