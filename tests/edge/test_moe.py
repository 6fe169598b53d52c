"""The bundled DeepSeek-V3 MoE (MLA cache, routed experts) converts and serves through the edge engine."""

from __future__ import annotations

import pytest
from dsnode.edge.manifest import read_manifest

from tests.edge.conftest import convert_quietly, loaded, model_section, onnx_engine, run, tokens_of

pytestmark = pytest.mark.slow


async def test_deepseek_v3_converts_and_generates_like_torch(tmp_path_factory, moe_dir):
    from dsnode.central.transformers_engine import TransformersEngine

    from tests.edge.conftest import BATCHING

    result = convert_quietly(moe_dir, tmp_path_factory.mktemp("moe") / "moe-int8", "int8")
    manifest = read_manifest(result.path)
    assert (manifest.architecture, manifest.context_limit) == ("DeepseekV3ForCausalLM", 2048)
    assert (manifest.kv.key, manifest.kv.value) == ((1, 64), (1, 16))  # MLA: latent + rotary key, one head
    assert result.report.passed and result.report.agreement >= 0.8

    torch_engine = await loaded(TransformersEngine(model_section(moe_dir, "transformers"), BATCHING))
    edge = await loaded(onnx_engine(result.path))
    try:
        same = total = 0
        for prompt in ("Four score and", "It was the best of times", "Call me"):
            ids = tuple(torch_engine.tokenizer.encode(prompt))
            expected = tokens_of(await run(torch_engine, ids, max_tokens=16, ignore_eos=True))
            # each next token after torch's own prefix: one flipped near-tie does not make every later
            # position differ, as it would in two free-running answers
            for i, token in enumerate(expected):
                after = ids + tuple(expected[:i])
                same += tokens_of(await run(edge, after, max_tokens=1, ignore_eos=True)) == [token]
                total += 1
        assert same / total >= 0.9  # the same int8 bar as the dense model, for the same reason
    finally:
        await edge.close()
        await torch_engine.close()

