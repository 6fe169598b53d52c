"""`Upstreams`: the reload hook and the model views built on the balancer."""

from __future__ import annotations

from dsnode.cluster.upstreams import ReachableModel, Upstreams
from dsnode.config import Config


def config(*upstreams: tuple[str, int], **routing) -> Config:
    return Config.model_validate({
        "node": {"name": "edge-1", "role": "edge"},
        "model": {"name": "local", "path": "/models/local", "backend": "onnx"},
        "routing": {**routing, "upstream": [{"url": u, "weight": w} for u, w in upstreams]},
    })


def advert(name: str, models: dict[str, int], ready: bool = True) -> dict:
    return {"name": name, "ready": ready, "models": [{"name": m, "max_context": c} for m, c in models.items()]}


def test_reload_applies_a_new_upstream_list_and_wakes_the_poller():
    old = config(("http://a:1", 3), ("http://b:1", 1))
    upstreams = Upstreams(old.routing)
    upstreams.reload(old, old)
    assert not upstreams.changed.is_set()  # nothing to do
    new = config(("http://a:1", 1), ("http://c:1", 2))
    upstreams.reload(old, new)
    assert upstreams.changed.is_set()
    assert [(s.url, s.weight) for s in upstreams.states()] == [("http://a:1", 1), ("http://c:1", 2)]


def test_reachable_models_come_from_healthy_peers_only():
    upstreams = Upstreams(config(("http://a:1", 1), ("http://b:1", 1), ("http://c:1", 1)).routing)
    balancer = upstreams.balancer
    balancer.advertised("http://a:1", advert("a", {"r1": 4096, "coder": 8192}), 0.0)
    balancer.advertised("http://b:1", advert("b", {"r1": 16384}), 0.0)
    balancer.advertised("http://c:1", advert("c", {"vision": 4096}, ready=False), 0.0)
    assert upstreams.reachable_models() == [
        ReachableModel("coder", 8192, ("a",)),
        ReachableModel("r1", 16384, ("a", "b")),
    ]
    assert upstreams.known_models() == {"r1", "coder", "vision"}  # a 503 while c loads, not a 404
