"""An advertisement is untrusted input: each field of the wrong type counts as absent, and what the
balancer says about a peer never reads `None` where a reason belongs."""

from __future__ import annotations

import pytest
from dsnode.cluster.balancer import Balancer
from dsnode.config import RoutingSection

URL = "http://10.0.0.1:8000"
MODEL = "deepseek-r1"


def balancer(max_fails: int = 1) -> Balancer:
    return Balancer(RoutingSection.model_validate({"max_fails": max_fails, "upstream": [{"url": URL}]}))


def advert(**fields) -> dict:
    return {"name": "central-1", "role": "central", "ready": True, "reason": "",
            "models": [{"name": MODEL, "max_context": 4096}], **fields}


@pytest.mark.parametrize("ready", ["yes", 1, "true", None, [True], {"ready": True}])
def test_ready_must_be_true_itself(ready):
    b = balancer()
    b.advertised(URL, advert(ready=ready), 0.0)
    peer = b.peers[0]
    assert peer.ready is False and not peer.healthy(0.0)
    assert peer.last_error.startswith("its advertisement's `ready` is not true or false (got ")
    assert b.pick(MODEL, None, 0.0) is None


def test_fields_of_the_wrong_type_count_as_absent():
    b = balancer()
    models = [{"name": MODEL, "max_context": "4096"}, {"name": 7}, "coder", {"name": "coder", "max_context": True},
              {"name": "vision", "max_context": -5}, {"name": ""}]
    b.advertised(URL, advert(name=["central-1"], role=3, models=models), 0.0)
    peer = b.peers[0]
    assert (peer.name, peer.role, peer.ready) == (None, None, True)
    assert peer.models == {MODEL: None, "coder": None, "vision": None}
    b.advertised(URL, advert(models={"deepseek-r1": 4096}), 0.0)
    assert b.peers[0].models == {}
    b.advertised(URL, advert(ready=False, reason={"why": "x"}), 0.0)
    assert b.peers[0].last_error == "not ready: no reason given"
    b.advertised(URL, advert(name="n" * 10_000), 0.0)
    assert len(b.peers[0].name) == 256


def test_model_limits_are_the_largest_advertised_or_unknown():
    b = Balancer(RoutingSection.model_validate({"upstream": [{"url": URL}, {"url": "http://10.0.0.2:8000"}]}))
    b.advertised(URL, advert(models=[{"name": MODEL, "max_context": 4096}, {"name": "coder", "max_context": 8}]), 0)
    b.advertised("http://10.0.0.2:8000", advert(models=[{"name": MODEL, "max_context": 16384},
                                                        {"name": "coder"}]), 0)
    assert b.model_limits() == {MODEL: 16384, "coder": None}


def test_a_peer_down_after_a_failure_says_which_even_once_its_poll_answers_again():
    b = balancer()
    b.advertised(URL, advert(), 0.0)
    peer = b.pick(MODEL, None, 1.0)
    failure = "cannot connect to 10.0.0.1:8000: Connection refused"
    b.failed(peer, 1.0, failure)
    b.advertised(URL, advert(), 1.5)  # the next poll answers (no monotonic time: last_error is cleared)...
    why = b.why_none(MODEL, None, 2.0)
    assert why.endswith(f"last error: {failure}")  # ...the 503 still names the failure, not None
    assert "None" not in why
    b.advertised(URL, advert(), 1.5, now=2.0)  # as the poller says it: still down, so still the reason
    assert b.states(2.0)[0].last_error == failure
    b.advertised(URL, advert(), 20.0, now=20.0)  # fail_timeout (10 s) later: no longer down
    assert b.states(20.0)[0].last_error is None
