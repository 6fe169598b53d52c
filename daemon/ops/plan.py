"""`dsnode plan MODEL_DIR [--gpus 16x80GB] [--hosts N] [--json]`: memory per rank, and whether it fits.

Reads only the model folder's `config.json` (no weights, no torch: it runs on an edge install too).
`--gpus` describes the GPUs of one host (`8x80GB`, `8xH100`; default: this host's, from NVML);
`--hosts` multiplies them, one rank per GPU, and the plan says what each generated token makes the
ranks exchange (all-reduce bytes per token per layer, how many per token) and how much of it
crosses the links between hosts (`dsnode.traffic`). For each weight format (bf16, fp8, int8)
it prints the weights of the fullest rank by kind, the KV-cache bytes per token, the KV tokens that fit, and a
verdict: with the routed experts sharded over the ranks (what the `deepspeed` backend does) and, for
comparison, replicated on every rank (tensor parallelism alone). Arithmetic: `dsnode.sizing`.

Exit codes: 0 the plan was printed (whether or not it fits: see the verdicts, or `fits` in --json);
1 the model folder or the GPUs could not be read; 2 a malformed argument.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..hfconfig import ModelFolderError, read_hf_config
from ..sizing import (
    FORMATS,
    KIND_LABELS,
    KINDS,
    MIN_COMPUTE_CAPABILITY,
    PLAN_FORMATS,
    USABLE_FRACTION,
    Fit,
    ModelShape,
    describe_spread,
    fit,
    gb,
    model_shape,
)
from ..traffic import Traffic, traffic

EXIT_OK, EXIT_UNREADABLE, EXIT_USAGE = 0, 1, 2
DEFAULT_KV_TOKENS = 32768  # the default [batching] max_batch_tokens
GIB = 2**30

# name → (memory, compute capability); memory as the makers count it ("80GB" is 80 GiB)
KNOWN_GPUS = {
    "H200": (141 * GIB, "9.0"),
    "H100": (80 * GIB, "9.0"),
    "A100-80GB": (80 * GIB, "8.0"),
    "A100": (40 * GIB, "8.0"),
    "A40": (48 * GIB, "8.6"),
    "L40S": (48 * GIB, "8.9"),
    "T4": (16 * GIB, "7.5"),
}


@dataclass(frozen=True)
class Gpus:
    """The GPUs of one host: how many, memory of each, and what they are when known."""

    count: int
    memory: int  # bytes
    name: str | None = None
    compute_capability: str | None = None

    def describe(self) -> str:
        what = f"{self.name}, " if self.name else ""
        cc = f", compute capability {self.compute_capability}" if self.compute_capability else ""
        return f"{self.count} × {what}{self.memory / GIB:.0f} GiB{cc}"


class PlanError(Exception):
    def __init__(self, message: str, code: int = EXIT_UNREADABLE) -> None:
        super().__init__(message)
        self.code = code


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("plan", help="memory per rank of a model and whether it fits these GPUs")
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR",
                   help="a model folder (only config.json is read)")
    p.add_argument("--gpus", help="GPUs of one host: COUNTxMEMORY (16x80GB) or COUNTxNAME (8xH100); "
                                  "default: this host's")
    p.add_argument("--hosts", type=int, default=1, help="hosts with those GPUs, one rank per GPU (default 1)")
    p.add_argument("--kv-tokens", type=int, default=DEFAULT_KV_TOKENS,
                   help="KV-cache tokens a rank must hold ([batching] max_batch_tokens; "
                        f"default {DEFAULT_KV_TOKENS})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        gpus = parse_gpus(args.gpus) if args.gpus else local_gpus()
        if args.hosts < 1 or args.kv_tokens < 1:
            raise PlanError("--hosts and --kv-tokens must be at least 1", EXIT_USAGE)
        shape = model_shape(read_hf_config(args.model_dir))
    except PlanError as exc:
        print(f"dsnode plan: {exc}", file=sys.stderr)
        return exc.code
    except ModelFolderError as exc:
        print(f"dsnode plan: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    plan = build_plan(shape, gpus, args.hosts, args.kv_tokens)
    print(json.dumps(plan_json(plan), indent=2) if args.json else format_plan(plan))
    return EXIT_OK


def parse_gpus(text: str) -> Gpus:
    match = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\S+)\s*", text)
    if not match or int(match.group(1)) < 1:
        raise PlanError(f"--gpus {text!r}: expected COUNTxMEMORY (16x80GB) or COUNTxNAME (8xH100)",
                        EXIT_USAGE)
    count, what = int(match.group(1)), match.group(2)
    memory = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(GB|GiB|G)", what, re.IGNORECASE)
    if memory:
        return Gpus(count, int(float(memory.group(1)) * GIB))
    known = {name.upper(): name for name in KNOWN_GPUS}
    name = known.get(what.upper().removeprefix("NVIDIA-"))
    if name is None:
        raise PlanError(f"--gpus {text!r}: unknown GPU {what!r}; give its memory (8x48GB) or one of "
                        f"{', '.join(KNOWN_GPUS)}", EXIT_USAGE)
    size, cc = KNOWN_GPUS[name]
    return Gpus(count, size, name, cc)


def local_gpus() -> Gpus:
    from ..probe import probe_gpus

    found = probe_gpus()
    if not found:
        raise PlanError("this host has no NVIDIA GPU (none found through NVML): describe the GPUs with "
                        "--gpus, e.g. --gpus 8x80GB")
    smallest = min(found, key=lambda g: g.memory_total_mib)
    names = {g.name for g in found}
    return Gpus(len(found), smallest.memory_total_mib * 2**20, names.pop() if len(names) == 1 else None,
                smallest.compute_capability)


# --- the plan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    gpus: Gpus
    hosts: int
    sharded: dict[str, Fit]  # format → fit, experts spread over the ranks
    replicated: dict[str, Fit]  # format → fit, every expert on every rank
    traffic: dict[str, Traffic]  # format → what a token makes the ranks exchange (experts spread)

    @property
    def ranks(self) -> int:
        return self.gpus.count * self.hosts


def build_plan(shape: ModelShape, gpus: Gpus, hosts: int, kv_tokens: int) -> Plan:
    ranks = gpus.count * hosts

    def fits(sharded: bool) -> dict[str, Fit]:
        return {name: fit(shape, ranks, gpus.memory, FORMATS[name], kv_tokens, experts_sharded=sharded)
                for name in PLAN_FORMATS}

    exchanges = {name: traffic(shape, ranks, hosts, FORMATS[name]) for name in PLAN_FORMATS}
    return Plan(shape, gpus, hosts, fits(True), fits(False), exchanges)


def format_unusable(fmt: str, gpus: Gpus) -> str | None:
    """Why these GPUs cannot compute in `fmt`, or None (also when the GPU is not known)."""
    need = MIN_COMPUTE_CAPABILITY.get(fmt)
    if need is None or gpus.compute_capability is None:
        return None
    major, minor = (int(x) for x in gpus.compute_capability.split("."))
    if (major, minor) >= need:
        return None
    return f"needs compute capability {need[0]}.{need[1]}+ (these GPUs: {gpus.compute_capability})"


def format_plan(plan: Plan) -> str:
    shape, ranks = plan.shape, plan.ranks
    lines = [
        f"model: {shape.architecture} ({shape.model_type}), {shape.total_params / 1e9:.1f}B parameters"
        + (f", routed experts {shape.routed_expert_params / 1e9:.1f}B (top-{shape.experts_per_token})"
           if shape.routed_experts else ""),
        f"GPUs: {plan.hosts} host(s) × {plan.gpus.describe()} = {ranks} ranks; usable per GPU "
        f"{gb(plan.gpus.memory * USABLE_FRACTION)} ({USABLE_FRACTION:.0%})",
    ]
    if shape.routed_experts:
        lines.append(f"experts: {describe_spread(shape.routed_experts, ranks)}")
    lines += ["", _table(plan), "", *_traffic_lines(plan)]
    if shape.routed_experts:
        lines += ["", "experts replicated on every rank (tensor parallelism only), for comparison:"]
        lines += [f"  {name:5} weights/rank {gb(f.weights):>9}  {f.verdict}"
                  for name, f in plan.replicated.items()]
    lines += ["", "GB = 10^9 bytes; rank 0 (the fullest) shown; bf16: AutoTP splits attention, dense MLP "
                  "and head; fp8/int8: those stay whole on every rank."]
    return "\n".join(lines)


def _table(plan: Plan) -> str:
    fits = plan.sharded
    header = ["weights per rank"] + list(fits)
    rows = [[KIND_LABELS[k]] + [gb(f.weights_by_kind[k]) for f in fits.values()] for k in KINDS]
    rows.append(["total"] + [gb(f.weights) for f in fits.values()])
    kv_kind = "MLA latent" if plan.shape.kv_heads == 0 else "K+V"
    rows.append([f"KV cache per token ({kv_kind})"]
                + [f"{f.kv_bytes_per_token / 1024:.1f} KiB" for f in fits.values()])
    rows.append(["KV tokens that fit"] + [f"{f.kv_tokens_fit:,}" for f in fits.values()])
    rows.append(["verdict"] + [_short_verdict(name, f, plan.gpus) for name, f in fits.items()])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in [header, *rows]]
    notes = [f"  {name}: {f.verdict}" for name, f in fits.items() if not f.fits]
    notes += [f"  {name}: {why}" for name in fits if (why := format_unusable(name, plan.gpus))]
    return "\n".join(out + notes)


def _traffic_lines(plan: Plan) -> list[str]:
    """Per generated token: the all-reduces of each format, and what crosses the links between hosts."""
    if plan.ranks < 2:
        return ["between ranks: nothing (one rank)"]
    first = next(iter(plan.traffic.values()))
    lines = [f"between ranks, per generated token (bf16 activations): one all-reduce per layer = "
             f"{_kib(first.per_layer)} (the hidden state of {plan.shape.hidden_size})"]
    for name, t in plan.traffic.items():
        parts = ", ".join(f"{n} {_TRAFFIC_LABELS[k]}" for k, n in t.all_reduces.items())
        head = f" + head logits {_kib(t.head)}" if t.head else ""
        crossing = (f"crosses hosts: {_kib(t.per_host_link)} per host link, each way" if plan.hosts > 1
                    else "crosses hosts: nothing (one host)")
        lines.append(f"  {name:5} {sum(t.all_reduces.values())} all-reduces ({parts}){head} = "
                     f"{_kib(t.per_token)}; {crossing}")
    if plan.hosts > 1:
        lines.append(f"  (ring all-reduce over {plan.ranks} ranks, a host's ranks adjacent: each host link "
                     f"carries 2(N-1)/N = {2 * (plan.ranks - 1) / plan.ranks:.3f} of every all-reduce)")
    return lines


_TRAFFIC_LABELS = {"attention": "attention", "dense_mlp": "dense MLP", "moe": "MoE"}


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def _short_verdict(name: str, f: Fit, gpus: Gpus) -> str:
    if format_unusable(name, gpus):
        return "not on these GPUs"
    return "fits" if f.fits else "does not fit"


def plan_json(plan: Plan) -> dict[str, Any]:
    shape = plan.shape
    return {
        "model": {"architecture": shape.architecture, "model_type": shape.model_type,
                  "parameters": shape.total_params, "routed_expert_parameters": shape.routed_expert_params,
                  "routed_experts": shape.routed_experts, "moe_layers": shape.moe_layers},
        "gpus": {"hosts": plan.hosts, "per_host": plan.gpus.count, "memory_bytes": plan.gpus.memory,
                 "name": plan.gpus.name, "compute_capability": plan.gpus.compute_capability},
        "ranks": plan.ranks,
        "usable_fraction": USABLE_FRACTION,
        "experts_sharded": {name: _fit_json(f, plan.gpus) for name, f in plan.sharded.items()},
        "experts_replicated": {name: _fit_json(f, plan.gpus) for name, f in plan.replicated.items()},
        "between_ranks": {name: _traffic_json(t) for name, t in plan.traffic.items()},
    }


def _traffic_json(t: Traffic) -> dict[str, Any]:
    return {"all_reduce_bytes_per_token_per_layer": t.per_layer, "all_reduces_per_token": t.all_reduces,
            "head_all_reduce_bytes_per_token": t.head, "bytes_per_token": t.per_token,
            "hosts": t.hosts, "bytes_per_token_per_host_link": t.per_host_link}


def _fit_json(f: Fit, gpus: Gpus) -> dict[str, Any]:
    return {
        "weights_bytes": f.weights, "weights_bytes_by_kind": f.weights_by_kind,
        "weights_bytes_per_rank": f.weights_per_rank,
        "kv_bytes_per_token": f.kv_bytes_per_token, "kv_tokens_fit": f.kv_tokens_fit,
        "kv_tokens_needed": f.kv_tokens_needed, "usable_bytes_per_rank": f.usable_per_rank,
        "fits": f.fits and format_unusable(f.format, gpus) is None, "verdict": f.verdict,
        "unusable": format_unusable(f.format, gpus),
    }
