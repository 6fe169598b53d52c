"""The balancer on its own: nginx's smooth weighted round-robin, passive health, advertisements."""

from __future__ import annotations

from collections import Counter

import pytest
from dsnode.cluster.balancer import Balancer, Peer
from dsnode.config import RoutingSection
from hypothesis import given
from hypothesis import strategies as st

MODEL = "deepseek-r1"


def routing(*weights: int, max_fails: int = 1, fail_timeout: float = 10.0) -> RoutingSection:
    upstreams = [{"url": f"http://10.0.0.{i + 1}:8000", "weight": w} for i, w in enumerate(weights)]
    return RoutingSection.model_validate({"max_fails": max_fails, "fail_timeout": fail_timeout, "upstream": upstreams})


def advert(name: str, ready: bool = True, models: dict[str, int] | None = None) -> dict:
    models = {MODEL: 4096} if models is None else models
    return {"name": name, "role": "central", "ready": ready, "reason": "" if ready else "model is loading",
            "models": [{"name": m, "max_context": c, "ready": ready} for m, c in models.items()]}


def ready_balancer(*weights: int, **kwargs) -> Balancer:
    balancer = Balancer(routing(*weights, **kwargs))
    for i, peer in enumerate(balancer.peers):
        balancer.advertised(peer.url, advert("abcdefgh"[i]), wall_time=1000.0)
    return balancer


def picks(balancer: Balancer, n: int, now: float = 0.0, **kwargs) -> list[str]:
    out = []
    for _ in range(n):
        peer = balancer.pick(MODEL, kwargs.get("context"), now)
        out.append(peer.name if peer else "-")
    return out


def test_swrr_sequence_is_nginxs_for_5_1_1():
    # nginx's documentation and ngx_http_upstream_round_robin.c: weights {5, 1, 1} give a a b a c a a
    assert picks(ready_balancer(5, 1, 1), 14) == list("aabacaa" * 2)


def test_swrr_3_to_1_is_smooth_and_exact():
    balancer = ready_balancer(3, 1)
    sequence = picks(balancer, 400)
    assert sequence[:4] == ["a", "a", "b", "a"]
    assert Counter(sequence) == {"a": 300, "b": 100}
    assert max(len(run) for run in "".join(sequence).split("b")) == 3  # never more than 3 a's in a row


@given(st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=5), st.integers(0, 20))
def test_swrr_any_window_of_one_period_splits_exactly_by_weight(weights, offset):
    balancer = ready_balancer(*weights)
    picks(balancer, offset)  # start anywhere in the rotation
    period = sum(weights)
    counts = Counter(picks(balancer, 3 * period))
    assert counts == {"abcdefgh"[i]: 3 * w for i, w in enumerate(weights)}


def test_a_failure_takes_a_peer_out_for_fail_timeout_then_it_is_tried_again():
    balancer = ready_balancer(1, 1, max_fails=1, fail_timeout=10.0)
    a = balancer.pick(MODEL, None, now=0.0)
    assert a is not None and a.name == "a"
    balancer.failed(a, now=0.0, error="connection refused")
    assert a.down(5.0) and not a.healthy(5.0)
    assert picks(balancer, 5, now=5.0) == ["b"] * 5
    assert not a.down(10.5)
    assert "a" in picks(balancer, 4, now=10.5)  # back in rotation after fail_timeout
    balancer.failed(a, now=11.0, error="connection refused")  # fails again: out again
    assert picks(balancer, 3, now=12.0) == ["b"] * 3


def test_a_success_after_the_window_clears_the_failure_count():
    balancer = ready_balancer(1, max_fails=2, fail_timeout=10.0)
    a = balancer.peers[0]
    balancer.failed(a, now=0.0, error="HTTP 500")
    assert a.fails == 1 and not a.down(1.0)  # 1 < max_fails
    assert balancer.pick(MODEL, None, now=20.0) is a  # the window has passed: checked moves on
    balancer.succeeded(a, now=20.0)
    assert a.fails == 0


def test_effective_weight_drops_by_weight_over_max_fails_and_climbs_back_one_per_pick():
    balancer = ready_balancer(6, 6, max_fails=3)
    a = balancer.peers[0]
    balancer.failed(a, now=0.0, error="HTTP 502")
    assert a.effective_weight == 4
    balancer.failed(a, now=0.0, error="HTTP 502")
    assert a.effective_weight == 2 and not a.down(0.0)
    balancer.pick(MODEL, None, now=0.0)
    balancer.pick(MODEL, None, now=0.0)
    assert a.effective_weight == 4
    assert balancer.states(0.0)[0].effective_weight == 4


def test_max_fails_zero_never_takes_a_peer_out():
    balancer = ready_balancer(1, max_fails=0)
    a = balancer.peers[0]
    for _ in range(5):
        balancer.failed(a, now=0.0, error="HTTP 500")
    assert balancer.pick(MODEL, None, now=0.0) is a


def test_per_upstream_max_fails_and_fail_timeout_override_the_defaults():
    balancer = Balancer(RoutingSection.model_validate({"max_fails": 1, "fail_timeout": 10.0, "upstream": [
        {"url": "http://a:1", "max_fails": 3, "fail_timeout": 30.0}, {"url": "http://b:1"}]}))
    assert [(p.max_fails, p.fail_timeout) for p in balancer.peers] == [(3, 30.0), (1, 10.0)]


def test_only_ready_reachable_peers_that_advertised_are_picked():
    balancer = Balancer(routing(1, 1, 1))
    a, b, c = balancer.peers
    assert balancer.pick(MODEL, None, 0.0) is None  # nothing advertised yet
    balancer.advertised(a.url, advert("a"), 1.0)
    balancer.advertised(b.url, advert("b", ready=False), 1.0)
    balancer.advertised(c.url, advert("c"), 1.0)
    balancer.unreachable(c.url, "cannot connect: Connection refused")
    assert set(picks(balancer, 6)) == {"a"}
    assert c.models == {MODEL: 4096}  # the last advertisement is kept while unreachable
    assert MODEL in balancer.known_models()
    why = balancer.why_none("other", None, 0.0)
    assert "no upstream serves the model `other`" in why
    balancer.unreachable(a.url, "cannot connect: Connection refused")
    assert balancer.pick(MODEL, None, 0.0) is None
    why = balancer.why_none(MODEL, None, 0.0)
    assert "unreachable (cannot connect: Connection refused)" in why and "not ready: model is loading" in why


def test_model_and_context_filter_the_candidates():
    balancer = Balancer(routing(1, 1))
    a, b = balancer.peers
    balancer.advertised(a.url, advert("a", models={MODEL: 512, "coder": 512}), 1.0)
    balancer.advertised(b.url, advert("b", models={MODEL: 8192}), 1.0)
    assert set(picks(balancer, 4, context=600)) == {"b"}
    assert set(picks(balancer, 4, context=None)) == {"a", "b"}
    assert balancer.pick("coder", 600, 0.0) is None
    assert "context limit 512 < 600 tokens needed" in balancer.why_none("coder", 600, 0.0)
    assert balancer.pick("coder", 100, 0.0) is a


def test_tried_peers_and_hops_are_skipped():
    balancer = ready_balancer(3, 1)
    a, b = balancer.peers
    assert balancer.pick(MODEL, None, 0.0, tried=[a]) is b
    assert balancer.pick(MODEL, None, 0.0, tried=[a, b]) is None
    assert balancer.pick(MODEL, None, 0.0, exclude_names=("a",)) is b


def test_reload_keeps_health_state_of_staying_peers_and_restarts_the_rotation():
    balancer = ready_balancer(3, 1, max_fails=2)
    a, b = balancer.peers
    picks(balancer, 3)
    balancer.failed(a, now=0.0, error="HTTP 500")
    a.forwarded = 7
    new = RoutingSection.model_validate({"max_fails": 2, "upstream": [
        {"url": a.url, "weight": 1}, {"url": "http://10.0.0.9:8000", "weight": 1}]})
    balancer.configure(new)
    kept, added = balancer.peers
    assert kept is a and kept.fails == 1 and kept.forwarded == 7 and kept.name == "a"
    assert kept.weight == 1 and kept.effective_weight == 0  # still penalised by its failure
    assert added.reachable is None and added.ready is None  # not picked before it advertises
    assert all(p.current_weight == 0 for p in balancer.peers)
    assert balancer.find(b.url) is None
    balancer.advertised(added.url, advert("z"), 2.0)
    assert Counter(picks(balancer, 4)) == {"a": 2, "z": 2}  # effective weight recovered on the way


def test_states_show_the_balancers_view():
    balancer = ready_balancer(3, 1)
    a = balancer.peers[0]
    balancer.failed(a, now=0.0, error="HTTP 500")
    state_a, state_b = balancer.states(1.0)
    assert (state_a.weight, state_a.healthy, state_a.down, state_a.fails) == (3, False, True, 1)
    assert state_a.effective_weight == 0 and state_a.last_error == "HTTP 500"
    assert (state_b.name, state_b.healthy, state_b.reachable, state_b.ready) == ("b", True, True, True)
    assert state_b.advert is not None and state_b.advert["models"][0]["name"] == MODEL


def test_advertisement_garbage_is_tolerated():
    balancer = Balancer(routing(1))
    url = balancer.peers[0].url
    balancer.advertised(url, {"ready": True, "models": "nope", "name": 5}, 1.0)
    peer = balancer.peers[0]
    assert peer.models == {} and peer.name is None and peer.label == url
    balancer.advertised(url, {"ready": True, "models": [{"name": MODEL, "max_context": True}, 3]}, 1.0)
    assert peer.models == {MODEL: None}


def test_an_advertisement_for_a_removed_peer_is_ignored():
    balancer = Balancer(routing(1))
    balancer.advertised("http://gone:1", advert("x"), 1.0)
    balancer.unreachable("http://gone:1", "x")
    assert [p.url for p in balancer.peers] == ["http://10.0.0.1:8000"]


@pytest.mark.parametrize("weight", [1, 2, 7])
def test_peer_starts_at_its_full_effective_weight(weight):
    assert Peer("http://x:1", weight, 1, 10.0).effective_weight == weight


# --- affinity (weighted rendezvous hashing) -----------------------------------------------------------
def by_key(balancer: Balancer, keys, now: float = 0.0, **kwargs) -> dict[str, str]:
    out = {}
    for key in keys:
        peer = balancer.pick(MODEL, None, now, affinity=key, **kwargs)
        out[key] = peer.name if peer else "-"
    return out


def test_a_key_stays_on_its_peer_and_keys_spread_by_weight():
    balancer = ready_balancer(3, 1)
    keys = [f"conversation {i}" for i in range(4000)]
    first = by_key(balancer, keys)
    assert by_key(balancer, keys) == first  # the same key, the same peer, whatever happened in between
    share = Counter(first.values())["a"] / len(keys)
    assert 0.72 < share < 0.78  # weight 3 of 4
    assert Counter(picks(balancer, 8)) == {"a": 6, "b": 2}  # no key: the smooth weighted round-robin


def test_a_peer_that_goes_away_moves_only_its_own_keys_to_their_next_best():
    balancer = ready_balancer(1, 1, 1)
    keys = [f"k{i}" for i in range(600)]
    before = by_key(balancer, keys)
    balancer.failed(balancer.peers[1], 0.0, "connection refused")  # b is down (max_fails 1)
    after = by_key(balancer, keys)
    assert {k for k in keys if after[k] != before[k]} == {k for k in keys if before[k] == "b"}
    assert "b" not in after.values()
    tried = [p for p in balancer.peers if p.name == "a"]  # failing over from a key's peer: its next-best
    moved = by_key(balancer, [k for k in keys if before[k] == "a"], tried=tried)
    assert set(moved.values()) == {"c"}
    on_b = [k for k in keys if before[k] == "b"]
    assert by_key(balancer, on_b[:1], now=60.0) == {on_b[0]: "b"}  # after fail_timeout one request tries b
    balancer.succeeded(balancer.peers[1], 60.5)  # and it answered: b is back, with all its keys
    assert by_key(balancer, keys, now=61.0) == before


def test_affinity_is_a_routing_setting_that_check_config_validates():
    assert RoutingSection().affinity == "none"
    assert RoutingSection.model_validate({"affinity": "prefix"}).affinity == "prefix"
    with pytest.raises(ValueError, match="affinity"):
        RoutingSection.model_validate({"affinity": "sticky"})


def test_with_affinity_a_success_after_the_window_clears_the_failures_as_with_round_robin():
    balancer = ready_balancer(1, max_fails=2, fail_timeout=10.0)
    peer = balancer.peers[0]
    balancer.failed(peer, 0.0, "timeout")
    balancer.failed(peer, 1.0, "timeout")
    assert by_key(balancer, ["k"], now=5.0) == {"k": "-"}  # down for fail_timeout
    assert by_key(balancer, ["k"], now=12.0) == {"k": "a"}  # tried again: a new window
    balancer.succeeded(peer, 12.5)
    balancer.failed(peer, 13.0, "timeout")  # one failure of max_fails 2: still up
    assert by_key(balancer, ["k"], now=13.5) == {"k": "a"}
