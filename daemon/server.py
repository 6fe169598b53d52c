"""`dsnode serve`: the node's life, as a written sequence.

start:  listen (so /health answers while loading) → load the model → ready
reload: SIGHUP → re-read the file → apply it whole, or keep the old one and log why; another
        `[model]` (version) is put in service beside the old one or after draining it
        (`dsnode.model_switch`), without dropping a request
stop:   SIGTERM/SIGINT → stop listening → let in-flight requests finish (up to drain_timeout) →
        fail what is left with a clean error → close the engine and background tasks → exit 0

Under systemd (Type=notify) each step is also told to the service manager: STATUS= texts for
`systemctl status`, READY=1 once the port serves the loaded model, RELOADING=1/READY=1 around a
reload, STOPPING=1 at the drain, and WATCHDOG=1 from the event loop (see `dsnode.systemd`).
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import ssl
import time
from pathlib import Path
from typing import Callable

import structlog
from aiohttp import web

from .api.app import create_app
from .api.auth import AUTH
from .api.canary import served_versions
from .api.forward import cut_forwarded
from .api.protocol import Runner
from .cluster.splits import cluster_problems
from .config import Config, ConfigError, load_config
from .inference.backends import BackendUnavailable, build_engine
from .inference.engine import Engine
from .logs import configure_logging
from .metrics import METRICS
from .model_switch import switch_model
from .nccl_result import result_path
from .node import Node
from .probe import probe_host
from .systemd import Notifier, SystemdEnv, watchdog_pings
from .tasks import Supervised, log_failure
from .versions import served_version

log = structlog.get_logger("dsnode.server")

Reloader = Callable[[Config, Config], None]  # (old, new): apply the parts this component owns
EngineBuilder = Callable[[Config], Engine]
CLEANUP_TIMEOUT_S = 5.0
DRAIN_POLL_S = 0.05
# What a stop may take beyond drain_timeout (engine close, connection cleanup), told to systemd
# with EXTEND_TIMEOUT_USEC so that a long drain_timeout is not cut short by TimeoutStopSec=.
STOP_MARGIN_S = 2 * CLEANUP_TIMEOUT_S + 10.0

# Settings a reload cannot change in a running process (they need `systemctl restart dsnode`).
# `[model]` is switched by a reload (`_switch_model`), except on a host of a `[distributed]` group.
RESTART_ONLY = ("node", "batching", "tls", "logging", "distributed")


class NodeServer:
    def __init__(self, config: Config, engine: Engine | None = None, systemd: SystemdEnv | None = None,
                 state_directory: str | None = None, build: EngineBuilder = build_engine) -> None:
        self.config = config
        self.path = config.source
        self.build = build  # makes the engine of another [model] on reload
        self.node = Node(config, engine if engine is not None else build(config), probe_host())
        self.app = create_app(self.node, result_path(state_directory))
        # [routing]: weights, upstreams, splits; [auth]: the key and secret files, re-read on every reload
        self.reloaders: list[Reloader] = [self.node.upstreams.reload, self._reload_splits, self.app[AUTH].reload]
        self._swapped = asyncio.Event()  # another engine was put in service (a model switch)
        self.systemd = systemd or SystemdEnv()
        self.notifier = Notifier.from_env(self.systemd)
        self.serving = False  # READY=1 was sent: the model is loaded and the port answers
        self.stopped_while_loading = False
        self.load_exit_code = 1  # exit code when the model fails to load
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()  # a second SIGTERM/SIGINT: skip the rest of the drain
        self._reloading: asyncio.Task[None] | None = None
        self._reload_wanted = False

    async def run(self) -> int:
        """The whole life of the node; returns the process exit code."""
        self._install_signal_handlers()
        pinger = self._start_watchdog()
        try:
            return await self._lifecycle()
        finally:
            if pinger is not None:
                await pinger.stop()
                self.node.tasks.remove(pinger)
            if self._reloading is not None:
                self._reloading.cancel()
                await asyncio.gather(self._reloading, return_exceptions=True)
            self.notifier.close()
            self._remove_signal_handlers()

    @property
    def engine(self) -> Engine:
        """The engine in service (a reload may put another in service)."""
        return self.node.engine

    def stop(self) -> None:
        if self._stop.is_set():
            self._hurry.set()
        self._stop.set()

    async def _lifecycle(self) -> int:
        listen, model = self.config.node.listen, self.config.model
        self.notifier.status(f"starting: listening on {listen}")
        # Runner: what aiohttp answers by itself (a refused request head) in OpenAI's error shape
        runner = Runner(self.app, handler_cancellation=True, access_log=None,
                        shutdown_timeout=CLEANUP_TIMEOUT_S,
                        # an idle connection, or one still sending its request head, is
                        # closed after this (aiohttp's own default is an hour)
                        keepalive_timeout=self.config.node.idle_timeout)
        await runner.setup()
        site = web.TCPSite(runner, self.config.node.host, self.config.node.port,
                           ssl_context=_ssl_context(self.config), reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            log.error("listen_failed", listen=listen, error=str(exc))
            self.notifier.status(f"failed: cannot listen on {listen}: {exc.strerror or exc}")
            await runner.cleanup()
            return 1
        log.info("listening", url=self.node.url, listen=listen)
        self.notifier.status(f"loading model {model.name} ({model.backend}) from {model.path}")
        code = 0
        if await self._load_engine():
            info = self.engine.info
            log.info("ready", model=info.name, backend=info.backend, max_context=info.max_context,
                     device=info.device)
            self.serving = True
            self.notifier.ready(self._serving_status())
            code = await self._until_stop_or_engine_failure()
        elif not self.stopped_while_loading:
            code = self.load_exit_code
            self.notifier.status(f"failed: model {model.name} did not load (see the journal)")
        await self._shutdown(runner, site)
        return code

    def _serving_status(self) -> str:
        if not self.engine.health().ready:  # a model switch that could not load either version
            return f"not serving: {self.node.readiness().reason}"
        info = self.engine.info
        return f"serving 1 model ({info.name}, {info.backend} on {info.device}) at {self.node.url}"

    def _start_watchdog(self) -> Supervised | None:
        interval = self.systemd.watchdog_interval_s
        if interval is None or not self.config.node.watchdog or not self.notifier.enabled:
            return None
        pinger = Supervised("systemd-watchdog", lambda: watchdog_pings(self.notifier, interval))
        pinger.start()
        self.node.tasks.append(pinger)
        return pinger

    async def _until_stop_or_engine_failure(self) -> int:
        """0 on SIGTERM; 1 if the engine in service fails for good (a tensor-parallel rank died): its
        requests have had their error, and exiting non-zero lets systemd's Restart=on-failure start afresh."""
        while True:
            engine = self.engine
            self._swapped.clear()
            waits = [asyncio.ensure_future(e.wait()) for e in (self._stop, engine.failed, self._swapped)]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            if self._stop.is_set():
                return 0
            if engine.failed.is_set() and engine is self.engine:
                log.error("engine_failed", reason=engine.health().reason, action="exit 1 for a restart")
                return 1

    # --- phases -------------------------------------------------------------------------------
    async def _load_engine(self) -> bool:
        loading = asyncio.create_task(self.engine.load())
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not loading.done():  # asked to stop while loading
            self.stopped_while_loading = True
            log.info("stopped_while_loading", model=self.config.model.name)
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            return False
        if loading.exception() is not None:
            log.error("model_load_failed", model=self.config.model.name, error=str(loading.exception()))
            # a load error may name its own exit code (dsnode.sizing.DoesNotFit: 78, which systemd does not retry)
            self.load_exit_code = getattr(loading.exception(), "exit_code", 1)
            return False
        return True

    async def _shutdown(self, runner: web.AppRunner, site: web.TCPSite) -> None:
        """Stop listening → drain (up to drain_timeout) → fail the rest cleanly → close."""
        node, timeout = self.node, self.config.node.drain_timeout
        node.draining = True  # /ready turns 503; a request on a kept-alive connection gets a 503
        self.notifier.stopping(self._draining_status(timeout), extend_s=timeout + STOP_MARGIN_S)
        log.info("draining", in_flight=node.in_flight, drain_timeout_s=timeout)
        await site.stop()  # no new connections
        if not await self._drain(timeout):
            log.warning("drain_timeout", cancelled=node.in_flight, drain_timeout_s=timeout)
        self.notifier.status(f"stopping: {node.in_flight} requests cut short" if node.in_flight else "stopping")
        # What is left ends with a clean error (code `shutting_down`): a streaming client gets an
        # error event then `data: [DONE]`, a waiting one a 503 in OpenAI's error shape. Forwarded
        # requests are told here; closing the engine fails every generation still running.
        # runner.cleanup() gives those handlers time to write it.
        cut_forwarded(self.app)
        if self._reloading is not None:  # a model switch under way closes the engines it holds
            self._reloading.cancel()
            await asyncio.gather(self._reloading, return_exceptions=True)
        await self.engine.close()
        await runner.cleanup()
        log.info("stopped")

    async def _drain(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if the deadline (or a second signal) came first."""
        node = self.node
        deadline = time.monotonic() + timeout
        while node.in_flight > 0 and not self._hurry.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.notifier.status(self._draining_status(left))
            try:
                await asyncio.wait_for(self._hurry.wait(), min(DRAIN_POLL_S, left))
            except asyncio.TimeoutError:
                pass
        return node.in_flight == 0

    def _draining_status(self, left_s: float) -> str:
        n = self.node.in_flight
        return f"draining: {n} request{'' if n == 1 else 's'} in flight, up to {left_s:.0f}s more"

    # --- reload -------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._schedule_reload)

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def _schedule_reload(self) -> None:
        """SIGHUP. One reload at a time; a SIGHUP during one makes one more (the file may have
        changed again since it was read)."""
        self._reload_wanted = True
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.get_running_loop().create_task(self._reload_while_wanted(), name="reload")
            self._reloading.add_done_callback(log_failure)

    async def _reload_while_wanted(self) -> None:
        while self._reload_wanted:
            self._reload_wanted = False
            await self.reload()

    async def reload(self) -> bool:
        """Re-read the config file; apply it whole or not at all. Returns whether it was applied.

        systemd hears RELOADING=1 before and READY=1 after, whatever the outcome (the old settings
        stay on failure); not before the first READY=1, nor once stopping."""
        if self.path is None:
            return False
        announce = self.serving and not self.node.draining
        if announce:
            self.notifier.reloading(f"reloading {self.path}")
        applied = False
        try:
            applied = await self._apply_file()
        finally:
            if announce:
                refused = "" if applied else "; the last reload was refused (see the journal)"
                self.notifier.ready(self._serving_status() + refused)
        return applied

    async def _apply_file(self) -> bool:
        assert self.path is not None
        try:
            new = await asyncio.to_thread(load_config, self.path)
        except ConfigError as exc:
            log.error("config_reload_failed", file=str(self.path), problems=[str(p) for p in exc.problems])
            self.app[METRICS].count_reload(False)
            return False
        old = self.config
        frozen = [s for s in RESTART_ONLY if getattr(old, s) != getattr(new, s)]
        if self.app[AUTH].needs_restart(old, new):  # started without [auth]: no middleware to turn on
            frozen.append("auth")
        switch = (old.model, old.model_version) != (new.model, new.model_version)
        if switch and (old.distributed or new.distributed):  # a group's hosts switch together: a restart
            frozen.append("model")
            switch = False
        if frozen:
            log.warning("config_reload_needs_restart", sections=frozen,
                        detail="these sections keep their old values until a restart")
            new = new.model_copy(update={s: getattr(old, s) for s in frozen})
        if not self._splits_served(old, new, new if switch else None):
            self.app[METRICS].count_reload(False)
            return False
        target = new
        new = new.model_copy(update={"model": old.model, "model_version": old.model_version})
        for apply in self.reloaders:
            apply(old, new)
        self.config = self.node.config = new
        log.info("config_reloaded", file=str(self.path))
        self.app[METRICS].count_reload(True)
        if switch:
            await self._switch_model(target)
        return True

    async def _switch_model(self, target: Config) -> None:
        """Another `[model]` (version): in service once loaded (`dsnode.model_switch`), nothing dropped."""
        self.notifier.status(f"reloading: switching model {target.model.name} to {target.model.path}")
        await switch_model(self.node, target, self.build, self._engine_swapped)
        self.config = self.node.config

    def _engine_swapped(self) -> None:
        """A switch put another engine (and its `[model]`) in service: from now on this is the config a
        reload compares with, not only once the old engine's last request is done."""
        self.config = self.node.config
        self._swapped.set()

    def _reload_splits(self, old: Config, new: Config) -> None:
        """A reloader: `[routing.split]` / `[routing.canary]` (a split that changed starts afresh)."""
        fresh = self.node.splits.configure(new.routing.split, new.routing.canary)
        if fresh:
            log.info("splits_reloaded", started_afresh=fresh)

    def _splits_served(self, old: Config, new: Config, target: Config | None) -> bool:
        """A changed `[routing.split]` must name models and versions some node serves (as far as this
        node knows: peers it has never heard from make it a warning, not a refusal)."""
        if new.routing.split == old.routing.split:
            return True
        also = None if target is None else (target.model.name, served_version(target.model_version, target.model.label))
        problems = cluster_problems(new.routing.split, served_versions(self.node, also))
        if not problems:
            return True
        lines = [f"{self.path}: {key}: {why}" for _, key, why in problems]
        peers = self.node.upstreams.balancer.peers
        known = {peer.url for peer in peers if peer.advert is not None}
        if any(upstream.url not in known for upstream in new.routing.upstream):  # one not heard from yet
            log.warning("split_unverified", problems=lines, detail="some upstream has not advertised yet")
            return True
        log.error("config_reload_failed", file=str(self.path), problems=lines)
        return False


def _ssl_context(config: Config) -> ssl.SSLContext | None:
    if config.tls.cert_file is None or config.tls.key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(config.tls.cert_file), str(config.tls.key_file))
    return context


def serve(path: Path, state_directory: str | None = None) -> int:
    """Entry point of `dsnode serve`; returns the exit code. The systemd variables ($NOTIFY_SOCKET,
    $WATCHDOG_USEC, $JOURNAL_STREAM) are read here, once."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload before the handlers exist must not kill us
    faulthandler.enable(all_threads=True)  # a watchdog kill (SIGABRT) leaves every thread's stack in the log
    systemd = SystemdEnv.from_environ(os.environ)
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, flush=True)
        Notifier.from_env(systemd).status(f"failed: {path} has {len(exc.problems)} problem(s), see the journal")
        return 1
    fmt = configure_logging(config.logging.level, config.logging.format,
                            journal_stream=os.environ.get("JOURNAL_STREAM"))
    log.info("config", file=str(path), log_format=fmt, effective=config.redacted())
    return _run_loop(_serve(config, systemd, state_directory))


async def _serve(config: Config, systemd: SystemdEnv, state_directory: str | None) -> int:
    try:
        server = NodeServer(config, systemd=systemd, state_directory=state_directory)
    except BackendUnavailable as exc:
        log.error("backend_unavailable", backend=config.model.backend, error=str(exc))
        Notifier.from_env(systemd).status(f"failed: backend {config.model.backend} unavailable: {exc}")
        return 1
    code = await server.run()
    if server.stopped_while_loading:
        # The loader thread cannot be interrupted, and the loop's shutdown would wait for it (for
        # as long as the model takes to load). Nothing was served, so nothing is lost by leaving now.
        log.info("exit", code=code, detail="not waiting for the interrupted model load")
        os._exit(code)
    log.info("exit", code=code)
    return code


def _run_loop(main: "asyncio.Future[int] | object") -> int:
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return int(runner.run(main))  # type: ignore[arg-type]
