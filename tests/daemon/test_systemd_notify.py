"""sd_notify without libsystemd: what reaches the socket, byte for byte, and the watchdog's pings.

Each test binds its own datagram socket (a path, or an abstract name) and reads what was sent."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid

import pytest
from dsnode.systemd import Notifier, SystemdEnv, monotonic_usec, socket_address, watchdog_pings


@pytest.fixture
def listener(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(10)
    yield str(path), sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    """Everything queued on the socket now, without waiting."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(65536).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(10)
    return out


# --- the environment ------------------------------------------------------------------------------
def test_environment_outside_systemd_means_no_notifications():
    env = SystemdEnv.from_environ({})
    assert env == SystemdEnv(None, None)
    assert env.watchdog_interval_s is None
    notifier = Notifier.from_env(env)
    assert not notifier.enabled
    assert notifier.ready("serving") is False and notifier.watchdog() is False


def test_environment_paths_and_abstract_names_are_accepted_other_transports_are_not():
    assert SystemdEnv.from_environ({"NOTIFY_SOCKET": "/run/systemd/notify"}).notify_socket == "/run/systemd/notify"
    assert SystemdEnv.from_environ({"NOTIFY_SOCKET": "@sd-notify"}).notify_socket == "@sd-notify"
    assert SystemdEnv.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}).notify_socket is None
    assert SystemdEnv.from_environ({"NOTIFY_SOCKET": ""}).notify_socket is None
    assert socket_address("@sd-notify") == "\0sd-notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"


def test_watchdog_is_ours_only_when_watchdog_pid_names_us_or_is_absent():
    base = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"}
    assert SystemdEnv.from_environ(base, pid=42).watchdog_usec == 30_000_000
    assert SystemdEnv.from_environ({**base, "WATCHDOG_PID": "42"}, pid=42).watchdog_interval_s == 15.0
    assert SystemdEnv.from_environ({**base, "WATCHDOG_PID": "41"}, pid=42).watchdog_usec is None
    assert SystemdEnv.from_environ({**base, "WATCHDOG_USEC": "0"}, pid=42).watchdog_usec is None
    assert SystemdEnv.from_environ({**base, "WATCHDOG_USEC": "soon"}, pid=42).watchdog_usec is None


# --- the messages ---------------------------------------------------------------------------------
def test_ready_carries_status_in_one_datagram(listener):
    path, sock = listener
    notifier = Notifier(path)
    assert notifier.ready("serving 1 model (tiny)\nat http://x:8000")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 1 model (tiny) at http://x:8000"
    notifier.close()


def test_abstract_socket(listener):
    name = f"dsnode-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        notifier = Notifier("@" + name)
        assert notifier.status("loading model")
        assert sock.recv(4096) == b"STATUS=loading model"
        notifier.close()


def test_reloading_carries_the_monotonic_clock_systemd_253_compares_with_its_sighup(listener):
    path, sock = listener
    notifier = Notifier(path)
    before = monotonic_usec()
    assert notifier.reloading("reloading /etc/dsnode/dsnode.toml")
    after = monotonic_usec()
    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1" and lines[2] == "STATUS=reloading /etc/dsnode/dsnode.toml"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after
    # the same clock systemd reads (CLOCK_MONOTONIC, microseconds)
    assert abs(int(value) - time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6) < 60e6
    notifier.close()


def test_stopping_asks_for_more_stop_time(listener):
    path, sock = listener
    notifier = Notifier(path)
    notifier.stopping("draining: 2 requests in flight", extend_s=140.5)
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining: 2 requests in flight\nEXTEND_TIMEOUT_USEC=140500000"
    notifier.close()


def test_identical_status_is_sent_once(listener):
    path, sock = listener
    notifier = Notifier(path)
    notifier.status("draining: 1 request in flight")
    notifier.status("draining: 1 request in flight")
    notifier.status("stopping")
    notifier.watchdog()
    assert received(sock) == ["STATUS=draining: 1 request in flight", "STATUS=stopping", "WATCHDOG=1"]
    notifier.close()


def test_a_vanished_socket_is_not_an_error(tmp_path):
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    assert notifier.enabled
    assert notifier.ready("serving") is False
    assert notifier.watchdog() is False
    notifier.close()


# --- the watchdog ---------------------------------------------------------------------------------
async def test_watchdog_pings_come_from_the_event_loop_and_stop_while_it_is_blocked(listener):
    """The point of WATCHDOG=1: a stuck loop must stop the pings, so systemd restarts the service."""
    path, sock = listener
    notifier = Notifier(path)
    task = asyncio.get_running_loop().create_task(watchdog_pings(notifier, 0.01))
    try:
        await asyncio.get_running_loop().sock_recv(_nonblocking(sock), 64)  # pinging
        sock.settimeout(10)
        received(sock)  # empty the queue, then block the loop without yielding
        time.sleep(0.3)  # the loop is stuck: nothing it runs may send
        assert received(sock) == []
        # the loop runs again: so do the pings
        assert await asyncio.get_running_loop().sock_recv(_nonblocking(sock), 64) == b"WATCHDOG=1"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        notifier.close()


def _nonblocking(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    return sock


def test_notifier_does_not_read_the_environment(monkeypatch, listener):
    """Only the entry point reads $NOTIFY_SOCKET (once); a Notifier built without it stays silent."""
    path, sock = listener
    monkeypatch.setitem(os.environ, "NOTIFY_SOCKET", path)
    assert Notifier().ready("serving") is False
    assert received(sock) == []
