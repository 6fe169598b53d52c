"""Talking to systemd without libsystemd: sd_notify(3) and the service watchdog.

The protocol is one datagram per message to the AF_UNIX socket named by `$NOTIFY_SOCKET` (a path,
or `@name` for an abstract socket), holding newline-separated `KEY=VALUE` assignments. systemd sets
`$WATCHDOG_USEC` (and `$WATCHDOG_PID`) when the unit has `WatchdogSec=`: the service must send
`WATCHDOG=1` more often than that. Outside systemd every call here is a no-op that returns False.

`Notifier` is built from the environment once, by the entry point (`dsnode serve`); nothing else
reads these variables.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from typing import Mapping

SEND_TIMEOUT_S = 2.0  # PID 1 reads promptly; never let a wedged manager hang the event loop for long


@dataclass(frozen=True)
class SystemdEnv:
    """What systemd told this process through its environment."""

    notify_socket: str | None = None
    watchdog_usec: int | None = None  # only when the watchdog is meant for this process

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pid: int | None = None) -> "SystemdEnv":
        pid = os.getpid() if pid is None else pid
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            address = None  # vsock:… and other transports of newer systemd: not supported, stay silent
        return cls(address, _watchdog_usec(environ, pid))

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half the timeout, as sd_watchdog_enabled(3) recommends."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    owner = environ.get("WATCHDOG_PID")
    if usec <= 0 or (owner and owner != str(pid)):
        return None  # inherited from a parent that is the watched one, not us
    return usec


def socket_address(notify_socket: str) -> str:
    """`@name` is Linux's abstract namespace: a leading NUL byte on the wire."""
    return "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def one_line(text: str) -> str:
    """A notify message is newline-separated: a value must stay on one line."""
    return " ".join(text.split())


class Notifier:
    """sd_notify(3) for one process. Methods return whether the message was handed to systemd."""

    def __init__(self, notify_socket: str | None = None) -> None:
        self.address = socket_address(notify_socket) if notify_socket else None
        self._sock: socket.socket | None = None
        self.last_status: str | None = None

    @classmethod
    def from_env(cls, env: SystemdEnv) -> "Notifier":
        return cls(env.notify_socket)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        if self.address is None or not assignments:
            return False
        message = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(SEND_TIMEOUT_S)
            self._sock.sendto(message, self.address)
        except OSError:
            return False  # not fatal: the service manager may be restarting or gone
        return True

    # --- the messages dsnode sends -----------------------------------------------------------
    def status(self, text: str) -> bool:
        """Free text for `systemctl status`; repeated identical texts are not re-sent."""
        text = one_line(text)
        if text == self.last_status:
            return self.enabled
        self.last_status = text
        return self.send(f"STATUS={text}")

    def ready(self, status: str) -> bool:
        self.last_status = one_line(status)
        return self.send("READY=1", f"STATUS={self.last_status}")

    def reloading(self, status: str = "reloading configuration") -> bool:
        """MONOTONIC_USEC lets systemd ≥ 253 (Type=notify-reload) match this to its SIGHUP; 252
        ignores it and shows the unit as `reloading` until the next READY=1."""
        self.last_status = one_line(status)
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", f"STATUS={self.last_status}")

    def stopping(self, status: str, extend_s: float | None = None) -> bool:
        """STOPPING=1; `extend_s` asks for that long before the stop timeout may fire
        (EXTEND_TIMEOUT_USEC, systemd ≥ 236), so a drain longer than TimeoutStopSec= still ends well."""
        self.last_status = one_line(status)
        lines = ["STOPPING=1", f"STATUS={self.last_status}"]
        if extend_s is not None:
            lines.append(f"EXTEND_TIMEOUT_USEC={int(extend_s * 1e6)}")
        return self.send(*lines)

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def watchdog_pings(notifier: Notifier, interval_s: float) -> None:
    """Ping from the event loop itself: if the loop is stuck, the pings stop and systemd restarts us.
    Runs until cancelled."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval_s)
