"""The daemons' rendezvous and heartbeat link (`dsnode.central.rendezvous`, `dsnode.central.group_link`)
on loopback sockets, without ranks: the cluster secret admits only hosts that hold it (both ways),
a refused follower hears why, and a group ends on every host when one leaves or goes silent."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import pytest
from dsnode.central.group_link import GroupLink
from dsnode.central.rendezvous import Formed, Member, RendezvousError, join, lead
from dsnode.central.wire import WireClosed
from dsnode.distributed import DistributedSection

from tests.support.nodes import free_port

# Most of these wait out a join or heartbeat timeout on real sockets (≈20 s in all): not the fast tier.
pytestmark = pytest.mark.slow

SECRET = b"0123456789abcdef0123456789abcdef-cluster"
OTHER = b"fedcba9876543210fedcba9876543210-cluster"


def settings(port: int, index: int, **kwargs: Any) -> DistributedSection:
    values = {"hosts": 2, "host_index": index, "leader": f"127.0.0.1:{port}", "ranks_per_host": 2,
              "join_timeout": 10.0, "heartbeat_timeout": 3.0, **kwargs}
    return DistributedSection(**values)


def member(index: int, **kwargs: Any) -> Member:
    values = {"host_index": index, "node": f"central-{index}", "url": f"http://10.0.0.{index + 1}:8000",
              "model": "deepseek-r1", "model_config_sha256": "ab" * 32, "ranks_per_host": 2, "hosts": 2,
              "dtype": "bfloat16", **kwargs}
    return Member(**values)


def meet(leader_keys, follower_keys, follower: Member | None = None, port: int | None = None
         ) -> tuple[Formed | BaseException, Formed | BaseException]:
    """Run a leader and a follower at once; each side's Formed, or what it raised."""
    port = port or free_port()
    results: dict[str, Formed | BaseException] = {}

    def run(name: str, call: Any) -> None:
        try:
            results[name] = call()
        except BaseException as exc:  # reported to the test
            results[name] = exc

    threads = [
        threading.Thread(target=run,
                         args=("leader", lambda: lead(settings(port, 0), member(0), leader_keys))),
        threading.Thread(target=run, args=("follower", lambda: join(settings(port, 1), follower or member(1),
                                                                    follower_keys))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results["leader"], results["follower"]


def close(*sides: Formed | BaseException) -> None:
    for side in sides:
        if isinstance(side, Formed):
            for wire in side.wires.values():
                wire.close()


def test_hosts_holding_the_same_secret_form_the_group():
    # mid-rotation: each signs with its first secret and verifies with any of its secrets
    leader, follower = meet((OTHER, SECRET), (SECRET, OTHER))
    try:
        assert isinstance(leader, Formed) and isinstance(follower, Formed)
        nodes = ["central-0", "central-1"]
        assert [m.node for m in leader.members] == [m.node for m in follower.members] == nodes
        assert follower.members[1].url == "http://10.0.0.2:8000"
    finally:
        close(leader, follower)


@pytest.mark.parametrize(("leader_keys", "follower_keys", "why"), [
    ((SECRET,), (OTHER,), "host 1 (central-1) does not hold the leader central-0's cluster secret"),
    ((SECRET,), None, "host 1 (central-1) has no cluster secret but the leader central-0 has one"),
    (None, (SECRET,), "host 1 (central-1) signs with a cluster secret but the leader central-0 has none"),
])
def test_a_host_without_the_leaders_secret_is_refused_and_told_why(leader_keys, follower_keys, why):
    port = free_port()
    refused: list[BaseException] = []
    follower = threading.Thread(target=lambda: _catch(refused, lambda: join(settings(port, 1), member(1),
                                                                             follower_keys)))
    follower.start()
    with pytest.raises(RendezvousError, match="did not join the group") as leader_error:
        lead(settings(port, 0, join_timeout=1.5), member(0), leader_keys)
    follower.join(30)
    assert why in str(leader_error.value)  # the leader's last refusal, in its own error
    assert isinstance(refused[0], RendezvousError) and why in str(refused[0])


def test_the_follower_checks_the_leader_holds_the_secret_too():
    """A host that answers as the leader without the secret cannot pass for it: its `go` is unsigned."""
    leader, follower = meet(None, None)  # both without: fine
    close(leader, follower)
    port = free_port()
    fake: list[BaseException] = []
    thread = threading.Thread(target=lambda: _catch(fake, lambda: _unsigned_leader(port)))
    thread.start()
    with pytest.raises(RendezvousError, match="did not prove it holds this host's cluster secret"):
        join(settings(port, 1), member(1), (SECRET,))
    thread.join(30)


def _unsigned_leader(port: int) -> None:
    """The leader's protocol, signing nothing, as an impostor would have to."""
    import socket

    from dsnode.central.wire import Wire

    with socket.create_server(("127.0.0.1", port)) as server:
        sock, _ = server.accept()
        wire = Wire(sock, "follower")
        wire.send({"type": "challenge", "protocol": 1, "nonce": "n", "node": "impostor", "auth": True})
        hello = wire.receive(10)
        assert hello is not None
        from dataclasses import asdict

        wire.send({"type": "go", "members": [asdict(member(0)), asdict(member(1))], "mac": "0" * 64})
        wire.receive(5)
        wire.close()


@pytest.mark.parametrize(("follower", "why"), [
    (member(1, model="deepseek-v3"),
     "model differs: 'deepseek-r1' on the leader central-0, 'deepseek-v3' on host 1"),
    (member(1, ranks_per_host=4),
     "ranks_per_host differs: 2 on the leader central-0, 4 on host 1 (central-1)"),
    (member(1, dtype="float16"), "dtype differs: 'bfloat16' on the leader central-0, 'float16' on host 1"),
    (member(1, model_config_sha256="cd" * 32), "sha256 of the model's config.json differs"),
    (member(1, host_index=5), "central-1 says host_index = 5, but the leader central-0 has hosts = 2"),
])
def test_a_follower_that_differs_is_refused_with_both_values(follower, why):
    port = free_port()
    refused: list[BaseException] = []
    thread = threading.Thread(target=lambda: _catch(refused, lambda: join(settings(port, 1), follower, None)))
    thread.start()
    with pytest.raises(RendezvousError, match="did not join"):
        lead(settings(port, 0, join_timeout=1.5), member(0), None)
    thread.join(30)
    assert why in str(refused[0])


def test_a_follower_waits_for_a_leader_that_starts_later():
    port = free_port()
    results: list[Any] = []
    follower = threading.Thread(
        target=lambda: _catch(results, lambda: join(settings(port, 1), member(1), None)))
    follower.start()
    time.sleep(1.5)  # refused connections meanwhile (RETRY_S = 1): it retries
    leader = lead(settings(port, 0), member(0), None)
    follower.join(30)
    assert isinstance(results[0], Formed)
    close(leader, results[0])


def test_a_group_ends_on_every_host_when_one_leaves_or_goes_silent():
    leader, follower = meet(None, None)
    assert isinstance(leader, Formed) and isinstance(follower, Formed)
    lost: dict[str, str] = {}
    ended = threading.Event()

    def on_lost(side: str) -> Any:
        return lambda reason: (lost.__setitem__(side, reason), ended.set())

    leader_link = GroupLink(leader, 0, 3.0, on_lost("leader")).start()
    follower_link = GroupLink(follower, 1, 3.0, on_lost("follower")).start()
    time.sleep(1.5)  # heartbeats flow both ways: nothing ends
    assert not lost
    follower_link.end("tensor-parallel rank 3 (pid 42) was killed by SIGKILL")
    assert ended.wait(10)
    why = "host 1 (central-1) left the group: tensor-parallel rank 3 (pid 42) was killed by SIGKILL"
    assert lost == {"leader": why}
    assert leader_link.ended

    leader, follower = meet(None, None)
    assert isinstance(leader, Formed) and isinstance(follower, Formed)
    silent: dict[str, str] = {}
    started = time.monotonic()
    GroupLink(leader, 0, 3.0,
              lambda reason: silent.setdefault("leader", reason)).start()  # the follower never beats
    while "leader" not in silent and time.monotonic() - started < 15:
        time.sleep(0.1)
    assert silent["leader"] == "no heartbeat from host 1 (central-1) for 3s (host down or network cut?)"
    assert 3.0 <= time.monotonic() - started < 8.0
    close(follower)


def _catch(into: list[Any], call: Any) -> None:
    try:
        into.append(call())
    except BaseException as exc:  # the test looks at it
        into.append(exc)


def test_member_who_names_the_host():
    assert member(0).who() == "the leader central-0"
    assert replace(member(1), node="gpu-b").who() == "host 1 (gpu-b)"


def test_a_closed_link_is_seen_before_its_last_messages_are_read():
    """A rank's exit asks whether another host has left (`GroupLink.peer_closed`) while the reader
    thread may not have read that host's last words yet: the poll sees the close without reading them."""
    leader, follower = meet(None, None)
    assert isinstance(leader, Formed) and isinstance(follower, Formed)
    link = GroupLink(leader, 0, 3.0, lambda reason: None)  # not started: nothing reads its wires
    assert not link.peer_closed()
    follower.wires[0].send({"type": "ended", "why": "rank 3 was killed by SIGKILL"})
    assert not link.peer_closed()  # a message alone is not a close
    follower.wires[0].close()
    deadline = time.monotonic() + 5
    while not link.peer_closed() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert link.peer_closed()
    wire = leader.wires[1]
    assert wire.receive(1.0) == {"type": "ended", "why": "rank 3 was killed by SIGKILL"}  # still there
    with pytest.raises(WireClosed):
        wire.receive(1.0)
    close(leader)


def test_a_host_that_ended_its_group_itself_has_no_closed_peer_to_wait_for():
    leader, follower = meet(None, None)
    assert isinstance(leader, Formed) and isinstance(follower, Formed)
    link = GroupLink(leader, 0, 3.0, lambda reason: None)
    link.end("the leader central-0 is stopping")
    assert not link.peer_closed()
    close(follower)
