"""JSON lines over one TCP connection between two daemons of a host group, and their HMAC.

Used by the rendezvous (`dsnode.central.rendezvous`) and by the link that outlives it
(`dsnode.central.group_link`). No torch: the daemon runs this before any rank starts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import select
import socket
import threading
import time
from typing import Any, Sequence

LINE_LIMIT = 1 << 16  # no message of the protocol comes near this; more is not a dsnode daemon


class WireClosed(ConnectionError):
    """The other side closed the connection, or sent something that is not the protocol."""


class Wire:
    """One connection: whole JSON objects in, whole JSON objects out. `send` may be called from
    any thread; `receive` from one thread at a time."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer  # "10.0.0.2:41234", for messages
        self._buffer = b""
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, sort_keys=True).encode() + b"\n"
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise WireClosed(f"cannot send to {self.peer}: {exc}") from None

    def receive(self, timeout: float) -> dict[str, Any] | None:
        """The next message, or None if none came within `timeout`; WireClosed on EOF."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            except OSError as exc:
                raise WireClosed(f"connection to {self.peer} failed: {exc}") from None
            if not chunk:
                raise WireClosed(f"{self.peer} closed the connection")
            self._buffer += chunk
            if len(self._buffer) > LINE_LIMIT:
                raise WireClosed(f"{self.peer} sent a line over {LINE_LIMIT} bytes: not a dsnode daemon")
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            raise WireClosed(f"{self.peer} sent something that is not JSON: not a dsnode daemon") from None
        if not isinstance(message, dict):
            raise WireClosed(f"{self.peer} sent JSON that is not an object: not a dsnode daemon")
        return message

    def peer_closed(self) -> bool:
        """Whether the other side has closed (or reset) the connection, even with messages of it still
        unread: polled without reading, so it may be asked from any thread while another receives."""
        if self.sock.fileno() < 0:
            return True
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(0))

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def sign(secret: bytes, message: dict[str, Any], nonce: str) -> str:
    """HMAC-SHA256 of the message (without its `mac`) and the other side's nonce: a fresh nonce per
    connection, so a recorded message cannot be replayed."""
    body = json.dumps({k: v for k, v in message.items() if k != "mac"}, sort_keys=True)
    return hmac.new(secret, (body + "\n" + nonce).encode(), hashlib.sha256).hexdigest()


def verify(secrets: Sequence[bytes], message: dict[str, Any], nonce: str) -> bool:
    """True if any of the secrets (the first signs; all verify, for rotation) made `mac`."""
    mac = message.get("mac")
    if not isinstance(mac, str):
        return False
    return any(hmac.compare_digest(mac, sign(secret, message, nonce)) for secret in secrets)
