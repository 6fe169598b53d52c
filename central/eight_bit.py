"""8-bit weights for the deepspeed backend, the routed experts included: int8 with one scale per
output channel, computing in the model dtype (W8A16), and FP8 kept as the checkpoint stores it.

**int8, one float32 scale per output channel (row)** — chosen over one scale per 128-block because
the scale then factors out of every dot product: `y = (x @ Wq.T) * s`, one multiply of the output
after an int8-weight matmul (`torch._weight_int8pack_mm` on CPU, no dequantized copy of the
weight), where block scales would have to be applied inside the K loop (a dequantized weight, or a
group-wise kernel). Its rounding error is at most half a step of the row's largest weight / 127;
for an FP8 source that is of the order of e4m3's own rounding (3 mantissa bits: up to 1/16 of each
value), and docs/central.md has the measured token agreement. Scales cost 4 bytes per row
(< 0.2% of a 2048-wide row).

**FP8 (e4m3, one float32 `weight_scale_inv` per 128 × 128 block, DeepSeek's layout)** — kept on
GPUs that compute in FP8 (compute capability 8.9+, and `fp8_kernel_problem` finding none):
activations are quantized per 1 × 128 group on the fly and `torch.nn.functional.scaled_mm` takes
both block scales. Weights are padded to whole blocks (zero rows/columns: exact, the block's scale
covers them) and held as uint8 bits, so a dtype cast of the module (DeepSpeed's `init_inference`)
cannot widen them. Elsewhere the same module dequantizes per forward (the reference the GPU path is
checked against: scripts/gpu_check.py), and the ranks load an FP8 checkpoint as int8 there.

Shapes: Linear weight (N, K) = (out, in); fused experts gate_up (E, 2I, H), down (E, H, I).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

BLOCK = 128  # DeepSeek's FP8 block (both dimensions)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MIN_CAPABILITY = (8, 9)
ROW_ALIGN = 16  # the FP8 block kernel's activation rows are padded to this (`_scaled_mm_blocks`)


# --- int8 ---------------------------------------------------------------------------------------------
def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, K) float → int8 (n, K) and float32 scales (n,): round to nearest, symmetric, per row."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (n,)
    quantized = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return quantized, scale


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) in the model dtype, weight int8 (N, K), scale (N,) → (..., N) in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])  # (T, K)
    if x2.device.type == "cpu":
        y = torch._weight_int8pack_mm(x2.contiguous(), weight, scale.to(x2.dtype))  # (T, N)
    else:  # one layer's weight in the model dtype at a time, then the per-row scale
        y = F.linear(x2, weight.to(x2.dtype)) * scale.to(x2.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights and per-row scales. Not an `nn.Linear`: AutoTP leaves it whole."""

    def __init__(self, in_features: int, out_features: int, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _meta((out_features, in_features), torch.int8)
        self.weight_scale = _meta((out_features,), torch.float32)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x, self.weight, self.weight_scale)
        return y if self.bias is None else y + self.bias


class Int8Experts(nn.Module):
    """transformers 5's fused experts (DeepSeek-V3, Mixtral, Qwen2-MoE) with int8 weights: the same
    forward (tokens grouped by expert; index `num_experts` is the sentinel expert parallelism uses)."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        count, two_i, hidden = experts.gate_up_proj.shape
        self.num_experts = count
        self.act_fn = experts.act_fn
        self.gate_up_proj = _meta((count, two_i, hidden), torch.int8)
        self.gate_up_proj_scale = _meta((count, two_i), torch.float32)
        self.down_proj = _meta((count, hidden, two_i // 2), torch.int8)
        self.down_proj_scale = _meta((count, hidden), torch.float32)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        # hidden_states (T, H); top_k_index, top_k_weights (T, k)
        out = torch.zeros_like(hidden_states)
        for expert, token, slot in _routes(top_k_index, self.num_experts):
            gate, up = int8_matmul(hidden_states[token], self.gate_up_proj[expert],
                                   self.gate_up_proj_scale[expert]).chunk(2, dim=-1)  # (t, I) each
            y = int8_matmul(self.act_fn(gate) * up, self.down_proj[expert], self.down_proj_scale[expert])
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def _routes(top_k_index: torch.Tensor, count: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, token indices, top-k slots) for each local expert some token is routed to."""
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=count + 1).permute(2, 1, 0)  # (E+1, k, T)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    routes = []
    for expert in hit[:, 0].tolist():
        if expert == count:  # the sentinel: routed to another rank's expert
            continue
        slot, token = torch.where(mask[expert])
        routes.append((expert, token, slot))
    return routes


def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)


# --- FP8 blocks -----------------------------------------------------------------------------------------
def blocks(n: int) -> int:
    return math.ceil(n / BLOCK)


def expand_blocks(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(⌈rows/128⌉, ⌈cols/128⌉) block scales → (rows, cols), one per weight."""
    return scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]


def quantize_fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float (N, K) → float8_e4m3fn (N, K) and float32 `weight_scale_inv` (⌈N/128⌉, ⌈K/128⌉), each
    128 × 128 block scaled so its largest value is e4m3's largest: DeepSeek's layout, the inverse of
    `dequantize_fp8` (for test checkpoints and scripts/gpu_check.py; dsnode never writes FP8)."""
    rows, cols = weight.shape
    n, k = blocks(rows), blocks(cols)
    padded = torch.zeros((n * BLOCK, k * BLOCK), dtype=torch.float32, device=weight.device)
    padded[:rows, :cols] = weight.float()
    grid = padded.reshape(n, BLOCK, k, BLOCK)
    scale = grid.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # (n, k)
    quantized = (grid / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols].to(torch.float8_e4m3fn)
    return quantized.contiguous(), scale


def padded_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float (N, K) → what an `Fp8Linear` holds (uint8 bits padded to whole blocks, block scales) and
    the float32 (N, K) it stands for: a known FP8 weight to check the kernel with."""
    quantized, scale_inv = quantize_fp8_blocks(weight)
    rows, cols = weight.shape
    bits = torch.zeros((blocks(rows) * BLOCK, blocks(cols) * BLOCK), dtype=torch.uint8, device=weight.device)
    bits[:rows, :cols] = quantized.view(torch.uint8)
    return bits, scale_inv, dequantize_fp8(quantized, scale_inv)


def dequantize_fp8(bits: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """FP8 (e4m3; as uint8 bits or float8) (n, K) with its block scales → float32 (n, K)."""
    values = bits.view(torch.float8_e4m3fn).float()
    return values * expand_blocks(scale_inv.float(), *values.shape)


def fp8_compute_available(device: torch.device) -> bool:
    """The device computes in FP8 with DeepSeek's block scales: `fp8_kernel_problem` (a CUDA GPU of
    compute capability 8.9+ whose kernel passes its check, run once per device) finds nothing. Called
    on every FP8 linear's forward: after the first call it is a dictionary lookup."""
    return fp8_kernel_problem(device) is None


_KERNEL_CHECKED: dict[str, str | None] = {}


def fp8_kernel_problem(device: torch.device) -> str | None:
    """Why the FP8 block kernel cannot serve on `device`, or None where it can. It is run once per
    device on three small products (1, 5 and 37 tokens; K and N not whole blocks) against the
    dequantized reference, because compute capability 8.9+ is not enough: on an H200 (torch 2.11,
    CUDA 13; scripts/gpu_check.py, 2026-11-30) cuBLAS refused the product of one token
    (CUBLAS_STATUS_NOT_SUPPORTED), and per NVIDIA it has the 1x128 × 128x128 recipe on Hopper only.
    Where this fails, the ranks hold the weights as int8 instead of failing at the first request."""
    if device.type != "cuda":
        return f"FP8 compute needs a CUDA GPU (this is {device.type})"
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = f"cuda:{index}"
    if key not in _KERNEL_CHECKED:
        _KERNEL_CHECKED[key] = _check_kernel(torch.device(key))
    return _KERNEL_CHECKED[key]


def _check_kernel(device: torch.device) -> str | None:
    if torch.cuda.get_device_capability(device) < FP8_MIN_CAPABILITY:
        return f"compute capability {torch.cuda.get_device_capability(device)} < {FP8_MIN_CAPABILITY}"
    generator = torch.Generator(device="cpu").manual_seed(0)
    weight = torch.randn(320, 300, generator=generator) * 0.02  # (N, K): neither whole blocks
    bits, scale_inv, reference = (t.to(device) for t in padded_fp8(weight))
    try:
        for tokens in (1, 5, 37):
            x = torch.randn(tokens, 300, generator=generator).to(device, torch.bfloat16)
            want = F.linear(x.float(), reference)
            got = _scaled_mm_blocks(x, bits, scale_inv)[:, :320].float()
            error = ((got - want).norm() / want.norm()).item()
            if not error < 0.1:  # FP8 activations round to ~3%; NaN fails too
                return f"the FP8 block kernel is off by {error:.3f} (relative) on {tokens} tokens"
    except (RuntimeError, ValueError) as exc:  # cuBLAS "not supported", torch's layout checks
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return None


def fp8_matmul(x: torch.Tensor, bits: torch.Tensor, scale_inv: torch.Tensor,
               out_features: int) -> torch.Tensor:
    """x (..., K), bits uint8 (Np, Kp) padded to whole blocks, scale_inv (Np/128, Kp/128) → (..., N)."""
    x2 = x.reshape(-1, x.shape[-1])  # (T, K)
    if fp8_compute_available(x2.device):
        y = _scaled_mm_blocks(x2, bits, scale_inv)
    else:  # reference path: the same numbers, without FP8 compute
        y = F.linear(x2, dequantize_fp8(bits, scale_inv)[:, : x2.shape[1]].to(x2.dtype))
    return y[:, :out_features].reshape(*x.shape[:-1], out_features)


def _scaled_mm_blocks(x: torch.Tensor, bits: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """DeepSeek's W8A8 block GEMM on FP8 tensor cores: activations per 1 × 128 group, weights per
    128 × 128 block (torch's BlockWise1x128 × BlockWise128x128 recipe, sm90)."""
    from torch.nn.functional import ScalingType

    tokens, padded_k = x.shape[0], bits.shape[1]
    # K to whole blocks; T (the rows) to a multiple of 16, so the outer-dim-major activation scales are
    # 16-byte aligned like the weights' (K padded to 4). Unpadded, cuBLAS refused one token's product on
    # an H200 (CUBLAS_STATUS_NOT_SUPPORTED); vLLM pads M to 4 for this recipe (vllm-project/vllm#49932),
    # an older cuBLASLt FP8 check wanted 16. Padded is not yet run on a GPU: `fp8_kernel_problem` checks.
    rows = math.ceil(tokens / ROW_ALIGN) * ROW_ALIGN
    if x.shape[1] < padded_k or rows != tokens:
        x = F.pad(x, (0, padded_k - x.shape[1], 0, rows - tokens))
    groups = x.float().reshape(rows, padded_k // BLOCK, BLOCK)  # (T', Kp/128, 128)
    x_scale = groups.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX  # (T, Kp/128)
    x_fp8 = (groups / x_scale[..., None]).reshape(x.shape).to(torch.float8_e4m3fn)
    k_blocks = padded_k // BLOCK
    l4 = math.ceil(k_blocks / 4) * 4  # the kernel wants the weight scales' K padded to 4, outer-dim major
    w_scale = torch.zeros((scale_inv.shape[0], l4), dtype=torch.float32, device=x.device)
    w_scale[:, :k_blocks] = scale_inv
    return F.scaled_mm(
        x_fp8, bits.view(torch.float8_e4m3fn).t(),  # (T, Kp) @ (Kp, Np), the weight column-major
        outer_dim_major(x_scale), ScalingType.BlockWise1x128,  # (T, Kp/128), stride (1, T)
        w_scale.t(), ScalingType.BlockWise128x128,  # (L4, Np/128), stride (1, L4)
        output_dtype=x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16,
    )[:tokens].to(x.dtype)


def outer_dim_major(scale: torch.Tensor) -> torch.Tensor:
    """`scale` (R, C) copied into strides (1, R), as scaled_mm's 1x128 recipe checks them literally.
    `.t().contiguous().t()` does not do it where R == 1: torch counts a size-1 dimension's stride as
    contiguous whatever it is, so it leaves (C, 1), which the kernel refuses (torch 2.11, one token)."""
    out = torch.empty_strided(scale.shape, (1, scale.shape[0]), dtype=scale.dtype, device=scale.device)
    return out.copy_(scale)


class Fp8Linear(nn.Module):
    """An FP8 checkpoint's linear, kept in FP8: bits (Np, Kp) uint8, scale_inv (Np/128, Kp/128)."""

    def __init__(self, in_features: int, out_features: int, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _meta((blocks(out_features) * BLOCK, blocks(in_features) * BLOCK), torch.uint8)
        self.weight_scale_inv = _meta((blocks(out_features), blocks(in_features)), torch.float32)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_matmul(x, self.weight, self.weight_scale_inv, self.out_features)
        return y if self.bias is None else y + self.bias


class Fp8Experts(nn.Module):
    """Fused experts kept in FP8. gate and up are padded to whole blocks separately, so their block
    scales stay their own: gate_up (E, 2·Ip, Hp), down (E, Hp, Ip), Ip and Hp rounded up to 128."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        count, two_i, hidden = experts.gate_up_proj.shape
        self.num_experts, self.intermediate, self.hidden = count, two_i // 2, hidden
        self.act_fn = experts.act_fn
        i_pad, h_pad = blocks(self.intermediate) * BLOCK, blocks(hidden) * BLOCK
        self.gate_up_proj = _meta((count, 2 * i_pad, h_pad), torch.uint8)
        self.gate_up_proj_scale_inv = _meta((count, 2 * i_pad // BLOCK, h_pad // BLOCK), torch.float32)
        self.down_proj = _meta((count, h_pad, i_pad), torch.uint8)
        self.down_proj_scale_inv = _meta((count, h_pad // BLOCK, i_pad // BLOCK), torch.float32)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)  # (T, H)
        i, i_pad = self.intermediate, self.gate_up_proj.shape[1] // 2
        for expert, token, slot in _routes(top_k_index, self.num_experts):
            gate_up = fp8_matmul(hidden_states[token], self.gate_up_proj[expert],
                                 self.gate_up_proj_scale_inv[expert], 2 * i_pad)  # (t, 2·Ip)
            h = self.act_fn(gate_up[:, :i]) * gate_up[:, i_pad:i_pad + i]  # (t, I)
            y = fp8_matmul(h, self.down_proj[expert], self.down_proj_scale_inv[expert], self.hidden)
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


EIGHT_BIT = (Int8Linear, Int8Experts, Fp8Linear, Fp8Experts)


def eight_bit_tensors(module: nn.Module) -> tuple[str, ...]:
    """The tensors of an 8-bit module that its checkpoint reader fills (a bias is read as usual)."""
    return tuple(name for name, _ in module.named_parameters(recurse=False) if name != "bias")


def model_dtype_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """The weights of `model` as they would be without 8-bit modules: each 8-bit weight in `dtype`,
    no scales (what `/cluster` shows as the bytes before quantization)."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        leaf = name.rpartition(".")[2]
        if isinstance(owner, EIGHT_BIT):
            total += _unpadded_numel(owner, leaf) * size if not leaf.endswith(("_scale", "_scale_inv")) else 0
        elif tensor.is_floating_point() and leaf not in owner._non_persistent_buffers_set:  # rotary: computed
            total += tensor.numel() * tensor.element_size()
    return total


def _unpadded_numel(module: nn.Module, leaf: str) -> int:
    """Weights of an 8-bit tensor without the padding FP8 modules add to whole blocks."""
    tensor = getattr(module, leaf)
    if isinstance(module, Fp8Linear):
        return module.out_features * module.in_features
    if isinstance(module, Fp8Experts):
        return module.num_experts * (2 if leaf == "gate_up_proj" else 1) * module.intermediate * module.hidden
    return int(tensor.numel())
