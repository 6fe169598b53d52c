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

With `[distributed]` this engine runs on the leader (host 0) and `dsnode.central.follower` on every
other host: the daemons meet first (`dsnode.central.host_group`), then each starts its own ranks
into one torch.distributed world; any host leaving ends every host's group the same way.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Sequence

import numpy as np
import structlog
from dsnode.config import BatchingSection, Config, ModelSection
from dsnode.hfconfig import read_hf_config
from dsnode.inference.batching import BatchingEngine
from dsnode.inference.engine import Engine, EngineError
from dsnode.inference.runner import Loaded, RunnerDied
from dsnode.inference.tokenizer import TextTokenizer
from dsnode.probe import GPU, probe_gpus

from .group_link import GroupLink
from .host_group import HostGroup
from .launch import (
    CALL_TIMEOUT_S,
    LOAD_TIMEOUT_S,
    Placement,
    plan_placement,
    prepare_load,
    rank_command,
    rank_threads,
    receive,
)
from .launch import PlacementError as PlacementError  # where tests and callers have always found it
from .preflight import serving_dtype
from .ranks import RankGroup, free_port, worker_env
from .transformers_engine import describe_model

log = structlog.get_logger("dsnode.central")

FATAL_GRACE_S = 10.0  # a rank that reported a fatal error exits within this


@dataclass
class PromptCacheFigure:
    nbytes: int = 0
    capacity: int = 0  # per rank: [batching] prompt_cache_mb (each rank holds its own)


class RemoteRunner:
    """`ModelRunner` over rank 0's control socket. Called from the engine's worker thread only."""

    def __init__(self, control: Connection, ranks: RankGroup, call_timeout_s: float = CALL_TIMEOUT_S,
                 prompt_cache_bytes: int = 0) -> None:
        self._control = control
        self._ranks = ranks
        self._call_timeout_s = call_timeout_s
        self.prompts = PromptCacheFigure(capacity=prompt_cache_bytes)  # rank 0's, as of the last admission

    def prefill(self, seq_id: str, token_ids: Sequence[int], start: int) -> np.ndarray:
        return self._call(("prefill", seq_id, list(token_ids), start))  # (V,)

    def prefill_all(self, seq_id: str, token_ids: Sequence[int], start: int) -> np.ndarray:
        rows: np.ndarray = self._call(("prefill_all", seq_id, list(token_ids), start))  # (n, V): a prompt scored
        return rows

    def decode(self, seq_ids: Sequence[str], token_ids: Sequence[int]) -> np.ndarray:
        return self._call(("decode", list(seq_ids), list(token_ids)))  # (n, V)

    def reuse_prefix(self, seq_id: str, token_ids: Sequence[int], scope: str = "") -> int:
        """How many of a sequence's first tokens every rank's prompt cache holds for `scope` (they agree,
        or say 0). Rank 0 also says how many bytes its cache holds (`prompts`)."""
        cached, self.prompts.nbytes = self._call(("reuse_prefix", seq_id, list(token_ids), scope))
        return int(cached)

    def release(self, seq_id: str) -> None:
        self._send(("release", seq_id))  # no answer: it cannot fail, and saves a round trip

    def keep_prefix(self, seq_id: str) -> None:
        self._send(("keep_prefix", seq_id))  # every rank keeps its own shard; no answer, as release

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


class DeepSpeedEngine(BatchingEngine):
    backend = "deepspeed"

    def __init__(self, model: ModelSection, batching: BatchingSection,
                 group: HostGroup | None = None) -> None:
        super().__init__(batching)
        self._model = model
        self._group = group  # [distributed]: this engine is the leader's
        self._ranks: RankGroup | None = None
        self._link: GroupLink | None = None
        self._weights = "model"

    @classmethod
    def from_config(cls, config: Config) -> "BatchingEngine | Engine":
        """The leader's engine, or a follower's (`dsnode.central.follower`) with `[distributed]`."""
        group = HostGroup.from_config(config)
        if group is not None and not group.is_leader:
            from .follower import FollowerEngine

            return FollowerEngine(config.model, config.batching, group)
        return cls(config.model, config.batching, group)

    @property
    def rank_pids(self) -> list[int]:
        return self._ranks.pids if self._ranks else []

    def _load_blocking(self) -> Loaded:
        hf_config = read_hf_config(self._model.path)
        gpus = probe_gpus()
        per_host = self._group.settings.ranks_per_host if self._group else None
        placement = plan_placement(self._model, len(gpus), per_host)
        world = self._group.settings.world_size if self._group else placement.ranks
        self._weights = prepare_load(self._model, self._batching, hf_config, placement, gpus, world)
        tokenizer = TextTokenizer.from_folder(self._model.path)
        try:
            self._form_group(placement, gpus)
            ranks = self._start_ranks(placement)
            control = ranks.start()
            kind, facts = receive(control, ranks, LOAD_TIMEOUT_S, "while loading the model")
            if kind != "ready":
                raise RunnerDied(str(facts))
        except BaseException as exc:
            self._leave_group(f"the leader could not load the model: {exc}")
            if self._ranks is not None:
                self._ranks.kill()
            raise
        self._weights = facts.get("weights", self._weights)  # a rank holds FP8 as int8 where its kernel fails
        extra = {**facts, "weights": self._weights}
        if self._group is not None and self._link is not None:
            extra["distributed"] = self._group.describe(self._link)
        info = describe_model(self._model, hf_config, self.backend, self._batching,
                              device=_device_name(placement), tensor_parallel=world, extra=extra)
        log.info("model_loaded", model=info.name, backend=info.backend, device=info.device,
                 tensor_parallel=world, architecture=info.architecture, weights=self._weights,
                 max_context=info.max_context, quantization=info.quantization)
        return Loaded(RemoteRunner(control, ranks, prompt_cache_bytes=self._batching.prompt_cache_mb * 2**20),
                      tokenizer, info)

    def _form_group(self, placement: Placement, gpus: list[GPU]) -> None:
        """[distributed]: meet the followers before any rank starts (bounded by join_timeout)."""
        if self._group is None:
            return
        dtype = serving_dtype(self._model.dtype, placement.device, gpus)
        self._link = self._group.form(self._model, dtype, self._group_lost)

    def _leave_group(self, why: str) -> None:
        if self._link is not None:
            self._link.end(why)

    async def close(self) -> None:
        # followers first hear why the group ends (otherwise they see their ranks exit, and wonder)
        self._leave_group(f"the leader {self._group.node if self._group else ''} is stopping")
        await super().close()
        if self._ranks is not None and self._loaded is None:  # stopped while the ranks were loading
            await asyncio.to_thread(self._ranks.kill)

    def _start_ranks(self, placement: Placement) -> RankGroup:
        if self._link is not None and self._link.lost_reason is not None:
            raise RunnerDied(self._link.lost_reason)  # a host left before our ranks started
        command, extra, group = rank_command(self._model, placement, self._weights, self._batching), rank_threads(
            self._model, placement), self._group
        port = free_port()
        self._ranks = RankGroup(
            placement.ranks,
            command=lambda rank: command,
            env=lambda rank: (group.rank_env(dict(os.environ), rank, extra) if group is not None
                              else worker_env(dict(os.environ), rank, placement.ranks, port, extra)),
            on_death=self._rank_died,
            ending_elsewhere=self._host_left,
            first_rank=group.settings.first_rank if group is not None else 0,
        )
        return self._ranks

    def _group_lost(self, reason: str) -> None:
        """Another host left the group (its link said so, closed, or went silent): end ours."""
        if self._ranks is not None:
            self._ranks.end(f"the group ended: {reason}")

    def _host_left(self) -> bool:
        return self._link is not None and self._link.peer_closed()

    def _rank_died(self, reason: str) -> None:
        self._leave_group(reason)
        if self._loaded is None:  # still loading: `_load_blocking` raises with this reason
            log.error("rank_died_while_loading", reason=reason)
            return
        self._die(reason)


def _device_name(placement: Placement) -> str:
    if placement.device == "cpu":
        return "cpu"
    return ",".join(f"cuda:{i}" for i in range(placement.ranks))
