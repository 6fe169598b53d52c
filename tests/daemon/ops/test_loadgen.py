"""`dsnode bench load`: the pieces, then real runs against a live node (on the fast tier's FakeEngine) whose
/metrics cross-checks them."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from dsnode.cli import main
from dsnode.ops import loadgen
from dsnode.ops.loadgen import LoadPlan, Outcome, RequestShape, distribution, parse_mix, summarise
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon.api.conftest import MODEL

MIX = "8:6:3,100:6:1"  # the node's context is 512 tokens (the bundled tokenizer: ~2.2 tokens a word here)


def test_parse_mix():
    assert parse_mix("64:64:8, 3000:128:1") == (RequestShape(64, 64, 8.0), RequestShape(3000, 128, 1.0))
    assert parse_mix("10:5") == (RequestShape(10, 5, 1.0),)
    for bad in ("64", "a:b", "0:5", "5:0", "5:5:0", "1:2:3:4"):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_prompts_have_the_asked_length_and_differ_per_request():
    first, again, other = loadgen.make_prompt(50, 1), loadgen.make_prompt(50, 1), loadgen.make_prompt(50, 2)
    assert len(first.split()) == 50 and first == again and first != other


def test_distribution_matches_numpy():
    values = [float(v) for v in range(1, 101)]
    dist = distribution(values)
    assert dist == {
        "mean": 50.5,
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)),
        "max": 100.0,
    }
    assert distribution([]) is None


def test_summary_groups_errors_and_nodes():
    shape = RequestShape(8, 4)
    outcomes = [
        Outcome(
            0,
            shape,
            200,
            None,
            1.0,
            ttft_s=0.2,
            prompt_tokens=10,
            completion_tokens=5,
            node="a",
            route="local",
        ),
        Outcome(
            1,
            shape,
            200,
            None,
            2.0,
            ttft_s=0.4,
            prompt_tokens=12,
            completion_tokens=5,
            node="b",
            route="forwarded",
        ),
        Outcome(
            2,
            shape,
            200,
            None,
            3.0,
            ttft_s=0.6,
            prompt_tokens=14,
            completion_tokens=5,
            node="a",
            route="local",
        ),
        Outcome(3, shape, 429, "server is at capacity", 0.1),
        Outcome(4, shape, None, "ClientConnectorError: refused", 0.1),
        Outcome(5, shape, 200, "stream error: boom", 0.5, node="a", route="local"),
    ]
    report = summarise(LoadPlan("http://x", "m"), outcomes, elapsed_s=2.0)
    assert report["requests"] == {"sent": 6, "ok": 3, "failed": 3, "without_usage": 0}
    assert report["errors"] == {"429": 1, "connection": 1, "stream_error": 1}
    assert report["tokens"] == {"prompt": 36, "completion": 15}
    assert (
        report["throughput"]["requests_per_s"] == 1.5 and report["throughput"]["output_tokens_per_s"] == 7.5
    )
    assert report["nodes"] == [
        {"node": "a", "route": "local", "requests": 2, "prompt_tokens": 24, "completion_tokens": 10},
        {"node": "b", "route": "forwarded", "requests": 1, "prompt_tokens": 12, "completion_tokens": 5},
    ]
    assert report["tpot_s"]["max"] == pytest.approx((3.0 - 0.6) / 4)
    text = loadgen.format_report(report)
    assert "429: 1, connection: 1, stream_error: 1" in text and "server is at capacity" in text


async def counters(client_session, url: str) -> dict[str, float]:
    """The node's own count of answered requests and tokens for the model, from its /metrics."""
    async with client_session.get(f"{url}/metrics") as response:
        text = await response.text()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (
                s.labels.get("model") == MODEL
                and s.labels.get("route") == "local"
                and s.labels.get("status", "200") == "200"
            ):
                found[s.name] = found.get(s.name, 0.0) + s.value
    return {
        k: found.get(k, 0.0)
        for k in ("dsnode_requests_total", "dsnode_prompt_tokens_total", "dsnode_generation_tokens_total")
    }


@pytest.mark.parametrize("stream, endpoint", [(True, "chat"), (False, "completions"), (True, "responses"),
                                              (False, "responses")],
                         ids=["streamed", "whole", "responses-streamed", "responses-whole"])
async def test_load_against_a_live_node_adds_up(server, stream, endpoint):
    import aiohttp

    url = str(server.make_url("")).rstrip("/")
    plan = LoadPlan(
        url,
        await loadgen.first_model(url),
        concurrency=3,
        requests=10,
        mix=parse_mix(MIX),
        stream=stream,
        endpoint=endpoint,
    )
    async with aiohttp.ClientSession() as session:
        before = await counters(session, url)
        outcomes = await loadgen.run_load(plan)
        after = await counters(session, url)
    delta = {k: after[k] - before[k] for k in after}
    report = summarise(plan, outcomes, elapsed_s=1.0)
    assert plan.model == MODEL
    assert report["requests"] == {"sent": 10, "ok": 10, "failed": 0, "without_usage": 0}
    assert [o.index for o in outcomes] == list(range(10))
    # the bench's totals are the server's usage, and the node counted exactly those tokens, and every
    # request as answered (200: the bench reads each stream to its end, it doesn't hang up after [DONE])
    assert (
        report["tokens"]["prompt"]
        == sum(o.prompt_tokens for o in outcomes)
        == delta["dsnode_prompt_tokens_total"]
    )
    assert (
        report["tokens"]["completion"]
        == sum(o.completion_tokens for o in outcomes)
        == delta["dsnode_generation_tokens_total"]
    )
    assert delta["dsnode_requests_total"] == 10
    assert all(1 <= o.completion_tokens <= o.shape.max_tokens for o in outcomes)
    long_prompts = [o.prompt_tokens for o in outcomes if o.shape.prompt_words == 100]
    short_prompts = [o.prompt_tokens for o in outcomes if o.shape.prompt_words == 8]
    assert long_prompts and short_prompts and min(long_prompts) > max(short_prompts)
    assert report["nodes"] == [
        {
            "node": "node-under-test",
            "route": "local",
            "requests": 10,
            "prompt_tokens": report["tokens"]["prompt"],
            "completion_tokens": report["tokens"]["completion"],
        }
    ]
    if stream:
        assert report["ttft_s"] is not None and report["ttft_s"]["max"] <= report["latency_s"]["max"]
    else:
        assert report["ttft_s"] is None


async def test_bench_load_command(server, capsys):
    url = str(server.make_url("")).rstrip("/")
    args = ["bench", "load", "--url", url, "-n", "4", "-c", "2", "--mix", "8:4", "--json"]
    assert await asyncio.to_thread(main, args) == 0
    captured = capsys.readouterr()
    out = captured.out  # the in-process node logs its requests to stdout too
    report, _ = json.JSONDecoder().raw_decode(out, out.index('{\n  "url"'))
    assert report["model"] == MODEL and report["requests"]["ok"] == 4 and report["errors"] == {}
    assert "[4/4]" in captured.err  # the progress line
    assert await asyncio.to_thread(main, [*args[:-1], "--model", "no-such-model", "-q"]) == 0
    text = capsys.readouterr().out
    assert "4 sent, 0 ok, 4 failed" in text and "404: 4" in text


def test_bench_load_when_the_server_cannot_be_reached(capsys):
    from tests.support.nodes import free_port

    assert main(["bench", "load", "--url", f"http://127.0.0.1:{free_port()}", "-n", "1"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_a_reasoning_models_first_token_is_its_reasoning():
    assert loadgen._chunk_text({"delta": {"reasoning_content": "Let me think"}})
    assert loadgen._chunk_text({"delta": {"tool_calls": [{"index": 0}]}})
    assert not loadgen._chunk_text({"delta": {"role": "assistant", "content": ""}})
    assert loadgen._chunk_text({"text": "x"}) == "x"
