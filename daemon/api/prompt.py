"""A request's prompts as token ids, with the local model's tokenizer and chat template."""

from __future__ import annotations

import asyncio

from ..inference.tokenizer import TextTokenizer
from .errors import bad_request
from .schemas import Body, ChatCompletionRequest
from .tools import template_messages

# Tokenizing prompts this long moves off the event loop (tokenizers is fast, but not free).
TOKENIZE_IN_THREAD_CHARS = 32_768


async def prompt_token_ids(tokenizer: TextTokenizer, body: Body) -> list[list[int]]:
    """One list of token ids per prompt: a chat's one; a text completion's one or several."""
    if _prompt_chars(body) > TOKENIZE_IN_THREAD_CHARS:
        return await asyncio.to_thread(_tokenize, tokenizer, body)
    return _tokenize(tokenizer, body)


def _prompt_chars(body: Body) -> int:
    if isinstance(body, ChatCompletionRequest):
        return sum(len(m.text()) for m in body.messages)
    return sum(len(p) if isinstance(p, str) else 0 for p in body.prompts())


def _tokenize(tokenizer: TextTokenizer, body: Body) -> list[list[int]]:
    if isinstance(body, ChatCompletionRequest):
        return [tokenizer.encode_chat(*template_messages(body, tokenizer))]
    return [tokenizer.encode(p) if isinstance(p, str) else _checked_ids(tokenizer, p) for p in body.prompts()]


def _checked_ids(tokenizer: TextTokenizer, ids: list[int]) -> list[int]:
    too_big = [i for i in ids if i >= tokenizer.vocab_size]
    if too_big:
        raise bad_request(f"Token id {too_big[0]} is outside the vocabulary ({tokenizer.vocab_size}).", "prompt")
    return list(ids)
