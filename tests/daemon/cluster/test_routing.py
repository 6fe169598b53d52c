"""The routing decision on its own: local or forwarded, and why."""

from __future__ import annotations

import pytest
from dsnode.cluster.routing import LocalModel, RouteRequest, decide

LOCAL = LocalModel("deepseek-r1", max_context=512, ready=True)
LONG = 48


def route(model="deepseek-r1", prompt=10, max_tokens=16, local=LOCAL, peers=("deepseek-r1",), may_forward=True):
    return decide(RouteRequest(model, prompt if model == local.name else None, max_tokens), local, LONG,
                  dict.fromkeys(peers), may_forward)


def test_short_prompt_of_a_local_model_stays_local():
    r = route(prompt=LONG, max_tokens=16)
    assert r.kind == "local"
    assert r.reason == "prompt of 48 tokens <= long_prompt_tokens (48)"


def test_long_prompt_is_forwarded_with_the_context_it_needs():
    r = route(prompt=LONG + 1, max_tokens=16)
    assert (r.kind, r.context) == ("forward", LONG + 1 + 16)
    assert r.reason == "prompt of 49 tokens > long_prompt_tokens (48)"


def test_short_prompt_that_does_not_fit_the_local_context_is_forwarded():
    r = route(prompt=40, max_tokens=500)
    assert (r.kind, r.context) == ("forward", 540)
    assert "> local context limit (512)" in r.reason


def test_without_max_tokens_one_completion_token_must_fit():
    assert route(prompt=40, max_tokens=None).kind == "local"
    assert route(prompt=40, max_tokens=None).context == 41
    tight = LocalModel("deepseek-r1", max_context=40, ready=True)
    assert route(prompt=40, max_tokens=None, local=tight).kind == "forward"


def test_a_model_only_peers_serve_is_forwarded_without_a_token_count():
    r = route(model="deepseek-r1-671b", max_tokens=None, peers=("deepseek-r1-671b",))
    assert (r.kind, r.context) == ("forward", None)
    assert r.reason == "model `deepseek-r1-671b` is served only by upstreams"
    assert route(model="deepseek-r1-671b", max_tokens=100, peers=("deepseek-r1-671b",)).context == 101


def test_an_unknown_model_is_not_found():
    assert route(model="gpt-4", peers=("deepseek-r1",)).kind == "not_found"
    assert route(model="gpt-4", peers=()).kind == "not_found"


@pytest.mark.parametrize("prompt,max_tokens", [(LONG + 100, 16), (40, 1000)])
def test_without_an_upstream_serving_the_model_everything_local_stays_local(prompt, max_tokens):
    # nothing to forward to: the engine answers (a context overrun is its 400, not a 503)
    r = route(prompt=prompt, max_tokens=max_tokens, peers=("other-model",))
    assert r.kind == "local" and "no upstream serves it" in r.reason


def test_a_local_model_that_is_not_ready_is_forwarded_when_peers_serve_it():
    loading = LocalModel("deepseek-r1", max_context=None, ready=False)
    assert route(prompt=None, local=loading).kind == "forward"
    assert route(prompt=None, local=loading).reason == "the local model is not ready"
    assert route(prompt=None, local=loading, peers=()).kind == "local"  # its 503 says why


def test_a_request_that_already_passed_through_is_not_forwarded_again():
    r = route(prompt=LONG + 1, may_forward=False)
    assert r.kind == "local" and "already forwarded to this node" in r.reason
    assert route(model="coder", peers=("coder",), may_forward=False).kind == "loop"


def test_a_request_that_must_stay_is_served_here_and_says_why():
    """Token ids for this node's tokenizer (`stay`): even a long prompt is served here, whose engine
    refuses what does not fit; a model only peers serve is forwarded as ever."""
    stay = "its token ids are this node's tokenizer's"
    r = decide(RouteRequest("deepseek-r1", LONG + 1, 16), LOCAL, LONG, {"deepseek-r1": None}, True, stay)
    assert r.kind == "local" and stay in r.reason
    r = decide(RouteRequest("coder", None, 16), LOCAL, LONG, {"coder": None}, True, stay)
    assert r.kind == "forward"
