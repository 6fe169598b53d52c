"""Weight-only block quantization for ONNX Runtime's `com.microsoft.MatMulNBits` (convert time).

A weight W (K, N) (ONNX MatMul layout: input features first) is cut, column by column, into blocks of
`block_size` consecutive input features; each block stores `bits`-bit integers, one scale and, when
asymmetric, one zero point: asymmetric blocks map [min, max] of the block onto all 2^bits levels,
symmetric ones (zero point = the kernel's default, 2^(bits-1)) spend levels on the side the block does
not reach. Zero points cut the weight error ~8% at 8 bits, but the logits follow only at 4 bits (at 8
the kernel's int8 rounding of the activations dominates; docs/performance.md, run F), so
`ConvertOptions.symmetric` chooses them for int4 only unless asked. The packing is onnxruntime's own
(`quantize_matmul_{4,8}bits`, the C++ routines its `MatMulNBitsQuantizer` calls), so the blobs are what
the CPU and CUDA kernels expect. Activations stay float (fp32 on CPU targets, fp16 on CUDA targets):
`accuracy_level` 4 lets the CPU kernel multiply in int8 after quantizing activations per block, which
is what makes it fast there; the CUDA kernel ignores it.

A weight whose input size K is not a multiple of the block stays a float MatMul: padded blocks would
work in onnxruntime's kernels, but the CUDA fpA_intB path and other runtimes refuse them, and the
operator can tell from the manifest which layers are not quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = {"int8": 8, "int4": 4}
DEFAULT_BLOCK_SIZE = 128
DEFAULT_ACCURACY_LEVEL = 4  # int8 compute on CPU; 0 is ~10x slower there (research §4)


@dataclass(frozen=True)
class NBitsWeight:
    """What MatMulNBits takes for one weight: B (N, blocks, blob) uint8, scales (N, blocks) and, when
    asymmetric, zero points (N, ceil(blocks * bits / 8)) uint8 (two per byte at 4 bits, low nibble first)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    n: int
    bits: int
    block_size: int


def fits_blocks(k: int, block_size: int) -> bool:
    return k % block_size == 0


def quantize_weight(weight: np.ndarray, bits: int, block_size: int, symmetric: bool) -> NBitsWeight:
    """weight (K, N) float32 → blockwise `bits`-bit integers with one float32 scale (and, unless
    `symmetric`, one zero point) per block."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = weight.shape
    if not fits_blocks(k, block_size):
        raise ValueError(f"K={k} is not a multiple of the block size {block_size}")
    blocks = k // block_size
    packed = np.zeros((n, blocks, block_size * bits // 8), dtype=np.uint8)  # (N, blocks, blob)
    scales = np.zeros((n, blocks), dtype=np.float32)  # (N, blocks)
    zero_points = np.zeros((n, (blocks * bits + 7) // 8), dtype=np.uint8)  # (N, packed zero points)
    quantize = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    quantize(packed, np.ascontiguousarray(weight, dtype=np.float32), scales, zero_points, block_size, n, k, symmetric)
    return NBitsWeight(packed, scales, None if symmetric else zero_points, k, n, bits, block_size)


def dequantize(q: NBitsWeight) -> np.ndarray:
    """The float weight (K, N) the kernel multiplies by: for tests and error reports."""
    blocks = q.k // q.block_size
    if q.bits == 8:
        values = q.packed.astype(np.float32)  # (N, blocks, block)
    else:
        values = _nibbles(q.packed).reshape(q.n, blocks, q.block_size).astype(np.float32)
    if q.zero_points is None:
        zero = np.float32(2 ** (q.bits - 1))
    else:
        zero = (q.zero_points if q.bits == 8 else _nibbles(q.zero_points)[:, :blocks]).astype(np.float32)[:, :, None]
    weight = (values - zero) * q.scales[:, :, None]  # (N, blocks, block)
    return weight.reshape(q.n, q.k).T


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """(..., B) uint8 → (..., 2B): element 2i in the low nibble, 2i+1 in the high one."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
