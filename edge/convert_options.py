"""What `dsnode convert` can be asked for, checked before anything is read or written (no torch)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .nbits import BITS, DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE

QUANTIZATIONS = ("int8", "int4", "int8-dynamic", "none")
TARGETS = ("cpu", "cuda")
ZERO_POINTS = ("auto", "yes", "no")
KV_CACHES = ("float", "int8")
# Top-1 agreement the validation must reach. float32 differs from torch only in summation order, so
# only near-ties may flip; int8 rounds every weight, so a few close calls flip on a real model; int4
# rounds sixteen times coarser.
MIN_AGREEMENT = {"none": 0.95, "int8": 0.80, "int8-dynamic": 0.80, "int4": 0.60}


class ConvertError(Exception):
    """Bad input or a failed conversion; the message is for the operator, DST was not written."""


@dataclass(frozen=True)
class ConvertOptions:
    quant: str = "int8"
    target: str = "cpu"  # "cuda": float16 activations and cache, for onnxruntime's CUDA provider
    block_size: int = DEFAULT_BLOCK_SIZE
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL
    zero_points: str = "auto"  # int8/int4: "yes" | "no" | "auto" (int4 yes, int8 no: measured, docs/edge.md)
    kv_cache: str = "float"  # "int8": the KV cache in int8, per-channel scales calibrated at convert time (cpu)
    calibration_text: Path | None = None  # --kv-cache int8: the operator's text to calibrate on
    threads: int | None = None  # weights prepared at once (None: one per core, up to 4); not in the output

    def check(self) -> None:
        if self.quant not in QUANTIZATIONS:
            raise ConvertError(f"--quant {self.quant!r}: choose one of {', '.join(QUANTIZATIONS)}")
        if self.target not in TARGETS:
            raise ConvertError(f"--target {self.target!r}: choose one of {', '.join(TARGETS)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConvertError(f"--block-size {self.block_size}: a power of two, at least 16")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConvertError(f"--accuracy-level {self.accuracy_level}: 0..4")
        if self.zero_points not in ZERO_POINTS:
            raise ConvertError(f"--zero-points {self.zero_points!r}: choose one of {', '.join(ZERO_POINTS)}")
        if self.kv_cache not in KV_CACHES:
            raise ConvertError(f"--kv-cache {self.kv_cache!r}: choose one of {', '.join(KV_CACHES)}")
        if self.kv_cache == "int8" and (self.target != "cpu" or self.quant == "int8-dynamic"):
            raise ConvertError(f"--kv-cache int8 is built for --target cpu with --quant int8, int4 or none "
                               f"(got --target {self.target} --quant {self.quant})")
        if self.threads is not None and self.threads < 1:
            raise ConvertError(f"--threads {self.threads}: at least 1")
        if self.calibration_text is not None:
            self._check_calibration_text(self.calibration_text)

    def _check_calibration_text(self, path: Path) -> None:
        if self.kv_cache != "int8":
            raise ConvertError(f"--calibration-text {path}: only --kv-cache int8 is calibrated "
                               f"(got --kv-cache {self.kv_cache})")
        from .kv_calibration import read_passages  # numpy and the tokenizer module: no torch

        try:
            read_passages(path)
        except ValueError as exc:
            raise ConvertError(f"--calibration-text {path}: {exc}") from None

    @property
    def symmetric(self) -> bool:
        """No zero points: the blocks are centred on 0. At 8 bits the activations' int8 rounding
        dominates and zero points did not lower the logit error on a trained model; at 4 bits they do."""
        if self.zero_points == "auto":
            return self.quant != "int4"
        return self.zero_points == "no"

    def kv_cache_description(self) -> dict[str, Any]:
        """The manifest's description of the KV cache (empty: the activations' float type)."""
        if self.kv_cache == "float":
            return {}
        from .kv_calibration import MARGIN  # numpy and the tokenizer module: no torch

        return {"dtype": self.kv_cache, "scales": "per channel (kv head x head dim), calibrated at convert time",
                "margin": MARGIN, "calibration": self.calibration_source()}

    def calibration_source(self) -> dict[str, Any]:
        """What the cache was calibrated on, for the manifest."""
        from .kv_calibration import PASSAGE_TOKENS, RANDOM_PROMPTS, read_passages

        randoms = f"{RANDOM_PROMPTS} prompts of random token ids"
        if self.calibration_text is None:
            return {"text": "built-in sample texts", "also": randoms}
        path = self.calibration_text.expanduser().absolute()
        return {"text": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "passages": len(read_passages(path)), "passage_tokens_max": PASSAGE_TOKENS, "also": randoms}

    def weights(self, float_layers: dict[str, str]) -> dict[str, Any]:
        """The manifest's description of how the weights are stored."""
        if self.quant == "int8-dynamic":
            return {"method": "MatMulInteger", "bits": 8, "activations": "uint8, per row at run time"}
        activations = "float16" if self.target == "cuda" else "float32"
        if self.quant == "none":
            return {"method": "float", "activations": activations}
        return {"method": "MatMulNBits", "bits": BITS[self.quant], "block_size": self.block_size,
                "accuracy_level": self.accuracy_level, "symmetric": self.symmetric, "activations": activations,
                "float_layers": dict(float_layers)}
