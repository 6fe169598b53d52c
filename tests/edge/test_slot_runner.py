"""`SlotRunner` on the float32 GQA graph (exact to torch up to summation order): slots joining and
leaving the running batch, chunked prefill into a slot, growth of the in-place cache, and its limits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dsnode.edge import slot_runner as slot_module
from dsnode.edge.onnx_runner import RunnerError, open_session
from dsnode.edge.slot_runner import SlotRunner

from tests.edge.conftest import as_converted_before_last_position

PROMPTS = {"a": [5, 17, 99, 200, 31, 8, 77], "b": [40, 41], "c": [300, 12, 12, 64]}
THEN = [3, 150, 9]


@pytest.fixture()
def runner(fp32_dir):
    runner = SlotRunner(open_session(fp32_dir / "model.onnx", "cpu", threads=1), max_length=512)
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def torch_model(dense_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()


def expected_logits(model, prompt: list[int], then: list[int]) -> np.ndarray:
    """Torch's logits (len(then) + 1, V) at the last prompt position and after each fed token."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + then])).logits[0].numpy()
    return logits[len(prompt) - 1:]


def test_a_batch_of_different_lengths_gives_each_row_the_source_models_logits(runner, torch_model):
    got = {seq: [runner.prefill(seq, prompt, 0)] for seq, prompt in PROMPTS.items()}
    order = ["c", "a", "b"]  # any order: rows are looked up, not assumed
    for token in THEN:
        for seq, row in zip(order, runner.decode(order, [token] * 3)):
            got[seq].append(row)
    for seq, prompt in PROMPTS.items():
        np.testing.assert_allclose(np.stack(got[seq]), expected_logits(torch_model, prompt, THEN), atol=1e-4)


def test_rows_in_slot_order_are_the_same_rows_and_outlive_the_next_step(runner, torch_model):
    for seq, prompt in PROMPTS.items():
        runner.prefill(seq, prompt, 0)
    order = ["a", "b", "c"]  # slots 0, 1, 2: the step binds the inputs whole and copies the logits whole
    first = runner.decode(order, [3, 3, 3])
    second = runner.decode(order, [150, 150, 150])
    for row, seq in enumerate(order):  # the first step's rows were not overwritten by the second step
        want = expected_logits(torch_model, PROMPTS[seq], [3, 150])
        np.testing.assert_allclose(first[row], want[1], atol=1e-4)
        np.testing.assert_allclose(second[row], want[2], atol=1e-4)


def test_a_leaving_sequence_frees_its_slot_without_disturbing_the_others(runner, torch_model):
    for seq, prompt in PROMPTS.items():
        runner.prefill(seq, prompt, 0)
    runner.decode(["a", "b", "c"], [3, 3, 3])
    runner.release("a")  # slot 0 is free now: a hole below the running batch
    rows = runner.decode(["b", "c"], [150, 150])
    runner.prefill("d", PROMPTS["a"], 0)  # joins in the freed slot
    assert runner.slot_of == {"b": 1, "c": 2, "d": 0}
    joined = runner.decode(["d", "b"], [3, 9])
    np.testing.assert_allclose(rows[0], expected_logits(torch_model, PROMPTS["b"], [3, 150])[-1], atol=1e-4)
    np.testing.assert_allclose(rows[1], expected_logits(torch_model, PROMPTS["c"], [3, 150])[-1], atol=1e-4)
    np.testing.assert_allclose(joined[0], expected_logits(torch_model, PROMPTS["a"], [3])[-1], atol=1e-4)
    np.testing.assert_allclose(joined[1], expected_logits(torch_model, PROMPTS["b"], [3, 150, 9])[-1], atol=1e-4)


def test_chunked_prefill_continues_where_the_previous_chunk_stopped(runner, torch_model):
    prompt = PROMPTS["a"]
    runner.prefill("x", prompt[:3], 0)
    last = runner.prefill("x", prompt[3:], 3)
    np.testing.assert_allclose(last, expected_logits(torch_model, prompt, [])[0], atol=1e-4)
    with pytest.raises(RunnerError, match="prefill from 2, but 7 tokens are cached"):
        runner.prefill("x", [1], 2)
    with pytest.raises(RunnerError, match="without a cache"):
        runner.prefill("new", [1], 4)


def test_prefill_all_gives_every_positions_logits_in_chunks(runner, torch_model):
    """A prompt being scored: the graph's optional `last_position` input asks for every position."""
    prompt, want = PROMPTS["a"], None
    assert runner.picks_positions
    with torch.inference_mode():
        want = torch_model(input_ids=torch.tensor([prompt])).logits[0].numpy()
    first = runner.prefill_all("x", prompt[:4], 0)
    rest = runner.prefill_all("x", prompt[4:], 4)
    assert first.shape == (4, runner.vocab) and rest.shape == (3, runner.vocab)
    np.testing.assert_allclose(np.concatenate([first, rest]), want, atol=1e-4)
    after = runner.decode(["x"], [3])  # the cache holds the prompt as after a plain prefill
    np.testing.assert_allclose(after[0], expected_logits(torch_model, prompt, [3])[-1], atol=1e-4)


def test_a_graph_converted_before_last_position_is_scored_one_token_at_a_time(fp32_dir, torch_model, tmp_path):
    """Folders converted before 2026-12-01 gather a constant -1: prefill_all feeds them token by token."""
    folder = as_converted_before_last_position(fp32_dir, tmp_path / "old")
    old = SlotRunner(open_session(folder / "model.onnx", "cpu", threads=1), max_length=512)
    assert not old.picks_positions
    prompt = PROMPTS["a"]
    with torch.inference_mode():
        want = torch_model(input_ids=torch.tensor([prompt])).logits[0].numpy()
    np.testing.assert_allclose(old.prefill_all("x", prompt, 0), want, atol=1e-4)
    np.testing.assert_allclose(old.prefill("y", prompt, 0), want[-1], atol=1e-4)


def test_the_cache_grows_in_slots_and_length_and_keeps_what_it_holds(fp32_dir, torch_model, monkeypatch):
    monkeypatch.setattr(slot_module, "INITIAL_SLOTS", 1)
    monkeypatch.setattr(slot_module, "INITIAL_LENGTH", 4)
    monkeypatch.setattr(slot_module, "LENGTH_STEP", 1)
    runner = SlotRunner(open_session(fp32_dir / "model.onnx", "cpu", threads=1), max_length=512)
    got = {seq: [runner.prefill(seq, prompt, 0)] for seq, prompt in PROMPTS.items()}
    assert (runner.cache.slots, runner.cache.length) == (4, 8)  # "a": 7 tokens and a quarter
    for token in THEN:
        for seq, row in zip(PROMPTS, runner.decode(list(PROMPTS), [token] * 3)):
            got[seq].append(row)
    assert (runner.cache.slots, runner.cache.length) == (4, 12)  # grown again while decoding, at 9
    for seq, prompt in PROMPTS.items():
        np.testing.assert_allclose(np.stack(got[seq]), expected_logits(torch_model, prompt, THEN), atol=1e-4)


@pytest.mark.parametrize(("needed", "current", "limit", "grown"), [
    (512, 256, 4096, 640),  # a 512-token prompt leaves room for a 128-token answer
    (641, 640, 4096, 960),  # at least 1.5x: a long answer grows a few times, not every 64 tokens
    (300, 256, 320, 320),  # never past the context limit
    (3, 2, 4096, 64),  # in steps of 64
])
def test_the_cache_grows_to_what_is_needed_and_a_quarter_in_steps(needed, current, limit, grown):
    assert slot_module.grown_length(needed, current, limit) == grown


def test_the_context_limit_is_enforced(fp32_dir):
    runner = SlotRunner(open_session(fp32_dir / "model.onnx", "cpu", threads=1), max_length=8)
    runner.prefill("x", list(range(4, 12)), 0)
    with pytest.raises(RunnerError, match="9 tokens exceed the model's context limit of 8"):
        runner.decode(["x"], [5])


def test_the_cache_layout_is_read_from_the_graph(runner, dense_dir):
    vocab = json.loads((dense_dir / "config.json").read_text())["vocab_size"]  # 512 + the format markers
    assert (runner.spec.layers, runner.spec.kv_heads, runner.spec.head_dim) == (4, 2, 32)
    assert runner.spec.dtype is np.float32 and runner.device == "cpu" and runner.vocab == vocab


def test_a_live_sequence_left_out_of_a_step_keeps_its_cache(runner, torch_model):
    """A sequence between prefill chunks, or prefilled in the step others decode in, has a slot inside
    the decoded prefix but no token in the step: its row is computed and thrown away without writing
    over anything it has cached."""
    runner.prefill("x", PROMPTS["b"], 0)
    runner.prefill("b", PROMPTS["b"], 0)  # slots 0 and 1
    runner.release("x")
    runner.prefill("a", PROMPTS["a"][:4], 0)  # joins slot 0, first chunk only
    runner.decode(["b"], [3])  # a is live, inside the prefix, not in the step
    runner.prefill("a", PROMPTS["a"][4:], 4)
    runner.decode(["b"], [150])
    rows = runner.decode(["a", "b"], [3, 9])
    np.testing.assert_allclose(rows[0], expected_logits(torch_model, PROMPTS["a"], [3])[-1], atol=1e-4)
    np.testing.assert_allclose(rows[1], expected_logits(torch_model, PROMPTS["b"], [3, 150, 9])[-1], atol=1e-4)


# --- the prompt cache ------------------------------------------------------------------------------
LONG = list(range(40, 80))  # 40 tokens: two whole blocks of 16 and 8 more


class Admitting(SlotRunner):
    def admit(self, seq_id: str, tokens: list[int], scope: str = "") -> np.ndarray:
        """As the engine admits a sequence: asked for a cached prefix (which also tells its scope), then
        the rest prefilled."""
        start = self.reuse_prefix(seq_id, tokens, scope)
        return self.prefill(seq_id, tokens[start:], start)


@pytest.fixture()
def caching(fp32_dir):
    runner = Admitting(open_session(fp32_dir / "model.onnx", "cpu", threads=1), max_length=512,
                       prompt_cache_bytes=64 * 2**20)
    yield runner
    runner.close()


def test_a_released_sequence_gives_a_later_prompt_its_prefix(caching, torch_model):
    caching.admit("first", LONG)
    caching.decode(["first"], [3])
    caching.release("first")  # kept: its 41 positions
    assert len(caching.prompts) == 1 and caching.prompts.nbytes == 41 * caching.cache.token_bytes()
    caching.prefill("other", [7] * 20, 0)  # takes slot 0 and overwrites the first positions there (not
    # looked up, so not kept either: whose would it be?)
    then = LONG[:35] + [250, 251]  # shares 35 tokens: two blocks are reused
    assert caching.reuse_prefix("next", then) == 32
    assert "next" not in caching.slot_of  # a lookup only: the slot and the copy come with its first step
    logits = caching.prefill("next", then[32:], 32)
    assert caching.slot_of["next"] == 1 and caching.fed["next"] == then
    step = caching.decode(["next", "other"], [9, 9])
    want = expected_logits(torch_model, then, [9])
    np.testing.assert_allclose(logits, want[0], atol=1e-4)
    np.testing.assert_allclose(step[0], want[1], atol=1e-4)
    np.testing.assert_allclose(step[1], expected_logits(torch_model, [7] * 20, [9])[1], atol=1e-4)


def test_a_prompt_held_whole_feeds_only_its_last_token_and_may_decode_first(caching, torch_model):
    caching.admit("first", LONG)
    caching.release("first")
    caching.prefill("other", [7] * 20, 0)  # slot 0, where the first's positions still lie
    prompt = LONG[:33]  # 33 tokens cached; 32 reused, the last one is fed by a decode step
    assert caching.reuse_prefix("again", prompt) == 32
    row = caching.decode(["again"], [prompt[-1]])[0]
    assert caching.slot_of["again"] == 1
    np.testing.assert_allclose(row, expected_logits(torch_model, prompt, [])[0], atol=1e-4)
    caching.release("again")  # its 33 positions are a prefix of the first entry's 40: not kept twice
    assert len(caching.prompts) == 1 and caching.prompts.nbytes == 40 * caching.cache.token_bytes()


def test_a_conversation_kept_turn_by_turn_is_copied_once_and_its_third_turn_is_exact(caching, torch_model,
                                                                                     monkeypatch):
    """Each turn's entry shares the host copies its sequence took and adds a copy of the turn alone; the
    third turn, built from three copies made by three sequences, gives torch's logits."""
    copied: list[tuple[int, int]] = []
    copy_out = caching.cache.copy_out
    monkeypatch.setattr(caching.cache, "copy_out", lambda slot, start, end: (copied.append((start, end)),
                                                                             copy_out(slot, start, end))[1])
    history = list(LONG)  # 40
    caching.admit("turn 1", history)
    caching.release("turn 1")
    for turn, new in ((2, list(range(100, 130))), (3, list(range(200, 230)))):
        caching.prefill("noise", [7] * 60, 0)  # a neighbour writes slots before the next turn comes
        caching.release("noise")  # (not looked up: not kept)
        history = history + new
        logits = caching.admit(f"turn {turn}", history)
        np.testing.assert_allclose(logits, expected_logits(torch_model, history, [])[0], atol=1e-4)
        caching.release(f"turn {turn}")
    assert copied == [(0, 40), (32, 70), (64, 100)]  # 40 + 38 + 36 positions, not 40 + 70 + 100
    assert len(caching.prompts) == 1 and caching.prompts.nbytes == 100 * caching.cache.token_bytes()


def test_short_or_unshared_prompts_reuse_nothing_and_a_gpu_keeps_no_cache(caching, runner):
    caching.admit("short", LONG[:15])  # under one block: not kept
    caching.release("short")
    assert len(caching.prompts) == 0
    caching.admit("first", LONG)
    caching.release("first")
    assert caching.reuse_prefix("x", [1] + LONG) == 0 and "x" not in caching.slot_of
    assert caching.reuse_prefix("y", LONG[:16]) == 0  # one block, but its last token must be fed
    assert runner.reuse_prefix("first", LONG) == 0  # no capacity (the default, and any GPU runner)
    runner.prefill("first", LONG, 0)
    runner.release("first")
    assert runner.reuse_prefix("again", LONG) == 0 and len(runner.prompts) == 0


def test_the_cache_survives_growth_and_a_sequence_dropped_before_its_copy_keeps_nothing(fp32_dir, torch_model,
                                                                                        monkeypatch):
    monkeypatch.setattr(slot_module, "INITIAL_SLOTS", 1)
    monkeypatch.setattr(slot_module, "INITIAL_LENGTH", 48)
    runner = Admitting(open_session(fp32_dir / "model.onnx", "cpu", threads=1), 512, prompt_cache_bytes=2**26)
    runner.admit("first", LONG)
    runner.release("first")
    runner.prefill("busy", [5] * 30, 0)
    assert runner.reuse_prefix("dropped", LONG) == 32
    runner.release("dropped")  # aborted before any step: it took nothing and keeps nothing
    assert len(runner.prompts) == 1 and "dropped" not in runner.slot_of
    prompt = LONG + list(range(100, 130))  # 70 tokens: longer than the buffers are
    assert runner.reuse_prefix("grown", prompt) == 32
    logits = runner.prefill("grown", prompt[32:], 32)  # a second slot (the buffers double), then longer
    assert (runner.cache.slots, runner.slot_of["grown"]) == (2, 1) and runner.cache.length >= 70
    np.testing.assert_allclose(logits, expected_logits(torch_model, prompt, [])[0], atol=1e-4)
    runner.release("grown")
    assert len(runner.prompts) == 1 and runner.prompts.nbytes == 70 * runner.cache.token_bytes()  # replaced the first
