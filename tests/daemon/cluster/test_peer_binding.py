"""Peer credentials are made for one receiving node in one boot: a captured header is refused by
every other node, by the same node after a restart, and by the same node a second time."""

from __future__ import annotations

import pytest
from dsnode.cluster.peer_auth import PeerAuth, PeerRefused, challenge_of

SECRET = (b"s" * 40,)
NOW = 1_800_000_000.0


def node(name: str) -> PeerAuth:
    return PeerAuth(SECRET, name, 30, clock=lambda: NOW)


def forward(sender: PeerAuth, to: PeerAuth | None, request_id: str = "r1") -> dict[str, str]:
    return {"X-DSNode-Via": "edge-1", "X-DSNode-User": "alice", "X-Request-Id": request_id,
            "X-DSNode-Peer": sender.sign("POST", "/v1/completions", "edge-1", "alice", request_id,
                                         to=None if to is None else to.binding)}


def test_a_credential_for_one_node_is_refused_by_another_with_a_challenge():
    edge, central_1, central_2 = node("edge-1"), node("central-1"), node("central-2")
    captured = forward(edge, central_1)
    with pytest.raises(PeerRefused, match="made for node 'central-1'") as info:
        central_2.verify("POST", "/v1/completions", captured)
    assert info.value.challenge  # central-2 says who it is, so a real peer can sign for it
    assert central_1.verify("POST", "/v1/completions", captured) == "edge-1"
    with pytest.raises(PeerRefused, match="already used"):
        central_1.verify("POST", "/v1/completions", captured)


def test_a_credential_is_refused_by_the_same_node_after_a_restart():
    edge, before = node("edge-1"), node("central-1")
    captured = forward(edge, before)
    assert before.verify("POST", "/v1/completions", captured) == "edge-1"
    after = node("central-1")  # a new process: a new boot id, no memory of the nonces it saw
    assert after.boot != before.boot
    with pytest.raises(PeerRefused, match="this node restarted") as info:
        after.verify("POST", "/v1/completions", captured)
    assert info.value.challenge


def test_a_reload_keeps_the_boot_and_the_nonces():
    edge, central = node("edge-1"), node("central-1")
    captured = forward(edge, central)
    central.verify("POST", "/v1/completions", captured)
    reloaded = node("central-1")
    reloaded.remember_from(central)
    assert reloaded.binding == central.binding
    with pytest.raises(PeerRefused, match="already used"):
        reloaded.verify("POST", "/v1/completions", captured)


def test_the_challenge_names_the_binding_and_nothing_else_verifies_without_the_secret():
    central = node("central 1")  # names may hold spaces
    assert challenge_of(central.challenge) == central.binding == (central.boot, "central 1")
    assert central.verify("POST", "/v1/completions", forward(node("edge-1"), central)) == "edge-1"
    with pytest.raises(PeerRefused, match="made for no node yet") as info:
        central.verify("POST", "/v1/completions", forward(node("edge-1"), None))
    assert info.value.challenge
    stranger = PeerAuth((b"x" * 40,), "laptop", 30, clock=lambda: NOW)
    with pytest.raises(PeerRefused, match="does not match") as info:
        central.verify("POST", "/v1/completions", forward(stranger, central))
    assert not info.value.challenge
    for bad in ("", "x", " ", "x "):
        assert challenge_of(bad) is None


def test_a_credential_of_the_old_unbound_format_is_refused_by_name():
    with pytest.raises(PeerRefused, match="another version"):
        node("central-1").verify("GET", "/cluster", {"X-DSNode-Peer": f"v1 {int(NOW)} n m edge-1"})
