"""Where a decode step's time goes, per operator: a dsnode GQA graph beside an onnxruntime-genai one.

    taskset -c 1 .venv/bin/python benchmarks/profile_edge_step.py dsnode /tmp/bench/dsnode-int8 --batch 8
    taskset -c 1 .venv/bin/python benchmarks/profile_edge_step.py genai /tmp/bench/genai-int8 --batch 8

(folders from `bench_edge.py --work /tmp/bench`). Both graphs run bare in onnxruntime (one thread),
with the KV buffer bound in place as past and present, `--context` tokens already cached, for
`--steps` decode steps under onnxruntime's profiler; prints the median step time and, per operator
type, the mean time per step and the kernel count (the first two steps are left out: warm-up).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

WARM_STEPS = 2


def session(folder: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path("/tmp") / f"profile-{folder.name}")
    return ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])


def bind_cache(s: ort.InferenceSession, binding: ort.IOBinding, batch: int, length: int,
               folder: Path) -> list[np.ndarray]:
    first = next(i for i in s.get_inputs() if i.name == "past_key_values.0.key")
    layers = sum(1 for i in s.get_inputs() if i.name.startswith("past_key_values.") and i.name.endswith(".key"))
    head_dim = first.shape[3]
    if not isinstance(head_dim, int):  # genai names it; its config has the number
        head_dim = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    shape = [batch, first.shape[1], length, head_dim]  # (B, kv_heads, max_len, head_dim)
    buffers = []
    rng = np.random.default_rng(0)
    for layer in range(layers):
        for kv in ("key", "value"):
            # values, not np.zeros: pages nothing has written all map to one zero page, and reading
            # them costs almost nothing; a served cache has been written by its prefill
            buffer = rng.standard_normal(shape, np.float32)
            if first.type == "tensor(int8)":  # `dsnode convert --kv-cache int8`
                buffer = np.clip(buffer * 40, -127, 127).astype(np.int8)
            buffers.append(buffer)
            binding.bind_input(f"past_key_values.{layer}.{kv}", "cpu", 0, buffer.dtype, shape, buffer.ctypes.data)
            binding.bind_output(f"present.{layer}.{kv}", "cpu", 0, buffer.dtype, shape, buffer.ctypes.data)
    return buffers


def step_inputs(kind: str, binding: ort.IOBinding, batch: int, cached: int, vocab: int,
                picks_positions: bool = False) -> list[np.ndarray]:
    """Binds this step's inputs and logits; the caller keeps the arrays alive until the run is done."""
    arrays = {"input_ids": np.full((batch, 1), 7, np.int64)}
    if kind == "dsnode":
        arrays |= {"seqlens_k": np.full(batch, cached, np.int32),
                   "total_sequence_length": np.array(cached + 1, np.int32)}
        if picks_positions:  # converted since 2026-12-01: which positions get logits
            arrays["last_position"] = np.array(-1, np.int64)
        logits = np.empty((batch, vocab), np.float32)
    else:  # genai derives both from an attention mask over the whole sequence
        arrays["attention_mask"] = np.ones((batch, cached + 1), np.int64)
        logits = np.empty((batch, 1, vocab), np.float32)
    for name, array in arrays.items():
        binding.bind_cpu_input(name, array)
    binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
    return [*arrays.values(), logits]


def per_operator(profile: Path, steps: int) -> list[tuple[str, float, int]]:
    events = [e for e in json.loads(profile.read_text()) if e.get("cat") == "Node"
              and e["name"].endswith("_kernel_time")]
    per_step = collections.defaultdict(list)
    for event in events:
        per_step[event["args"]["op_name"]].append(event["dur"])
    rows = []
    for op, durations in per_step.items():  # in time order: the first WARM_STEPS steps' kernels come first
        count = len(durations) // steps
        rows.append((op, sum(durations[WARM_STEPS * count:]) / (steps - WARM_STEPS) / 1000, count))
    return sorted(rows, key=lambda row: -row[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("dsnode", "genai"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=520)
    parser.add_argument("--length", type=int, default=640, help="KV buffer length (max_len)")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    s = session(args.folder)
    vocab = int(s.get_outputs()[0].shape[-1])
    binding = s.io_binding()
    buffers = bind_cache(s, binding, args.batch, args.length, args.folder)
    times = []
    for step in range(args.steps):
        alive = step_inputs(args.kind, binding, args.batch, args.context + step, vocab,
                            "last_position" in {i.name for i in s.get_inputs()})
        started = time.perf_counter()
        s.run_with_iobinding(binding)
        times.append(time.perf_counter() - started)
        del alive
    del buffers
    rows = per_operator(Path(s.end_profiling()), args.steps)
    print(f"{args.kind} {args.folder.name} batch {args.batch}: median step "
          f"{1000 * statistics.median(times[WARM_STEPS:]):.1f} ms, {sum(n for _, _, n in rows)} kernels per step")
    for op, ms, count in rows[:10]:
        print(f"  {op:<36} {ms:8.2f} ms/step  x{count}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
