"""The daemons' link inside a formed host group: heartbeats both ways, and the reason a group ends.

The rendezvous connections stay open. Every `HEARTBEAT_S` each side sends a ping; a side that hears
nothing for `heartbeat_timeout` (a host powered off, a cable pulled: TCP alone would take minutes to
notice), whose connection closes (its daemon died), or that says `ended` (its ranks died, it is
stopping) has left the group, and `on_lost(reason)` runs once. The engine then kills its own ranks,
fails its requests and exits 1; `end(reason)` tells the other side first, so every host's journal
names the first cause. systemd restarts each daemon and they meet again at the rendezvous.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import structlog

from .rendezvous import Formed
from .wire import Wire, WireClosed

log = structlog.get_logger("dsnode.central.group")

HEARTBEAT_S = 1.0


class GroupLink:
    def __init__(self, formed: Formed, me: int, heartbeat_timeout: float,
                 on_lost: Callable[[str], None]) -> None:
        self.formed = formed
        self._me = me  # this host's index
        self._timeout = heartbeat_timeout
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._threads: list[threading.Thread] = []
        self.lost_reason: str | None = None

    def start(self) -> "GroupLink":
        for index, wire in self.formed.wires.items():
            self._spawn(f"dsnode-group-read-{index}", lambda i=index, w=wire: self._read(i, w))
        self._spawn("dsnode-group-heartbeat", self._beat)
        return self

    def end(self, why: str) -> None:
        """Leave the group on purpose: tell every other host why, then close. Idempotent."""
        if not self._finish():
            return
        log.info("group_ended", host_index=self._me, why=why)
        self._tell_and_close(why)

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def peer_closed(self) -> bool:
        """Whether another host has already closed its link (its daemon died or left), before the reader
        thread may have read so: that host's account is on its way to `on_lost`."""
        if self._ended.is_set():
            return self.lost_reason is not None  # not when this host ended the group itself
        return any(wire.peer_closed() for wire in list(self.formed.wires.values()))

    # --- threads ---------------------------------------------------------------------------------
    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _read(self, index: int, wire: Wire) -> None:
        who = self.formed.members[index].who()
        heard = time.monotonic()
        while not self._ended.is_set():
            try:
                message = wire.receive(HEARTBEAT_S)
            except WireClosed:
                self._lost(f"{who} closed its link to this host (its daemon stopped or died)")
                return
            now = time.monotonic()
            if message is None:
                if now - heard > self._timeout:
                    self._lost(f"no heartbeat from {who} for {self._timeout:g}s (host down or network cut?)")
                    return
                continue
            heard = now
            if message.get("type") == "ended":
                self._lost(f"{who} left the group: {message.get('why')}")
                return

    def _beat(self) -> None:
        while not self._ended.wait(HEARTBEAT_S):
            for index, wire in list(self.formed.wires.items()):
                try:
                    wire.send({"type": "ping"})
                except WireClosed:
                    self._lost(f"{self.formed.members[index].who()} closed its link to this host")
                    return

    # --- ending ----------------------------------------------------------------------------------
    def _lost(self, reason: str) -> None:
        if not self._finish():
            return
        self.lost_reason = reason
        log.error("group_lost", host_index=self._me, reason=reason)
        self._tell_and_close(reason)  # the other followers hear the first cause from the leader
        self._on_lost(reason)

    def _finish(self) -> bool:
        """True for the first caller only: the group ends once."""
        with self._lock:
            if self._ended.is_set():
                return False
            self._ended.set()
            return True

    def _tell_and_close(self, why: str) -> None:
        for wire in self.formed.wires.values():
            try:
                wire.send({"type": "ended", "why": why, "host_index": self._me})
            except WireClosed:  # the one that left, most often
                pass
            wire.close()
