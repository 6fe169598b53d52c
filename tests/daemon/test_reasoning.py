"""Splitting `<think>…</think>` from the answer, on whole texts and on every way a stream can cut them."""

from __future__ import annotations

import itertools

import pytest
from dsnode.inference.reasoning import ReasoningCounter, ReasoningSplitter, prompt_opens_reasoning, split_reasoning


def streamed(chunks: list[str], in_reasoning: bool = False) -> tuple[str, str]:
    splitter = ReasoningSplitter(in_reasoning)
    pieces = [p for chunk in chunks for p in splitter.push(chunk)] + splitter.flush()
    reasoning = "".join(t for channel, t in pieces if channel == "reasoning")
    content = "".join(t for channel, t in pieces if channel == "content")
    return reasoning, content


def every_three_way_cut(text: str):
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        yield [text[:i], text[i:j], text[j:]]


@pytest.mark.parametrize("text, in_reasoning, reasoning, content", [
    ("<think>\nLincoln.\n</think>\n\nseven years", False, "\nLincoln.\n", "\n\nseven years"),
    ("\n <think>a</think>b", False, "a", "b"),  # whitespace before the opening tag is not content
    ("Lincoln.\n</think>\n\nseven", True, "Lincoln.\n", "\n\nseven"),  # the prompt opened it
    ("no tags at all", False, "", "no tags at all"),
    ("answer <think>later</think> is text", False, "", "answer <think>later</think> is text"),
    ("a </think> outside reasoning", False, "", "a </think> outside reasoning"),
    ("<think>cut in the mid", False, "cut in the mid", ""),  # max_tokens inside the reasoning
    ("<think>cut at </thi", False, "cut at </thi", ""),  # ... inside the closing tag
    ("<thi", False, "", "<thi"),  # a cut opening tag at the very end is text
    ("<think></think>", False, "", ""),
])
def test_every_split_of_the_stream_gives_the_whole_answers_split(text, in_reasoning, reasoning, content):
    assert streamed([text], in_reasoning) == (reasoning, content)
    for chunks in every_three_way_cut(text):
        assert streamed(chunks, in_reasoning) == (reasoning, content), chunks


def test_tags_split_one_character_per_token():
    text = "<think>x < y, and </b> is not the tag</think>done"
    assert streamed(list(text)) == ("x < y, and </b> is not the tag", "done")


def test_whole_answer_says_none_when_the_model_did_not_reason():
    assert split_reasoning("plain") == (None, "plain")
    assert split_reasoning("<think>r</think>c") == ("r", "c")
    assert split_reasoning("r</think>c", in_reasoning=True) == ("r", "c")
    assert split_reasoning("<think></think>c") == ("", "c")


def test_held_text_is_released_as_soon_as_it_is_known():
    splitter = ReasoningSplitter(in_reasoning=True)
    assert splitter.push("abc</") == [("reasoning", "abc")]  # "</" may start </think>: held
    assert splitter.push("b>") == [("reasoning", "</b>")]  # it did not
    assert splitter.push("</think>ok") == [("content", "ok")]


def test_prompt_opens_reasoning_when_it_ends_with_the_tag():
    assert prompt_opens_reasoning("<｜Assistant｜><think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")


@pytest.mark.parametrize("tokens, opened, reasoning", [
    (["<think>", "\n", "a", "b", "</", "think", ">", "\n\n", "c", "d"], False, 7),  # the tags count, split or not
    (["a", "b", "</think>", "c"], True, 3),  # the prompt opened it
    (["plain", " answer"], False, 0),
    (["<think>", "cut", " off"], False, 3),  # max_tokens inside the reasoning: all of it
    (["a <think>", "b"], False, 0),  # a tag after text is text
])
def test_reasoning_tokens_are_those_from_the_opening_tag_to_the_closing_one(tokens, opened, reasoning):
    counter = ReasoningCounter(ReasoningSplitter(in_reasoning=opened))
    for n, token in enumerate(tokens, 1):
        counter.push(token, n)
    assert counter.tokens == reasoning


def test_a_delta_of_several_tokens_counts_them_all():
    counter = ReasoningCounter(ReasoningSplitter())
    counter.push("<think>ab", 3)  # three tokens in one delta (a held multi-byte character, say)
    counter.push("</think>c", 5)  # the closing tag and an answer token: counted with the tag
    counter.push("de", 7)
    assert counter.tokens == 5
