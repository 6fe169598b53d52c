"""`dsnode serve`: the node's life, as a written sequence.

start:  listen (so /health answers while loading) → load the model → ready
reload: SIGHUP → re-read the file → apply it whole, or keep the old one and log why
stop:   SIGTERM/SIGINT → stop listening → let in-flight requests finish (up to drain_timeout) →
        fail what is left with a clean error → close the engine and background tasks → exit 0
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from pathlib import Path
from typing import Callable

import structlog
from aiohttp import web

from .api.app import create_app
from .config import Config, ConfigError, load_config
from .engines import BackendUnavailable, build_engine
from .logs import configure_logging
from .node import Node
from .probe import probe_host

log = structlog.get_logger("dsnode.server")

Reloader = Callable[[Config, Config], None]  # (old, new): apply the parts this component owns
CLEANUP_TIMEOUT_S = 5.0

# Settings a reload cannot change in a running process (they need `systemctl restart dsnode`).
RESTART_ONLY = ("node", "model", "batching", "tls", "logging")


class NodeServer:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.path = config.source
        self.engine = build_engine(config)
        self.node = Node(config, self.engine, probe_host())
        self.app = create_app(self.node)
        self.reloaders: list[Reloader] = []
        self._stop = asyncio.Event()
        self._reloading: asyncio.Task[None] | None = None

    async def run(self) -> int:
        self._install_signal_handlers()
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=CLEANUP_TIMEOUT_S)
        await runner.setup()
        site = web.TCPSite(runner, self.config.node.host, self.config.node.port,
                           ssl_context=_ssl_context(self.config), reuse_address=True)
        await site.start()
        log.info("listening", url=self.node.url, listen=self.config.node.listen)
        code = 0
        if await self._load_engine():
            log.info("ready", model=self.engine.info.name, backend=self.engine.info.backend,
                     max_context=self.engine.info.max_context, device=self.engine.info.device)
            await self._stop.wait()
        else:
            code = 1
        await self._shutdown(runner, site)
        return code

    def stop(self) -> None:
        self._stop.set()

    # --- phases -------------------------------------------------------------------------------
    async def _load_engine(self) -> bool:
        loading = asyncio.create_task(self.engine.load())
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not loading.done():  # asked to stop while loading
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            return False
        if loading.exception() is not None:
            log.error("model_load_failed", model=self.config.model.name, error=str(loading.exception()))
            return False
        return True

    async def _shutdown(self, runner: web.AppRunner, site: web.TCPSite) -> None:
        node = self.node
        node.draining = True
        log.info("draining", in_flight=node.in_flight, drain_timeout_s=self.config.node.drain_timeout)
        await site.stop()  # stop accepting connections
        deadline = time.monotonic() + self.config.node.drain_timeout
        while node.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if node.in_flight:
            log.warning("drain_timeout", cancelled=node.in_flight)
        await self.engine.close()  # fails what is left with "shutting down"
        await runner.cleanup()
        log.info("stopped")

    # --- reload -------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._schedule_reload)

    def _schedule_reload(self) -> None:
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.get_running_loop().create_task(self.reload())

    async def reload(self) -> bool:
        """Re-read the config file; apply it whole or not at all. Returns whether it was applied."""
        if self.path is None:
            return False
        try:
            new = await asyncio.to_thread(load_config, self.path)
        except ConfigError as exc:
            log.error("config_reload_failed", file=str(self.path), problems=[str(p) for p in exc.problems])
            return False
        old = self.config
        frozen = [s for s in RESTART_ONLY if getattr(old, s) != getattr(new, s)]
        if frozen:
            log.warning("config_reload_needs_restart", sections=frozen,
                        detail="these sections keep their old values until a restart")
            new = new.model_copy(update={s: getattr(old, s) for s in frozen})
        for apply in self.reloaders:
            apply(old, new)
        self.config = self.node.config = new
        log.info("config_reloaded", file=str(self.path))
        return True


def _ssl_context(config: Config) -> ssl.SSLContext | None:
    if config.tls.cert_file is None or config.tls.key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(config.tls.cert_file), str(config.tls.key_file))
    return context


def serve(path: Path) -> int:
    """Entry point of `dsnode serve`; returns the exit code."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, flush=True)
        return 1
    configure_logging(config.logging.level, config.logging.format)
    log.info("config", file=str(path), effective=config.redacted())
    return _run_loop(_serve(config))


async def _serve(config: Config) -> int:
    try:
        server = NodeServer(config)
    except BackendUnavailable as exc:
        log.error("backend_unavailable", backend=config.model.backend, error=str(exc))
        return 1
    return await server.run()


def _run_loop(main: "asyncio.Future[int] | object") -> int:
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return int(runner.run(main))  # type: ignore[arg-type]
