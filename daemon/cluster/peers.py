"""The advertisement poller: every `poll_interval`, `GET /cluster` on each configured upstream (with
`poll_timeout`), so the balancer knows who serves which model up to which context, and who is ready.

A poll that fails marks the peer unreachable until one answers again (the balancer skips it); its last
advertisement is kept, so a model it served still gets a 503 ("no upstream can take it") rather than a
404 while it is away. Changes of state are logged, not every poll.

An advertisement is untrusted input: its body is read up to `MAX_ADVERT_BYTES`, parsed with a depth
limit (`dsnode.safejson`), and its fields are type-checked one by one by the balancer. Anything one
upstream answers — or any error while polling it — fails that poll only: the peer is unreachable
with the reason, the other peers are polled as ever, and the next round polls it again. The loop
itself runs under `dsnode.tasks.Supervised`, which restarts it should anything escape.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import aiohttp
import structlog

from .. import safejson
from ..config import RoutingSection
from ..headers import PEER_CHALLENGE
from .balancer import Balancer
from .peer_auth import Binding, challenge_of

log = structlog.get_logger("dsnode.cluster")

MAX_ADVERT_BYTES = 1024 * 1024  # a real advertisement is a few KiB
MAX_ADVERT_DEPTH = 16  # and nests 5 deep
_READ_CHUNK = 64 * 1024

Signer = Callable[[str, str, "Binding | None"], dict[str, str]]  # (method, path, to) -> credential headers


class Poller:
    def __init__(
        self,
        balancer: Balancer,
        changed: asyncio.Event,
        session: aiohttp.ClientSession,
        settings: Callable[[], RoutingSection],
        sign: Signer | None = None,
        on_round: Callable[[], None] | None = None,
    ) -> None:
        self.balancer = balancer
        self.changed = changed  # set on reload: poll the new list at once
        self.session = session
        self.settings = settings  # read each round, so a reload's poll_interval applies
        self.sign = sign  # (method, path, to) -> the peer credential headers, made fresh for each poll
        self.on_round = on_round  # told after every round (the supervisor: the loop is not failing)

    async def run(self) -> None:
        """Poll until cancelled (by `Upstreams.stop`)."""
        changed = self.changed
        while True:
            changed.clear()
            routing = self.settings()
            await self.poll_all(routing.poll_timeout)
            if self.on_round is not None:
                self.on_round()
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
            self._failed(url, str(exc), was[0])
            return
        except Exception as exc:  # a bug here must cost this poll, not the poller
            log.error("upstream_poll_failed", task="dsnode-poller", upstream=url,
                      error=f"{type(exc).__name__}: {exc}", exc_info=True)
            self._failed(url, f"polling failed: {type(exc).__name__}: {exc}", was[0])
            return
        balancer.advertised(url, advert, time.time(), now=time.monotonic())
        peer = balancer.find(url)
        if peer is not None and (peer.reachable, peer.ready) != was:
            log.info("upstream_advertised", upstream=url, name=peer.name, ready=peer.ready,
                     models={name: limit for name, limit in peer.models.items()},
                     **({} if peer.ready else {"reason": peer.last_error}))

    def _failed(self, url: str, error: str, was_reachable: bool | None) -> None:
        self.balancer.unreachable(url, error)
        if was_reachable is not False:
            log.warning("upstream_unreachable", upstream=url, error=error)

    async def _fetch(self, url: str, timeout: float) -> dict[str, Any]:
        """The peer's advertisement; once more, signed for the node it says it is, if it challenges
        a credential made for another node or boot."""
        peer = self.balancer.find(url)
        binding = peer.binding if peer is not None else None
        status, body, challenge = await self._get(url, timeout, binding)
        if status == 401 and challenge is not None and challenge != binding:
            if peer is not None:
                peer.binding = challenge
            status, body, challenge = await self._get(url, timeout, challenge)
        if status == 401:
            raise _PollFailed("GET /cluster answered HTTP 401: the peer refused this node's cluster "
                              "credential (every node needs the same [auth] cluster_secret_file)")
        if status != 200:
            raise _PollFailed(f"GET /cluster answered HTTP {status}")
        try:
            data = safejson.loads(body, MAX_ADVERT_DEPTH)
        except safejson.JSONRefused as exc:
            raise _PollFailed(f"GET /cluster answered something that is not an advertisement: {exc}") from None
        node = data.get("node") if isinstance(data, dict) else None
        if not isinstance(node, dict):
            raise _PollFailed("GET /cluster did not return a dsnode advertisement")
        return node

    async def _get(self, url: str, timeout: float, to: Binding | None) -> tuple[int, bytes, Binding | None]:
        """(status, body up to MAX_ADVERT_BYTES, the peer's challenge if it sent one)."""
        try:
            headers = self.sign("GET", "/cluster", to) if self.sign else {}
            async with self.session.get(
                url + "/cluster", headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                challenge = challenge_of(response.headers.get(PEER_CHALLENGE))
                if response.status != 200:
                    return response.status, b"", challenge
                return 200, await _read_capped(response), challenge
        except TimeoutError:
            raise _PollFailed(f"no answer within poll_timeout ({timeout:g}s)") from None
        except aiohttp.ClientConnectorError as exc:
            raise _PollFailed(f"cannot connect: {exc.os_error.strerror or exc.os_error}") from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise _PollFailed(f"{type(exc).__name__}: {exc}") from None


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    if response.content_length is not None and response.content_length > MAX_ADVERT_BYTES:
        raise _PollFailed(f"GET /cluster answered {response.content_length} bytes; an advertisement is at "
                          f"most {MAX_ADVERT_BYTES} bytes")
    body = bytearray()
    while chunk := await response.content.read(_READ_CHUNK):
        body += chunk
        if len(body) > MAX_ADVERT_BYTES:
            raise _PollFailed(f"GET /cluster answered more bytes than an advertisement has at most "
                              f"({MAX_ADVERT_BYTES} bytes)")
    return bytes(body)


class _PollFailed(Exception):
    pass
