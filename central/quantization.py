"""bitsandbytes quantization of the central model (`[model] quantization = "int8" | "nf4"`).

Weights are quantized as they load (transformers' `BitsAndBytesConfig`), so nothing is written to disk.
What bitsandbytes quantizes is `nn.Linear`, and only that:
- MoE routed experts that transformers stores fused, as 3-D parameters (DeepSeek-V3/R1, Mixtral,
  Qwen-MoE in transformers 5), are *not* `nn.Linear` and stay in the load dtype. They are most of an
  MoE model's weights, so the saving is far smaller than for a dense model (see docs/central.md).
- The output head (`lm_head`) stays unquantized (transformers' default, for accuracy), as do
  embeddings, norms and the router.

Two bitsandbytes 0.50 CPU limits are worked around here (CUDA is not affected):
- int8 (`Linear8bitLt`) flattens 3-D inputs only; MLA's `kv_b_proj` gets a 4-D one and fails, so on
  CPU `kv_b_proj` stays unquantized.
- nf4 (`Linear4bit`) on AVX512-BF16 CPUs repacks weights for a fast kernel that needs in_features
  divisible by the block size and out_features by 32; layers that don't fit take the generic path.
"""

from __future__ import annotations

import logging
from typing import Any

INT8_SKIP_ALWAYS = ("lm_head",)
INT8_SKIP_ON_CPU = ("kv_b_proj",)  # MLA: 4-D input (see above)
CPU_PACK_BLOCK_N = 32  # bitsandbytes' CPU nf4 repacking works on blocks of 32 output rows


def quantization_config(kind: str, compute_dtype: Any, device_type: str = "cuda") -> Any:
    """The `BitsAndBytesConfig` for "int8" (LLM.int8) or "nf4" (4-bit NormalFloat); None for "none"."""
    if kind == "none":
        return None
    from transformers import BitsAndBytesConfig

    # LLM.int8 logs a warning on every matmul whose input is not float16 (all of them on CPU)
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    if kind == "int8":
        skip = INT8_SKIP_ALWAYS + (INT8_SKIP_ON_CPU if device_type == "cpu" else ())
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip))
    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    raise ValueError(f"unknown quantization {kind!r}")


def fix_cpu_nf4_layers(model: Any) -> int:
    """Send nf4 layers the CPU fast kernel cannot take to the generic path; returns how many."""
    import bitsandbytes as bnb

    fixed = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        blocksize = module.weight.quant_state.blocksize
        if module.in_features % blocksize or module.out_features % CPU_PACK_BLOCK_N:
            module.support_avx512bf16_for_cpu = False
            fixed += 1
    return fixed

