"""The advertisement poller: every `poll_interval`, `GET /cluster` on each configured upstream (with
`poll_timeout`), so the balancer knows who serves which model up to which context, and who is ready.

A poll that fails marks the peer unreachable until one answers again (the balancer skips it); its last
advertisement is kept, so a model it served still gets a 503 ("no upstream can take it") rather than a
404 while it is away. Changes of state are logged, not every poll.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import aiohttp
import structlog

from ..config import RoutingSection
from .balancer import Balancer

log = structlog.get_logger("dsnode.cluster")


class Poller:
    def __init__(
        self,
        balancer: Balancer,
        changed: asyncio.Event,
        session: aiohttp.ClientSession,
        settings: Callable[[], RoutingSection],
        sign: Callable[[str, str], dict[str, str]] | None = None,
    ) -> None:
        self.balancer = balancer
        self.changed = changed  # set on reload: poll the new list at once
        self.session = session
        self.settings = settings  # read each round, so a reload's poll_interval applies
        self.sign = sign  # (method, path) -> the peer credential headers, made fresh for each poll

    async def run(self) -> None:
        """Poll until cancelled (by `Upstreams.stop`)."""
        changed = self.changed
        while True:
            changed.clear()
            routing = self.settings()
            await self.poll_all(routing.poll_timeout)
            try:
                await asyncio.wait_for(changed.wait(), routing.poll_interval)
            except TimeoutError:
                pass

    async def poll_all(self, timeout: float) -> None:
        urls = [peer.url for peer in self.balancer.peers]
        await asyncio.gather(*(self.poll(url, timeout) for url in urls))

    async def poll(self, url: str, timeout: float) -> None:
        balancer = self.balancer
        before = balancer.find(url)
        was = (before.reachable, before.ready) if before else (None, None)
        try:
            advert = await self._fetch(url, timeout)
        except _PollFailed as exc:
            balancer.unreachable(url, str(exc))
            if was[0] is not False:
                log.warning("upstream_unreachable", upstream=url, error=str(exc))
            return
        balancer.advertised(url, advert, time.time())
        peer = balancer.find(url)
        if peer is not None and (peer.reachable, peer.ready) != was:
            log.info("upstream_advertised", upstream=url, name=peer.name, ready=peer.ready,
                     models={name: limit for name, limit in peer.models.items()})

    async def _fetch(self, url: str, timeout: float) -> dict[str, Any]:
        try:
            headers = self.sign("GET", "/cluster") if self.sign else {}
            async with self.session.get(
                url + "/cluster", headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                if response.status == 401:
                    raise _PollFailed("GET /cluster answered HTTP 401: the peer refused this node's cluster "
                                      "credential (every node needs the same [auth] cluster_secret_file)")
                if response.status != 200:
                    raise _PollFailed(f"GET /cluster answered HTTP {response.status}")
                data = await response.json(content_type=None)
        except TimeoutError:
            raise _PollFailed(f"no answer within poll_timeout ({timeout:g}s)") from None
        except aiohttp.ClientConnectorError as exc:
            raise _PollFailed(f"cannot connect: {exc.os_error.strerror or exc.os_error}") from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise _PollFailed(f"{type(exc).__name__}: {exc}") from None
        node = data.get("node") if isinstance(data, dict) else None
        if not isinstance(node, dict):
            raise _PollFailed("GET /cluster did not return a dsnode advertisement")
        return node


class _PollFailed(Exception):
    pass
