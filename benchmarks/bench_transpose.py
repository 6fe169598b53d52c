"""The graph builder's tiled transpose against numpy's copy of a transposed view, in the same run.

    .venv/bin/python benchmarks/bench_transpose.py [--rounds 5]

`dsnode convert` writes every linear weight (out, in) of a checkpoint as the (in, out) operand its
quantizer reads. Shapes: a 7B's (R1-Distill-Qwen-7B) gate_up, down_proj and LM head. Medians of
interleaved rounds; the ratio is numpy's time over the tiled one's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from dsnode.edge.checkpoint import transpose_into

SHAPES = {"gate_up (37888, 3584)": (37888, 3584), "down_proj (3584, 18944)": (3584, 18944),
          "lm_head (152064, 3584)": (152064, 3584)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'weight (out, in)':<26} {'numpy s':>9} {'tiled s':>9} {'ratio':>7}")
    for label, shape in SHAPES.items():
        source = rng.standard_normal(shape, dtype=np.float32)
        out = np.empty(shape[::-1], np.float32)
        plain, tiled = [], []
        for _ in range(args.rounds):
            started = time.perf_counter()
            expected = np.ascontiguousarray(source.T)
            plain.append(time.perf_counter() - started)
            started = time.perf_counter()
            transpose_into(source, out)
            tiled.append(time.perf_counter() - started)
            assert np.array_equal(out, expected)
            del expected
        a, b = statistics.median(plain), statistics.median(tiled)
        print(f"{label:<26} {a:>9.3f} {b:>9.3f} {a / b:>6.2f}x")


if __name__ == "__main__":
    main()
