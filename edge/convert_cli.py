"""`dsnode convert SRC DST [--quant int8|int4|int8-dynamic|none] [--target cpu|cuda]`: registered by `dsnode.cli` when this module exists.

Only argparse here: torch and transformers load when the command runs, not when `dsnode` starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "convert",
        help="Hugging Face checkpoint folder -> ONNX model with KV cache (-> int8/int4), validated",
        description="Convert a Hugging Face causal-LM folder into an ONNX model folder the edge serves "
        "(backend = \"onnx\"). Progress goes to stderr, the validation report to stdout.",
    )
    p.add_argument("src", type=Path, metavar="SRC", help="Hugging Face model folder (config.json, weights, tokenizer)")
    p.add_argument("dst", type=Path, metavar="DST", help="new folder to create (must not exist)")
    p.add_argument("--quant", choices=("int8", "int4", "int8-dynamic", "none"), default="int8",
                   help="int8 (default) / int4: weight-only blocks (MatMulNBits: runs on the CPU and on "
                   "CUDA GPUs); int8-dynamic: int8 weights x uint8 activations (MatMulInteger: CPU only); "
                   "none: float")
    p.add_argument("--target", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default): float32 activations for the CPU provider; cuda: float16 activations "
                   "and cache for the CUDA provider (e.g. a T4). The folder serves that target only")
    p.add_argument("--block-size", type=int, default=128, metavar="N",
                   help="int8/int4: input features per quantization block (power of two; default 128)")
    p.add_argument("--accuracy-level", type=int, default=4, choices=range(5), metavar="L",
                   help="int8/int4: MatMulNBits compute type on the CPU (4 = int8, fastest; 0 = as the "
                   "activations; default 4)")
    p.add_argument("--zero-points", choices=("auto", "yes", "no"), default="auto",
                   help="int8/int4: one zero point per block (asymmetric; 1 byte per block) or none (blocks "
                   "centred on 0); auto (default): yes for int4, no for int8")
    p.add_argument("--kv-cache", choices=("float", "int8"), default="float",
                   help="float (default): the KV cache in the activations' type; int8 (--target cpu): a "
                   "quarter of float32's memory, per-channel scales calibrated on sample text at convert "
                   "time; decodes faster, agrees slightly less (docs/edge.md)")
    p.add_argument("--calibration-text", type=Path, default=None, metavar="FILE",
                   help="--kv-cache int8: calibrate the cache on this UTF-8 text (passages separated by "
                   "blank lines; the first 32, up to 512 tokens each) instead of the built-in samples")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="weights read, transposed and quantized at once (default: one per core, up to 4); "
                   "each thread holds about one more weight in memory. The output is the same for any N")
    p.add_argument("--min-agreement", type=_fraction, default=None, metavar="F",
                   help="top-1 token agreement with the source the validation requires "
                   "(0..1; default 0.80 for int8, 0.95 for none)")
    p.add_argument("--quiet", action="store_true", help="no progress display and no report")
    p.set_defaults(func=_run)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _run(args: argparse.Namespace) -> int:
    from .convert import STAGES, ConvertError, ConvertOptions, convert_model
    from .progress import Progress

    options = ConvertOptions(args.quant, args.target, args.block_size, args.accuracy_level, args.zero_points,
                             args.kv_cache, args.calibration_text, args.threads)
    try:
        result = convert_model(args.src, args.dst, min_agreement=args.min_agreement,
                               progress=Progress(STAGES, enabled=not args.quiet), options=options)
    except ConvertError as exc:
        print(f"dsnode convert: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # torch/onnx failures: say what broke; DST was not written
        print(f"dsnode convert: error: conversion failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"wrote {result.path} ({result.manifest.quantization}, target {result.manifest.target}, "
              f"{result.seconds:.1f}s); "
              f"serve it with [model] backend = \"onnx\", path = \"{result.path}\"")
    return 0
