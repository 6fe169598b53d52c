"""How a reload puts another model (version) in service (docs/versions.md): loaded **beside** the one
serving, where memory allows — requests never wait, and the answers switch version at one moment —
or **after draining** it: no new requests for the model meanwhile (peers route around the node),
the ones in flight finish, then the new version loads. `[model] switch` chooses, or leaves it to the
arithmetic here (`auto`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import structlog

from .config import Config
from .gpu import GpuSampler
from .probe import memory_available_mib
from .versions import served_version

log = structlog.get_logger("dsnode.server")

HEADROOM = 1.25  # a model in memory takes about its files' size; a quarter more for buffers and caches
SwitchMode = Literal["beside", "drain"]


@dataclass(frozen=True)
class SwitchPlan:
    mode: SwitchMode
    why: str


def plan_switch(setting: str, need_bytes: int | None, free_bytes: int | None) -> SwitchPlan:
    """`setting`: `[model] switch`; `need_bytes`: the new model's files; `free_bytes`: memory free
    where it would load (None: not known)."""
    if setting in ("beside", "drain"):
        return SwitchPlan(setting, f'[model] switch = "{setting}"')  # type: ignore[arg-type]
    if need_bytes is None or free_bytes is None:
        return SwitchPlan("drain", "the free memory is not known")
    need = int(need_bytes * HEADROOM)
    if need <= free_bytes:
        return SwitchPlan("beside", f"{_gib(need)} needed, {_gib(free_bytes)} free")
    return SwitchPlan("drain", f"{_gib(need)} needed, only {_gib(free_bytes)} free")


def folder_bytes(folder: Path) -> int | None:
    """What the model's files weigh (the store's folders hold only the model)."""
    try:
        return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    except OSError:
        return None


def free_bytes(device: str) -> int | None:
    """Memory free where a model on `device` (the serving engine's, e.g. `cpu`, `cuda:0`) loads: the
    host's for CPUs, the GPUs' (NVML) otherwise; None when NVML can't tell."""
    if device.lower().startswith("cpu"):
        return memory_available_mib() * 2**20
    sampler = GpuSampler()
    try:
        readings = sampler.sample()
    finally:
        sampler.close()
    free = [r.memory_total_bytes - r.memory_used_bytes for r in readings
            if r.memory_total_bytes is not None and r.memory_used_bytes is not None]
    return sum(free) if free and len(free) == len(readings) else None


class SwitchingNode(Protocol):
    """What a switch needs of the node (`dsnode.node.Node`): the engine in service, the leases on it."""

    engine: Any
    config: Config
    switching: str | None

    def install(self, config: Config, engine: Any) -> Any: ...

    async def released(self, engine: Any, timeout: float) -> bool: ...


async def switch_model(node: SwitchingNode, target: Config, build: Callable[[Config], Any],
                       swapped: Callable[[], None]) -> bool:
    """Put `target`'s `[model]` in service on `node` for new requests; the old engine closes once the
    requests holding it are done (at most `drain_timeout`). True once the new model serves; False
    when it could not load (the old version serves on, or is loaded again). `swapped`: told each
    time another engine is put in service. Cancelled (a stop), it leaves no engine open but the one
    in service."""
    config = node.config.model_copy(update={"model": target.model, "model_version": target.model_version})
    version = served_version(target.model_version, target.model.label).shown()
    try:
        engine = build(config)
    except Exception as exc:  # an uninstalled backend: the version in service stays
        log.error("model_switch_failed", version=version, error=str(exc), detail="the version in service stays")
        return False
    need, device = folder_bytes(target.model.path), _device(node.engine)
    plan = plan_switch(target.model.switch, need, await asyncio.to_thread(free_bytes, device))
    log.info("model_switch_started", model=target.model.name, version=version, mode=plan.mode, why=plan.why)
    if plan.mode == "beside":
        return await _beside(node, config, engine, swapped, version)
    return await _after_drain(node, config, engine, build, swapped, version)


async def _beside(node: SwitchingNode, config: Config, engine: Any, swapped: Callable[[], None], version: str) -> bool:
    try:
        await engine.load()
    except asyncio.CancelledError:
        await engine.close()
        raise
    except Exception as exc:
        await engine.close()
        log.error("model_switch_failed", version=version, error=str(exc), detail="the version in service stays")
        return False
    old = node.install(config, engine)
    swapped()
    log.info("model_switched", version=version, mode="beside")
    await _retire(node, old)
    return True


async def _after_drain(node: SwitchingNode, config: Config, engine: Any, build: Callable[[Config], Any],
                       swapped: Callable[[], None], version: str) -> bool:
    """No new requests for the model meanwhile: the node is not ready, and peers route around it."""
    previous = node.config
    node.switching = f"switching to version {version}: draining the requests in flight"
    try:
        old = node.install(config, engine)  # new requests find it loading
        swapped()
        await _retire(node, old)
        node.switching = f"switching to version {version}: loading"
        try:
            await engine.load()
        except Exception as exc:
            log.error("model_switch_failed", version=version, error=str(exc), detail="loading the previous version")
            await engine.close()
            await _load_again(node, previous, build, swapped)
            return False
    finally:
        node.switching = None
    log.info("model_switched", version=version, mode="drain")
    return True


async def _load_again(node: SwitchingNode, previous: Config, build: Callable[[Config], Any],
                      swapped: Callable[[], None]) -> None:
    try:
        engine = build(previous)
        node.install(previous, engine)
        swapped()
        await engine.load()
    except Exception as exc:  # the node stays not ready, with the reason, for an operator
        log.error("model_reload_failed", model=previous.model.name, error=str(exc))


async def _retire(node: SwitchingNode, old: Any) -> None:
    try:
        if not await node.released(old, node.config.node.drain_timeout):
            log.warning("model_switch_drain_timeout", drain_timeout_s=node.config.node.drain_timeout,
                        detail="the requests still on the previous version end with an error")
    finally:
        await old.close()


def _device(engine: Any) -> str:
    try:
        return str(engine.info.device)
    except Exception:  # not loaded: nothing known
        return "unknown"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
