"""The ONNX engine on the converted bundled model, answering as the central (transformers) engine does."""

from __future__ import annotations

import asyncio

import pytest
from dsnode.config import BatchingSection
from dsnode.inference.engine import ContextLengthExceeded, EngineNotReady, GenerationRequest, SamplingParams

from tests.edge.conftest import (
    as_converted_before_last_position,
    loaded,
    onnx_engine,
    run,
    run_all,
    text_of,
    tokens_of,
)

onnxruntime = pytest.importorskip("onnxruntime")  # the `edge` extra: the fast tier's venv has none of it

# Text the bundled model was trained on: its greedy continuations have clear top-1 margins.
CORPUS_PROMPTS = [
    "It was the best of times",
    "Four score and",
    "We hold these truths",
    "Call me",
    "In the beginning God",
    "It is a truth universally",
]


def steps(deltas):
    return [(d.text, d.token_ids, d.completion_tokens, d.finish_reason) for d in deltas]


async def test_fp32_greedy_tokens_equal_the_torch_models(fp32_engine, torch_engine):
    for prompt in CORPUS_PROMPTS + ["The quick brown fox", "def main():"]:
        expected = tokens_of(await run(torch_engine, prompt, max_tokens=24, ignore_eos=True))
        assert tokens_of(await run(fp32_engine, prompt, max_tokens=24, ignore_eos=True)) == expected, prompt


async def test_int8_greedy_tokens_agree_on_the_trained_model(int8_engine, torch_engine):
    # int8 moves logits by up to ~0.4 (see the conversion's validation report); on text it was trained on
    # the model's top-1 margins are wider than that, so at least 90% of the greedy tokens must match
    # position by position (100% observed). Prompts outside the corpus have near-ties and can diverge.
    same = total = 0
    for prompt in CORPUS_PROMPTS:
        expected = tokens_of(await run(torch_engine, prompt, max_tokens=32, ignore_eos=True))
        got = tokens_of(await run(int8_engine, prompt, max_tokens=32, ignore_eos=True))
        same += sum(a == b for a, b in zip(got, expected))
        total += len(expected)
    assert same / total >= 0.9
    text = text_of(await run(int8_engine, "It was the best", max_tokens=14))
    assert text.startswith(" of times, it was the worst of times")


async def test_model_info_names_the_provider_that_runs(int8_engine):
    info = int8_engine.info
    assert (info.backend, info.device, info.quantization) == ("onnx", "CPUExecutionProvider", "int8")
    assert info.architecture == "Qwen2ForCausalLM" and info.max_context == 512
    assert info.extra["providers"] == ["CPUExecutionProvider"]
    assert info.extra["kv_cache"] == "float"
    assert info.extra["prompt_scoring"] == "by_position"  # a folder converted today: last_position exists


async def test_a_folder_converted_before_last_position_still_scores_prompts(int8_dir, tmp_path):
    """The graph as converted before 2026-12-01 (a constant -1 where the input is now): it loads, says
    it scores prompts token by token, and scores them as a new folder does."""
    from dsnode.demo import _onnx_current

    old = as_converted_before_last_position(int8_dir, tmp_path / "old")
    assert not _onnx_current(old) and _onnx_current(int8_dir)  # `dsnode demo` converts its bundled model again
    engines = [await loaded(onnx_engine(folder)) for folder in (old, int8_dir)]
    try:
        assert [e.info.extra["prompt_scoring"] for e in engines] == ["by_token", "by_position"]
        firsts = [(await run(e, "It was the best of times", max_tokens=1, prompt_logprobs=1))[0].prompt_logprobs
                  for e in engines]
        prompt = engines[0].tokenizer.encode("It was the best of times")
        assert [e.token_id for e in firsts[0]] == prompt == [e.token_id for e in firsts[1]]
        assert [e.logprob for e in firsts[0][1:]] == pytest.approx([e.logprob for e in firsts[1][1:]], abs=0.05)
    finally:
        for engine in engines:
            await engine.close()


async def test_streaming_and_stop_sequences_match_the_central_engine(fp32_engine, torch_engine):
    cases = [
        ("It was the best of times", dict(max_tokens=30, stop=("worst",))),
        ("Four score and", dict(max_tokens=30, stop=("\n", "fathers"))),
        ("Call me", dict(max_tokens=40)),  # ends on the end-of-sequence token or the length
        ("We hold these truths", dict(max_tokens=7)),
    ]
    for prompt, params in cases:
        expected = await run(torch_engine, prompt, **params)
        got = await run(fp32_engine, prompt, **params)
        assert steps(got) == steps(expected), prompt
    stopped = await run(fp32_engine, "It was the best of times", max_tokens=30, stop=("worst",))
    assert stopped[-1].finish_reason == "stop" and "worst" not in text_of(stopped)


async def test_max_tokens_ends_with_length(int8_engine):
    deltas = await run(int8_engine, "It was the best of times", max_tokens=5, ignore_eos=True)
    assert [d.completion_tokens for d in deltas] == [1, 2, 3, 4, 5]
    assert [d.finish_reason for d in deltas] == [None] * 4 + ["length"]


async def test_seeded_sampling_matches_the_central_engine(fp32_engine, torch_engine):
    params = dict(max_tokens=20, temperature=0.9, top_p=0.9, top_k=40, seed=1234, ignore_eos=True)
    expected = tokens_of(await run(torch_engine, "Four score and", **params))
    assert tokens_of(await run(fp32_engine, "Four score and", **params)) == expected
    assert tokens_of(await run(fp32_engine, "Four score and", **params)) == expected


async def test_context_limit_errors_match_the_central_engine(int8_engine, torch_engine):
    prompt = "It was the best of times"
    messages = []
    for engine in (torch_engine, int8_engine):
        with pytest.raises(ContextLengthExceeded) as error:
            await run(engine, prompt, max_tokens=510)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "maximum context length is 512" in messages[0]


async def test_configured_context_limit_lowers_the_models(int8_dir):
    engine = await loaded(onnx_engine(int8_dir, max_context=64))
    try:
        assert engine.info.max_context == 64
        with pytest.raises(ContextLengthExceeded):
            await run(engine, "It was the best of times", max_tokens=60)
        assert len(await run(engine, "It was the best of times", max_tokens=50, ignore_eos=True)) == 50
    finally:
        await engine.close()


async def test_concurrent_requests_get_their_alone_answers(int8_engine):
    prompts = CORPUS_PROMPTS + ["The quick brown fox", "def main():"]
    lengths = [8 + 3 * i for i in range(len(prompts))]  # rows leave the batch at different steps
    alone = [tokens_of(await run(int8_engine, p, max_tokens=n, ignore_eos=True)) for p, n in zip(prompts, lengths)]
    together = await asyncio.gather(*(
        run(int8_engine, p, f"c{i}", max_tokens=n, ignore_eos=True)
        for i, (p, n) in enumerate(zip(prompts, lengths))
    ))
    assert [tokens_of(d) for d in together] == alone


async def joined_and_alone(engine) -> tuple[list[int], list[int]]:
    """A request sent while another decodes (it is prefilled in a step where the running one decodes),
    and the same request sent alone: (joined tokens, alone tokens)."""
    late_prompt = "The quick brown fox"
    alone = tokens_of(await run(engine, late_prompt, max_tokens=10, ignore_eos=True))
    started = asyncio.Event()

    async def running() -> list[int]:
        tokens = []
        request = GenerationRequest("long", tuple(engine.tokenizer.encode(CORPUS_PROMPTS[0])),
                                    SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
        async for delta in engine.generate(request):
            tokens += delta.token_ids
            if len(tokens) >= 3:
                started.set()
        return tokens

    first = asyncio.create_task(running())
    await asyncio.wait_for(started.wait(), timeout=60)
    joined = tokens_of(await run(engine, late_prompt, "late", max_tokens=10, ignore_eos=True))
    await first
    return joined, alone


async def test_a_request_joining_a_running_batch_gets_its_alone_answer(int8_engine):
    """The joiner's slot is inside the decoded prefix without a token of its own in that step: what it
    cached must survive it (`SlotRunner`)."""
    joined, alone = await joined_and_alone(int8_engine)
    assert joined == alone


async def test_a_joining_request_on_the_export_graph_and_the_central_engine(int8_dynamic_dir, torch_engine):
    """The same join through the other two runners: the export graph's batched cache (`OnnxRunner`)
    and the central transformers engine."""
    engine = await loaded(onnx_engine(int8_dynamic_dir))
    try:
        joined, alone = await joined_and_alone(engine)
        assert joined == alone
    finally:
        await engine.close()
    joined, alone = await joined_and_alone(torch_engine)
    assert joined == alone


async def test_staggered_requests_under_a_tight_budget_get_their_alone_answers(int8_dir, int8_engine):
    """The real runner through everything the scheduler does at once: requests arriving while others
    decode, prompts prefilled in chunks between other rows' decode steps, sequences preempted when the
    token budget runs out and recomputed from their tokens. Each answer is its answer alone."""
    prompts = [f"{p} and then" for p in CORPUS_PROMPTS]
    alone = [tokens_of(await run(int8_engine, p, max_tokens=20, ignore_eos=True)) for p in prompts]
    batching = BatchingSection(max_batch_tokens=40, prefill_chunk_tokens=4, max_running=8)
    engine = await loaded(onnx_engine(int8_dir, batching))
    decoding = [asyncio.Event() for _ in prompts]  # set once request i has two tokens

    async def staggered(i: int, prompt: str) -> list[int]:
        if i:
            await asyncio.wait_for(decoding[i - 1].wait(), timeout=60)  # joins while i - 1 decodes
        request = GenerationRequest(f"s{i}", tuple(engine.tokenizer.encode(prompt)),
                                    SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
        tokens: list[int] = []
        async for delta in engine.generate(request):
            tokens += delta.token_ids
            if len(tokens) >= 2:
                decoding[i].set()
        return tokens

    try:
        together = await asyncio.gather(*(staggered(i, p) for i, p in enumerate(prompts)))
        assert together == alone
    finally:
        await engine.close()


async def test_chunked_prefill_gives_the_same_tokens(int8_dir, int8_engine):
    prompt = "We hold these truths to be self-evident, that all men are created equal"
    expected = tokens_of(await run(int8_engine, prompt, max_tokens=12, ignore_eos=True))
    batching = BatchingSection(max_batch_tokens=4096, prefill_chunk_tokens=4)
    engine = await loaded(onnx_engine(int8_dir, batching))
    try:
        assert tokens_of(await run(engine, prompt, max_tokens=12, ignore_eos=True)) == expected
        assert [tokens_of(d) for d in await run_all(engine, [prompt, prompt], max_tokens=12, ignore_eos=True)] == [
            expected, expected
        ]
    finally:
        await engine.close()


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="CUDA is here")
async def test_device_cuda_without_cuda_is_refused_clearly(int8_dir):
    engine = onnx_engine(int8_dir, device="cuda")
    with pytest.raises(Exception, match="CUDAExecutionProvider"):
        await engine.load()
    assert not engine.health().ready and "CUDAExecutionProvider" in engine.health().reason
    with pytest.raises(EngineNotReady):
        await run(engine, "Call me", max_tokens=2)



async def test_a_model_converted_for_cuda_is_refused_on_a_cpu_only_host(cuda_conversions):
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is here")
    engine = onnx_engine(cuda_conversions["int8"])
    with pytest.raises(Exception, match="converted for target 'cuda'.*--target cpu"):
        await engine.load()
    assert not engine.health().ready


def test_which_provider_serves_which_target():
    from dsnode.edge.manifest import Manifest
    from dsnode.edge.onnx_engine import device_for_target
    from dsnode.edge.onnx_runner import CPU, CUDA, RunnerError

    def manifest(target: str, graph: str = "gqa") -> Manifest:
        return Manifest("Qwen2ForCausalLM", "qwen2", "int8", 21, "model.onnx", 512, None, {}, "", {}, "",  # type: ignore[arg-type]
                        graph=graph, target=target)

    assert device_for_target(manifest("cuda"), "auto", [CUDA, CPU]) == "cuda"
    assert device_for_target(manifest("cpu"), "auto", [CUDA, CPU]) == "cpu"  # float32 GQA: no CUDA kernel
    assert device_for_target(manifest("cpu", "export"), "auto", [CUDA, CPU]) == "auto"
    for target, device, available in (("cuda", "auto", [CPU]), ("cuda", "cpu", [CUDA, CPU]), ("cpu", "cuda", [CPU])):
        with pytest.raises(RunnerError, match=f"converted for target '{target}'"):
            device_for_target(manifest(target), device, available)


async def test_the_next_turn_of_a_conversation_reuses_the_cache_of_the_last(fp32_dir):
    """A prompt that begins with an earlier prompt and its answer (a chat's next turn) takes their cache
    from the prompt cache: fewer tokens computed, the same greedy answer as an engine without one."""
    caching = await loaded(onnx_engine(fp32_dir))
    plain = await loaded(onnx_engine(fp32_dir, BatchingSection(prompt_cache_mb=0)))
    try:
        first = "It was the best of times, it was the worst of times, it was the age of wisdom"
        turn = await run(caching, first, max_tokens=12, ignore_eos=True)
        ids = caching.tokenizer.encode(first)
        assert turn[0].cached_tokens == 0 and len(ids) > 16
        follow = ids + tokens_of(turn) + caching.tokenizer.encode(" Four score and seven years ago")
        deltas = {}
        for name, engine in (("caching", caching), ("plain", plain)):
            request = GenerationRequest("next", tuple(follow), SamplingParams(temperature=0.0, max_tokens=12))
            deltas[name] = [d async for d in engine.generate(request)]
        held = len(ids) + len(turn) - 1  # the first answer's last token was never fed
        assert deltas["caching"][0].cached_tokens == held // 16 * 16 > 0
        assert deltas["plain"][0].cached_tokens == 0
        assert tokens_of(deltas["caching"]) == tokens_of(deltas["plain"])
        scored = await run(caching, first, max_tokens=1, prompt_logprobs=1)  # every position is needed
        assert scored[0].cached_tokens == 0 and len(scored[0].prompt_logprobs) == len(ids)
        whole = (len(follow) - 1) // 16 * 16  # "next" above (scope "") kept all of `follow`
        for scope, expected in (("another key", 0), ("", whole)):
            request = GenerationRequest("other", tuple(follow), SamplingParams(temperature=0.0, max_tokens=2),
                                        cache_scope=scope)
            assert [d async for d in caching.generate(request)][0].cached_tokens == expected, scope
    finally:
        await caching.close()
        await plain.close()


async def test_a_prompt_shared_by_its_first_choice_is_reused_while_that_choice_runs(fp32_dir):
    """`share_prompt`: the prompt goes into the prompt cache once prefilled, so a request admitted after
    the first token (another choice of the same prompt) takes it while the first still runs, and answers
    as an engine without a cache does; without it, nothing is there to take until the first ends."""
    caching = await loaded(onnx_engine(fp32_dir))
    plain = await loaded(onnx_engine(fp32_dir, BatchingSection(prompt_cache_mb=0)))
    try:
        assert caching.shares_prompts and not plain.shares_prompts
        ids = tuple(caching.tokenizer.encode("It was the best of times, it was the worst of times, it was the "
                                             "age of wisdom, it was the age of foolishness"))
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        expected = tokens_of([d async for d in plain.generate(GenerationRequest("ref", ids, params))])
        # The first runs far longer than the other, so it is still running when the other ends (a
        # first of 16 tokens could end, and be kept on release, before the other is admitted).
        long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        for share, cached in ((False, 0), (True, (len(ids) - 1) // 16 * 16)):
            scope = f"share {share}"
            first = caching.generate(GenerationRequest(f"first-{share}", ids, long, cache_scope=scope,
                                                       share_prompt=share))
            lead = [await anext(first)]  # prefilled (and kept, when shared); still running
            other = [d async for d in caching.generate(GenerationRequest(f"other-{share}", ids, params,
                                                                         cache_scope=scope))]
            while len(tokens_of(lead)) < len(expected):
                lead.append(await anext(first))
            await first.aclose()  # cancelled
            assert other[0].cached_tokens == cached and lead[0].cached_tokens == 0
            assert tokens_of(other) == tokens_of(lead) == expected
    finally:
        await caching.close()
        await plain.close()
