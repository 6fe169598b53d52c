"""`backend = "deepspeed"`: the MoE model on PyTorch + DeepSpeed, tensor parallel over the host's GPUs.

The daemon process holds the scheduler, sampling and detokenizing (`BatchingEngine`), and no torch.
Before any rank starts it checks that the configuration fits (`dsnode.central.preflight`) and that the
checkpoint's files are all there. The model lives in `tensor_parallel` worker processes
(`dsnode.central.tp_worker`), one per GPU, started and watched by `dsnode.central.ranks.RankGroup`;
each holds its share of the routed experts (`dsnode.central.expert_parallel`). `RemoteRunner` is the
`ModelRunner` the engine drives: each prefill / decode goes to rank 0 over a socket, rank 0 broadcasts
it, every rank runs it on its shard, rank 0 answers with the logits. On CPU the same path runs with
gloo (tests, development).

A rank that dies, or does not answer within `CALL_TIMEOUT_S`, ends the group: the others are killed
(they would wait forever in a collective), every request gets a clean error, /ready says why, and the
daemon exits 1 so systemd restarts it (`BatchingEngine.failed`).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Sequence

import numpy as np
import structlog
from dsnode.config import BatchingSection, ModelSection
from dsnode.hfconfig import ModelFolderError, read_hf_config
from dsnode.inference.batching import BatchingEngine, Loaded, RunnerDied
from dsnode.inference.engine import EngineError
from dsnode.inference.tokenizer import TextTokenizer
from dsnode.probe import GPU, probe_gpus
from dsnode.sizing import model_shape

from .checkpoint import Checkpoint
from .preflight import check_fits
from .ranks import RankGroup, free_port, worker_env
from .transformers_engine import describe_model

log = structlog.get_logger("dsnode.central")

LOAD_TIMEOUT_S = 3600.0  # a 671B checkpoint takes long to read; a hung rank still ends here
CALL_TIMEOUT_S = 600.0  # one prefill chunk or decode step; far above any healthy step
POLL_S = 0.2  # how often a waiting call checks the ranks are alive
FATAL_GRACE_S = 10.0  # a rank that reported a fatal error exits within this


class PlacementError(ModelFolderError):
    pass


@dataclass(frozen=True)
class Placement:
    ranks: int
    device: str  # "cuda" (one GPU per rank) or "cpu"


def plan_placement(model: ModelSection, gpus: int) -> Placement:
    """How many ranks on which device: `[model] tensor_parallel`, by default every local GPU (one
    rank on CPU, or when bitsandbytes quantization is on)."""
    if model.device == "cuda" and gpus == 0:
        raise PlacementError("model.device = 'cuda' but this host has no NVIDIA GPU")
    device = "cuda" if model.device == "cuda" or (model.device == "auto" and gpus > 0) else "cpu"
    quantized = model.quantization != "none"
    ranks = model.tensor_parallel or (gpus if device == "cuda" and not quantized else 1)
    if quantized and ranks > 1:
        raise PlacementError(
            f"model.quantization = {model.quantization!r} needs tensor_parallel = 1 (got {ranks}): "
            "DeepSpeed cannot shard bitsandbytes layers"
        )
    if device == "cuda" and ranks > gpus:
        raise PlacementError(f"model.tensor_parallel = {ranks} but this host has {gpus} GPUs")
    return Placement(ranks, device)


class RemoteRunner:
    """`ModelRunner` over rank 0's control socket. Called from the engine's worker thread only."""

    def __init__(self, control: Connection, ranks: RankGroup, call_timeout_s: float = CALL_TIMEOUT_S) -> None:
        self._control = control
        self._ranks = ranks
        self._call_timeout_s = call_timeout_s

    def prefill(self, seq_id: str, token_ids: Sequence[int], start: int) -> np.ndarray:
        return self._call(("prefill", seq_id, list(token_ids), start))  # (V,)

    def decode(self, seq_ids: Sequence[str], token_ids: Sequence[int]) -> np.ndarray:
        return self._call(("decode", list(seq_ids), list(token_ids)))  # (n, V)

    def release(self, seq_id: str) -> None:
        self._send(("release", seq_id))  # no answer: it cannot fail, and saves a round trip

    def close(self) -> None:
        self._ranks.expect_exit()
        if self._ranks.dead_reason is None:
            try:
                self._control.send(("close",))
            except OSError:
                pass
        self._ranks.stop()
        self._control.close()

    def _call(self, call: tuple[Any, ...]) -> Any:
        self._send(call)
        kind, payload = receive(self._control, self._ranks, self._call_timeout_s, f"a {call[0]} call")
        if kind == "ok":
            return payload
        if kind == "error":
            raise EngineError(payload)
        # "fatal": rank 0 is exiting, often because a peer died under its collective; the watcher's
        # account names the first cause, so wait for it and log rank 0's own words beside it
        log.error("rank_fatal", rank=0, message=str(payload)[:500])
        raise RunnerDied(self._ranks.wait_dead(FATAL_GRACE_S) or str(payload))

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._control.send(message)
        except OSError as exc:
            raise RunnerDied(self._ranks.wait_dead(1.0) or f"rank 0's control socket is closed ({exc})") from None


def receive(control: Connection, ranks: RankGroup, timeout_s: float, what: str) -> tuple[str, Any]:
    """Rank 0's next message, or RunnerDied if a rank dies or nothing comes within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not control.poll(POLL_S):
        if ranks.dead_reason is not None:
            raise RunnerDied(ranks.dead_reason)
        if time.monotonic() > deadline:
            ranks.kill()
            raise RunnerDied(f"rank 0 did not answer {what} within {timeout_s:.0f}s; the ranks were killed")
    try:
        message: tuple[str, Any] = control.recv()
    except (EOFError, OSError):
        raise RunnerDied(ranks.wait_dead(2.0) or "rank 0 closed its control socket") from None
    return message


class DeepSpeedEngine(BatchingEngine):
    backend = "deepspeed"

    def __init__(self, model: ModelSection, batching: BatchingSection) -> None:
        super().__init__(batching)
        self._model = model
        self._ranks: RankGroup | None = None

    @property
    def rank_pids(self) -> list[int]:
        return self._ranks.pids if self._ranks else []

    def _load_blocking(self) -> Loaded:
        hf_config = read_hf_config(self._model.path)
        gpus = probe_gpus()
        placement = plan_placement(self._model, len(gpus))
        self._check_before_loading(hf_config, placement, gpus)
        tokenizer = TextTokenizer.from_folder(self._model.path)
        ranks = self._start_ranks(placement)
        try:
            control = ranks.start()
            kind, facts = receive(control, ranks, LOAD_TIMEOUT_S, "while loading the model")
            if kind != "ready":
                raise RunnerDied(str(facts))
        except BaseException:
            ranks.kill()
            raise
        info = describe_model(
            self._model, hf_config, self.backend, self._batching,
            device=_device_name(placement),
            tensor_parallel=placement.ranks,
            extra=facts,
        )
        log.info("model_loaded", model=info.name, backend=info.backend, device=info.device,
                 tensor_parallel=placement.ranks, architecture=info.architecture,
                 max_context=info.max_context, quantization=info.quantization)
        return Loaded(RemoteRunner(control, ranks), tokenizer, info)

    def _check_before_loading(self, hf_config: dict[str, Any], placement: Placement, gpus: list[GPU]) -> None:
        """Refuse what cannot work before any rank starts: the plan does not fit (DoesNotFit), an
        architecture the shard loader does not know, more ranks than experts, a broken checkpoint."""
        sharded = self._model.quantization == "none"  # bitsandbytes loads through transformers instead
        plan = check_fits(self._model, hf_config, self._batching, placement.ranks, placement.device, gpus,
                          require_supported=sharded)
        if plan is None or not sharded:
            return
        shape = model_shape(hf_config)
        if shape.routed_experts and placement.ranks > shape.routed_experts:
            raise PlacementError(f"model.tensor_parallel = {placement.ranks} is more than the "
                                 f"{shape.routed_experts} routed experts per layer: a rank would hold none")
        # index, headers and dtypes: a missing shard or an FP8 tensor is named here, before any rank starts
        Checkpoint.open(self._model.path).check_dtypes()

    async def close(self) -> None:
        await super().close()
        if self._ranks is not None and self._loaded is None:  # stopped while the ranks were loading
            await asyncio.to_thread(self._ranks.kill)

    def _start_ranks(self, placement: Placement) -> RankGroup:
        model_json = self._model.model_dump_json()
        port = free_port()
        command = [sys.executable, "-m", "dsnode.central.tp_worker", "--model", model_json,
                   "--device", placement.device, "--parent-pid", str(os.getpid())]
        threads = self._model.threads or max(1, (os.cpu_count() or 1) // placement.ranks)
        extra = {"OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": placement.device}
        self._ranks = RankGroup(
            placement.ranks,
            command=lambda rank: command,
            env=lambda rank: worker_env(dict(os.environ), rank, placement.ranks, port, extra),
            on_death=self._rank_died,
        )
        return self._ranks

    def _rank_died(self, reason: str) -> None:
        if self._loaded is None:  # still loading: `_load_blocking` raises with this reason
            log.error("rank_died_while_loading", reason=reason)
            return
        self._die(reason)


def _device_name(placement: Placement) -> str:
    if placement.device == "cpu":
        return "cpu"
    return ",".join(f"cuda:{i}" for i in range(placement.ranks))
