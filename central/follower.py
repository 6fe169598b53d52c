"""A follower host of a `[distributed]` group (host_index ≥ 1): its ranks, no requests of its own.

`load` meets the leader (`dsnode.central.host_group`: bounded, logged, refused with both values
named when the configurations differ), starts this host's ranks as global ranks
host_index × ranks_per_host …, and waits until they hold their shards; from then on they run the
calls global rank 0 (on the leader) broadcasts. The daemon answers `/health`, `/ready` (200 while
the group stands) and `/cluster` (the group, with the leader's address); a completion request sent
here is answered 503 naming the leader, which serves the model's requests.

When a local rank dies, the leader leaves, or a heartbeat stops, the group ends: the ranks are
killed, `failed` is set and the daemon exits 1, for systemd to start it again; it then waits for the
leader at the rendezvous, as at the first start.
"""

from __future__ import annotations

import asyncio
import os
from typing import AsyncIterator

import structlog
from dsnode.config import BatchingSection, ModelSection
from dsnode.hfconfig import read_hf_config
from dsnode.inference.engine import (
    Delta,
    Engine,
    EngineLoad,
    EngineNotReady,
    GenerationRequest,
    Health,
    ModelInfo,
)
from dsnode.inference.runner import RunnerDied
from dsnode.inference.tokenizer import TextTokenizer
from dsnode.probe import probe_gpus

from .group_link import GroupLink
from .host_group import HostGroup
from .launch import (
    LOAD_TIMEOUT_S,
    Placement,
    plan_placement,
    prepare_load,
    rank_command,
    rank_threads,
    receive,
)
from .preflight import serving_dtype
from .ranks import RankGroup
from .transformers_engine import describe_model

log = structlog.get_logger("dsnode.central")


class FollowerEngine(Engine):
    backend = "deepspeed"

    def __init__(self, model: ModelSection, batching: BatchingSection, group: HostGroup) -> None:
        super().__init__()
        self._model, self._batching, self._group = model, batching, group
        self._info: ModelInfo | None = None
        self._tokenizer: TextTokenizer | None = None
        self._ranks: RankGroup | None = None
        self._link: GroupLink | None = None
        self._failure: str | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def rank_pids(self) -> list[int]:
        return self._ranks.pids if self._ranks else []

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise EngineNotReady("joining the group")
        return self._info

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            raise EngineNotReady("joining the group")
        return self._tokenizer

    async def load(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self._load_blocking)
        except Exception as exc:
            self._failure = f"model failed to load: {exc}"
            raise

    def _load_blocking(self) -> None:
        hf_config = read_hf_config(self._model.path)
        gpus = probe_gpus()
        settings = self._group.settings
        placement = plan_placement(self._model, len(gpus), settings.ranks_per_host)
        weights = prepare_load(self._model, self._batching, hf_config, placement, gpus, settings.world_size)
        self._tokenizer = TextTokenizer.from_folder(self._model.path)
        dtype = serving_dtype(self._model.dtype, placement.device, gpus)
        self._link = self._group.form(self._model, dtype, self._group_lost)
        try:
            facts = self._start_ranks(placement, weights)
        except BaseException as exc:
            self._link.end(f"host {settings.host_index} ({self._group.node}) could not load the model: {exc}")
            if self._ranks is not None:
                self._ranks.kill()
            raise
        held = facts.get("weights", weights)  # a rank holds FP8 as int8 where its kernel fails
        extra = {**facts, "weights": held, "distributed": self._group.describe(self._link)}
        self._info = describe_model(self._model, hf_config, self.backend, self._batching,
                                    device=placement.device, tensor_parallel=settings.world_size, extra=extra)
        last = settings.first_rank + placement.ranks - 1
        log.info("follower_ready", model=self._model.name, host_index=settings.host_index,
                 leader=settings.leader, ranks=[settings.first_rank, last])

    def _start_ranks(self, placement: Placement, weights: str) -> dict[str, object]:
        """This host's ranks, until local rank 0 says they hold their shards."""
        assert self._link is not None
        if self._link.lost_reason is not None:
            raise RunnerDied(self._link.lost_reason)
        group = self._group
        command, extra = rank_command(self._model, placement, weights, self._batching), rank_threads(self._model, placement)
        self._ranks = RankGroup(placement.ranks, command=lambda rank: command,
                                env=lambda rank: group.rank_env(dict(os.environ), rank, extra),
                                on_death=self._rank_died, first_rank=group.settings.first_rank,
                                ending_elsewhere=self._link.peer_closed)
        control = self._ranks.start()
        kind, facts = receive(control, self._ranks, LOAD_TIMEOUT_S, "while loading the model")
        if kind != "ready":
            raise RunnerDied(str(facts))
        return dict(facts)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Requests go to the leader: global rank 0, which drives every rank, is there."""
        raise EngineNotReady(self._redirect())
        yield  # an async generator, like every engine's generate

    def _redirect(self) -> str:
        members = self._link.formed.members if self._link else []
        leader = next((m for m in members if m.host_index == 0), None)
        where = (f"{leader.node} ({leader.url})" if leader
                 else f"the leader (rendezvous {self._group.settings.leader})")
        return (f"this node is host {self._group.settings.host_index} of model {self._model.name}'s "
                f"[distributed] group: its requests are served by {where}")

    def health(self) -> Health:
        if self._failure:
            return Health(False, self._failure)
        if self._closing:
            return Health(False, "engine is shutting down")
        if self._info is None:
            return Health(False, f"joining the group of the leader at {self._group.settings.leader}")
        return Health(True)

    def load_figures(self) -> EngineLoad:
        return EngineLoad(0, 0, 0, self._batching.max_batch_tokens, 0.0, self._batching.max_queue)

    async def close(self) -> None:
        self._closing = True
        if self._link is not None:
            self._link.end(f"host {self._group.settings.host_index} ({self._group.node}) is stopping")
        if self._ranks is not None:
            await asyncio.to_thread(self._ranks.kill)

    # --- the group ends ----------------------------------------------------------------------------
    def _group_lost(self, reason: str) -> None:
        if self._ranks is not None:
            self._ranks.end(f"the group ended: {reason}")

    def _rank_died(self, reason: str) -> None:
        if self._link is not None:
            self._link.end(reason)  # the leader names this host itself
        if self._info is None:  # still loading: `_start_ranks` raises with this reason
            log.error("rank_died_while_loading", reason=reason)
            return
        self._failure = f"engine died: {reason}"
        log.error("engine_died", reason=reason)
        if self._loop is not None and not self._closing:
            try:
                self._loop.call_soon_threadsafe(self.failed.set)
            except RuntimeError:  # the loop is closed: nobody is left to tell
                pass
