"""A request's prompt as token ids, with the local model's tokenizer and chat template."""

from __future__ import annotations

import asyncio

from ..inference.tokenizer import TextTokenizer
from .errors import bad_request
from .schemas import Body, ChatCompletionRequest, CompletionRequest
from .tools import template_messages

# Tokenizing a prompt this long moves off the event loop (tokenizers is fast, but not free).
TOKENIZE_IN_THREAD_CHARS = 32_768


async def prompt_token_ids(tokenizer: TextTokenizer, body: Body) -> list[int]:
    if isinstance(body, CompletionRequest) and isinstance(body.prompt, list) and isinstance(body.prompt[0], int):
        ids = list(body.prompt)  # type: ignore[arg-type]
        too_big = [i for i in ids if i >= tokenizer.vocab_size]
        if too_big:
            raise bad_request(f"Token id {too_big[0]} is outside the vocabulary ({tokenizer.vocab_size}).", "prompt")
        return ids
    if _prompt_chars(body) > TOKENIZE_IN_THREAD_CHARS:
        return await asyncio.to_thread(_tokenize, tokenizer, body)
    return _tokenize(tokenizer, body)


def _prompt_chars(body: Body) -> int:
    if isinstance(body, ChatCompletionRequest):
        return sum(len(m.text()) for m in body.messages)
    prompt = body.prompt
    return len(prompt) if isinstance(prompt, str) else sum(len(str(p)) for p in prompt)


def _tokenize(tokenizer: TextTokenizer, body: Body) -> list[int]:
    if isinstance(body, ChatCompletionRequest):
        return tokenizer.encode_chat(*template_messages(body, tokenizer))
    prompt = body.prompt if isinstance(body.prompt, str) else str(body.prompt[0])
    return tokenizer.encode(prompt)
