"""Engines on the bundled tiny MoE (DeepSeek-V3 architecture), shared per session: loading DeepSpeed
ranks costs seconds of CPU, so each configuration starts once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

import pytest
import pytest_asyncio
from dsnode.config import BatchingSection, ModelSection
from dsnode.inference.engine import Delta, Engine, GenerationRequest, SamplingParams

# Text the bundled models were trained on, so greedy continuations are real text.
PROMPTS = (
    "It was the best",
    "Four score and seven years",
    "We hold these truths to be",
    "The Lord is my shepherd",
    "It was the age of",
    "a new nation, conceived",
)

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dsnode" / "torch_extensions"))


def model_section(path: Path, backend: str, **kwargs: object) -> ModelSection:
    return ModelSection(name="tiny-moe", path=path, backend=backend, threads=1, **kwargs)  # type: ignore[arg-type]


async def collect(engine: Engine, prompt_ids: Sequence[int], **params: object) -> list[Delta]:
    request = GenerationRequest(f"t{id(prompt_ids)}", tuple(prompt_ids), SamplingParams(**params))  # type: ignore[arg-type]
    return [delta async for delta in engine.generate(request)]


def token_ids(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


async def next_turn_reuses_the_cache(engine: Engine, reference_greedy: Callable[[Sequence[int], int], list[int]],
                                     opening: str, then: str, n: int) -> None:
    """A prompt that begins with an earlier prompt and its answer (a conversation's next turn) takes
    them from the prompt cache, computes only the rest, and answers as `generate` does."""
    ids = engine.tokenizer.encode(opening)
    first = await collect(engine, ids, max_tokens=n, temperature=0.0, ignore_eos=True)
    follow = ids + token_ids(first) + engine.tokenizer.encode(then)
    deltas = await collect(engine, follow, max_tokens=n, temperature=0.0)
    assert deltas[0].cached_tokens == (len(ids) + n - 1) // 16 * 16 > 0  # the first answer's last token: not fed
    assert token_ids(deltas) == reference_greedy(follow, n)[: len(token_ids(deltas))]


async def third_turn_reuses_two_turns(engine: Engine, reference_greedy: Callable[[Sequence[int], int], list[int]],
                                      opening: str, turns: tuple[str, str], n: int) -> None:
    """A conversation's third turn takes a prefix kept in two host copies (the first turn's, and the
    second's of what it computed after what it took) and answers as `generate` does."""
    history = engine.tokenizer.encode(opening)
    cached = []
    for i, then in enumerate(("", *turns)):
        history = history + (engine.tokenizer.encode(then) if then else [])
        request = GenerationRequest(f"turn {i}", tuple(history), SamplingParams(temperature=0.0, max_tokens=n,
                                                                                ignore_eos=True),
                                    cache_scope="third turn")  # a scope of its own: no other test's entries
        deltas = [delta async for delta in engine.generate(request)]
        assert token_ids(deltas) == reference_greedy(history, n)[:n]
        cached.append(deltas[0].cached_tokens)
        history = history + token_ids(deltas)
    assert cached[0] == 0 and 0 < cached[1] < cached[2]


async def shared_prompt_is_reused(engine: Engine, reference_greedy: Callable[[Sequence[int], int], list[int]],
                                   text: str, n: int) -> None:
    """A request that shares its prompt (`n` choices' first) has it in the prompt cache once prefilled: a
    request admitted after its first token takes it while it still runs, and both answer as `generate`."""
    ids = tuple(engine.tokenizer.encode(text))
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    first = engine.generate(GenerationRequest("lead", ids, params, cache_scope="shared", share_prompt=True))
    lead = [await anext(first)]
    other = [d async for d in engine.generate(GenerationRequest("other", ids, params, cache_scope="shared"))]
    lead += [d async for d in first]
    assert other[0].cached_tokens == (len(ids) - 1) // 16 * 16 > 0 and lead[0].cached_tokens == 0
    assert token_ids(other) == token_ids(lead) == reference_greedy(ids, n)[:n]


@pytest.fixture(scope="session")
def hf_moe(moe_dir):
    """The same checkpoint in plain transformers, for reference outputs."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(str(moe_dir)).eval()


@pytest.fixture(scope="session")
def reference_greedy(hf_moe) -> Callable[[Sequence[int], int], list[int]]:
    """`model.generate` greedy tokens (stopping at EOS, like the engines)."""
    import torch

    def generate(prompt_ids: Sequence[int], max_tokens: int) -> list[int]:
        with torch.no_grad():
            out = hf_moe.generate(torch.tensor([list(prompt_ids)]), max_new_tokens=max_tokens, do_sample=False)
        return out[0, len(prompt_ids):].tolist()

    return generate


async def _loaded(engine: Engine) -> AsyncIterator[Engine]:
    await engine.load()
    try:
        yield engine
    finally:
        await engine.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def transformers_moe(moe_dir):
    from dsnode.central.transformers_engine import TransformersEngine

    async for engine in _loaded(TransformersEngine(model_section(moe_dir, "transformers"), BatchingSection())):
        yield engine


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def deepspeed_tp2(moe_dir):
    """Two CPU ranks over gloo: the tensor-parallel code path a GPU host runs with nccl."""
    from dsnode.central.deepspeed_engine import DeepSpeedEngine

    engine = DeepSpeedEngine(model_section(moe_dir, "deepspeed", tensor_parallel=2, device="cpu"), BatchingSection())
    async for loaded in _loaded(engine):
        yield loaded


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def deepspeed_tp1(moe_dir):
    from dsnode.central.deepspeed_engine import DeepSpeedEngine

    engine = DeepSpeedEngine(model_section(moe_dir, "deepspeed", device="cpu"), BatchingSection())
    async for loaded in _loaded(engine):
        yield loaded


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deepspeed_tp4(moe_dir):
    """Four CPU ranks: two of the bundled MoE's 8 routed experts each."""
    from dsnode.central.deepspeed_engine import DeepSpeedEngine

    section = model_section(moe_dir, "deepspeed", tensor_parallel=4, device="cpu")
    async for loaded in _loaded(DeepSpeedEngine(section, BatchingSection())):
        yield loaded


@pytest.fixture(scope="session")
def v3(tmp_path_factory, moe_dir):
    """(folder, transformers model) of a tiny DeepSeek-V3: 18 routed experts, a non-zero correction
    bias, 9 safetensors shards (`tests/central/tiny_moe.py`)."""
    import torch

    from . import tiny_moe

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tiny-deepseek-v3")
    return folder, tiny_moe.build("deepseek_v3", folder, moe_dir)
