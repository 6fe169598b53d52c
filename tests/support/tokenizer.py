"""A real `TextTokenizer` for the fast tier, with no torch, no transformers and no model build.

The bundled models' tokenizer is a byte-level BPE trained on a short public-domain corpus with a ChatML
template (`dsnode.central.bundled`). Training it takes a few tens of milliseconds, so the fast tier
trains the same recipe into a temporary folder once per session instead of waiting for the bundled
models (minutes, and torch) to be built. The folder is written in the Hugging Face layout that
`TextTokenizer.from_folder` reads, so the tokenizer is loaded the way a node loads it.

Use the session fixtures from a conftest: `from tests.support.tokenizer import fast_tokenizer  # noqa: F401`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dsnode.central.bundled import VOCAB_SIZE
from dsnode.central.bundled.corpus import TEXT
from dsnode.central.bundled.tokenizer import BOS, CHAT_TEMPLATE, IM_END, PAD, train_tokenizer
from dsnode.inference.tokenizer import TextTokenizer


def write_tokenizer_folder(folder: Path) -> Path:
    """Train the bundled recipe's tokenizer and write what `TextTokenizer.from_folder` reads:
    tokenizer.json, tokenizer_config.json (special tokens, ChatML template), generation_config.json
    (the end-of-sequence id, <|im_end|>, as the bundled models have it)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(TEXT, VOCAB_SIZE)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": IM_END, "pad_token": PAD, "chat_template": CHAT_TEMPLATE}
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "generation_config.json", {"eos_token_id": tok.token_to_id(IM_END)})
    return folder


def _write_json(path: Path, data: dict[str, object]) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def fast_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only the bundled tokenizer's files (for code that takes a model folder)."""
    return write_tokenizer_folder(tmp_path_factory.mktemp("fast-tokenizer"))


@pytest.fixture(scope="session")
def fast_tokenizer(fast_tokenizer_dir: Path) -> TextTokenizer:
    """The bundled tokenizer with its ChatML template, loaded as a node loads it."""
    return TextTokenizer.from_folder(fast_tokenizer_dir)
