"""The routing decision at the edges of what fits: a long prompt that fits here falls back to this
node, and a request that no node can hold is final (400), never a 503 a client would retry."""

from __future__ import annotations

from dsnode.cluster.routing import LocalModel, RouteRequest, decide

LOCAL = LocalModel("deepseek-r1", max_context=512, ready=True)
LONG = 48


def route(prompt=10, max_tokens=16, peers=None, model="deepseek-r1", local=LOCAL, may_forward=True):
    peers = {"deepseek-r1": 2048} if peers is None else peers
    return decide(RouteRequest(model, prompt if model == local.name else None, max_tokens), local, LONG, peers,
                  may_forward)


def test_a_long_prompt_that_fits_here_is_forwarded_with_a_local_fallback():
    r = route(prompt=LONG + 1, max_tokens=16)
    assert (r.kind, r.fallback, r.context) == ("forward", True, LONG + 17)


def test_a_long_prompt_that_does_not_fit_here_has_no_fallback():
    r = route(prompt=500, max_tokens=100)
    assert (r.kind, r.fallback) == ("forward", False)
    assert route(prompt=LONG + 1, local=LocalModel("deepseek-r1", None, False)).fallback is False  # not loaded


def test_a_request_no_node_can_hold_is_too_long_with_the_largest_limit():
    for prompt, max_tokens in ((3000, 16), (40, 3000), (2048, None)):
        r = route(prompt=prompt, max_tokens=max_tokens)
        assert (r.kind, r.limit) == ("too_long", 2048), (prompt, max_tokens)
    bigger_here = route(prompt=600, max_tokens=100, peers={"deepseek-r1": 300})
    assert (bigger_here.kind, bigger_here.limit) == ("too_long", 512)  # this node's limit is the largest


def test_exactly_the_largest_limit_still_fits():
    assert route(prompt=2000, max_tokens=48).kind == "forward"
    assert route(prompt=2000, max_tokens=49).kind == "too_long"


def test_an_upstream_limit_not_known_yet_is_no_reason_to_refuse():
    assert route(prompt=5000, peers={"deepseek-r1": None}).kind == "forward"


def test_a_model_only_upstreams_serve_is_too_long_when_max_tokens_alone_overflows_them():
    r = route(model="r1-671b", max_tokens=4096, peers={"r1-671b": 4096})
    assert (r.kind, r.limit, r.context) == ("too_long", 4096, 4097)
    assert route(model="r1-671b", max_tokens=4095, peers={"r1-671b": 4096}).kind == "forward"
    assert route(model="r1-671b", max_tokens=None, peers={"r1-671b": 4096}).kind == "forward"


def test_a_forwarded_request_is_not_judged_again_here():
    # it came through another node: the local engine's own check answers (the same 400)
    assert route(prompt=3000, may_forward=False).kind == "local"
