"""Incremental detokenization: split UTF-8 characters, stop strings held back and cut. On the fast tier's
tokenizer: the bundled models' byte-level BPE, trained without torch."""

from __future__ import annotations

import pytest
from dsnode.inference.detokenizer import Detokenizer
from dsnode.inference.tokenizer import TextTokenizer

from tests.support.tokenizer import fast_tokenizer, fast_tokenizer_dir  # noqa: F401 - session fixtures

TEXT = "Call me Ishmael. ¿Qué tal? 日本 🚀 — the end."


@pytest.fixture
def tok(fast_tokenizer) -> TextTokenizer:  # noqa: F811 - the session fixture imported above
    return fast_tokenizer


def stream(tok, text, stop=()):
    detok = Detokenizer(tok, tuple(stop))
    pieces = [detok.push(t) for t in tok.encode(text)]
    pieces.append(detok.flush())
    return pieces, detok.stopped


def test_incremental_text_equals_full_decode(tok):
    pieces, stopped = stream(tok, TEXT)
    assert "".join(pieces) == TEXT and not stopped
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    assert len([p for p in pieces if p]) > 5  # and really incremental


def test_stop_string_is_cut_and_not_returned(tok):
    pieces, stopped = stream(tok, TEXT, stop=["Qué"])
    assert "".join(pieces) == "Call me Ishmael. ¿" and stopped


def test_earliest_of_several_stops_wins(tok):
    pieces, _ = stream(tok, TEXT, stop=["end", "Ishmael"])
    assert "".join(pieces) == "Call me "


def test_text_that_might_start_a_stop_is_held_back_until_it_cannot(tok):
    detok = Detokenizer(tok, ("Ishmael!",))
    released = "".join(detok.push(t) for t in tok.encode("Call me Ishmael"))
    assert released == "Call me "  # "Ishmael" is held: it could still become the stop string
    released += "".join(detok.push(t) for t in tok.encode("."))
    assert released == "Call me Ishmael."  # now it cannot
    assert detok.flush() == "" and not detok.stopped


def test_stop_spanning_many_tokens(tok):
    pieces, stopped = stream(tok, TEXT, stop=["tal? 日本"])
    assert "".join(pieces) == "Call me Ishmael. ¿Qué " and stopped
