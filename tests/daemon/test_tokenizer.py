"""Tokenizer and chat template without transformers: identical to what transformers produces (checked on
the bundled dense model's folder, a `model` test); the rest on the fast tier's tokenizer, the same
recipe trained without torch."""

from __future__ import annotations

import pytest
from dsnode.inference.tokenizer import ChatTemplateError, TextTokenizer

from tests.support.tokenizer import fast_tokenizer, fast_tokenizer_dir  # noqa: F401 - session fixtures

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Call me Ishmael. ¿Qué tal? 日本 🚀"},
]


@pytest.fixture
def tok(fast_tokenizer) -> TextTokenizer:  # noqa: F811 - the session fixture imported above
    return fast_tokenizer


def test_chat_template_matches_transformers(dense_dir):
    transformers = pytest.importorskip("transformers")
    tok = TextTokenizer.from_folder(dense_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(dense_dir))
    assert tok.render_chat(MESSAGES) == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    expected = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert tok.encode_chat(MESSAGES) == list(expected["input_ids"])
    assert tok.encode("Four score and seven") == hf("Four score and seven")["input_ids"]


def test_round_trip_and_special_tokens(tok):
    ids = tok.encode_chat(MESSAGES)
    assert tok.decode(ids, skip_special_tokens=False) == tok.render_chat(MESSAGES)
    assert "<|im_start|>" not in tok.decode(ids)
    assert tok.eos_token == "<|im_end|>" and tok.tokenizer.token_to_id("<|im_end|>") in tok.eos_token_ids
    assert len(tok.digest) == 64


def test_template_errors_are_chat_template_errors(tok):
    broken = TextTokenizer(tok.tokenizer, "{{ raise_exception('roles must alternate') }}", None, None, frozenset(), "x")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        broken.render_chat(MESSAGES)
    none = TextTokenizer(tok.tokenizer, None, None, None, frozenset(), "x")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        none.render_chat(MESSAGES)


def test_folder_without_tokenizer(tmp_path):
    from dsnode.inference.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        TextTokenizer.from_folder(tmp_path)
