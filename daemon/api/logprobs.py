"""Log-probabilities in OpenAI's two shapes, from the engine's `TokenLogprob`s.

Chat (`logprobs: true`, `top_logprobs: N`): `{"content": [{"token", "logprob", "bytes", "top_logprobs":
[{"token", "logprob", "bytes"}]}], "refusal": null}`. Text completions (`logprobs: N`): `{"tokens",
"token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`, each `top_logprobs` dict the N
likeliest tokens and the chosen one when it is not among them (OpenAI's legacy rule), the offsets
counted in characters of the answer's text. With `echo`, the prompt's tokens come first, its first
token with `null` log-probability and alternatives (nothing precedes it), and the offsets run from the
prompt's start.

With `return_tokens_as_token_ids` (vLLM's parameter) every token is named `token_id:N` instead of its
text (for clients that need the exact ids: a byte-level piece of a character is not valid text); the
offsets still count the answer's text.

Every generated token has an entry, the end-of-sequence token included (as vLLM), and in a chat answer
the tokens of `reasoning_content` and of tool calls too: they are all in `content`, in order.
A stream gives each chunk the entries of the tokens whose text it carries; tokens whose text is held
back (a possible stop string, half a UTF-8 character) go with the next chunk that is sent.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..inference.engine import TokenLogprob
from ..inference.tokenizer import TextTokenizer


def chat_logprobs(tokenizer: TextTokenizer, entries: Sequence[TokenLogprob], as_ids: bool = False) -> dict[str, Any]:
    return {"content": [_chat_entry(tokenizer, e, as_ids) for e in entries], "refusal": None}


def _chat_entry(tokenizer: TextTokenizer, entry: TokenLogprob, as_ids: bool) -> dict[str, Any]:
    out = _chat_token(tokenizer, entry.token_id, entry.logprob, as_ids)
    out["top_logprobs"] = [_chat_token(tokenizer, token, logprob, as_ids) for token, logprob in entry.top]
    return out


def _chat_token(tokenizer: TextTokenizer, token: int, logprob: float | None, as_ids: bool) -> dict[str, Any]:
    text, raw = (_id_name(token), _id_name(token).encode()) if as_ids else tokenizer.token_piece(token)
    return {"token": text, "logprob": _finite(logprob), "bytes": list(raw)}


def _id_name(token: int) -> str:
    return f"token_id:{token}"


class CompletionLogprobs:
    """The text-completion shape, with `text_offset` running on across the chunks of a stream."""

    def __init__(self, tokenizer: TextTokenizer, offset: int = 0, as_ids: bool = False, top: int | None = None) -> None:
        self._tokenizer, self._offset, self._as_ids, self._top_k = tokenizer, offset, as_ids, top

    def block(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        tokens, offsets = [], []
        for entry in entries:
            text = self._tokenizer.token_piece(entry.token_id)[0]
            tokens.append(self._name(entry.token_id, text))
            offsets.append(self._offset)
            self._offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [_finite(e.logprob) for e in entries],
            "top_logprobs": [None if e.logprob is None else self._top(e) for e in entries],
            "text_offset": offsets,
        }

    def _top(self, entry: TokenLogprob) -> dict[str, float]:
        """The `logprobs` likeliest tokens and the chosen one (OpenAI's "up to logprobs + 1 elements", as
        vLLM): a sampled or prompt token outside the top is there too."""
        # a dict keyed by text: two ids with the same text (rare: a special token named like text)
        # keep the likelier, which comes first
        out: dict[str, float] = {}
        for token, logprob in entry.top[: self._top_k]:  # a prompt scored for prompt_logprobs may have more
            out.setdefault(self._name(token), _clamped(logprob))
        if entry.logprob is not None:
            out.setdefault(self._name(entry.token_id), _clamped(entry.logprob))
        return out

    def _name(self, token: int, text: str | None = None) -> str:
        if self._as_ids:
            return _id_name(token)
        return text if text is not None else self._tokenizer.token_piece(token)[0]


def vllm_prompt_logprobs(tokenizer: TextTokenizer, entries: Sequence[TokenLogprob],
                         top: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, null for the first (nothing precedes it), else the
    token itself and the `top` likeliest, keyed by id, each with its log-probability, rank and text."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for entry in entries:
        if entry.logprob is None:
            out.append(None)
            continue
        tokens = {str(entry.token_id): _vllm_entry(tokenizer, entry.token_id, entry.logprob, entry.rank)}
        for rank, (token, logprob) in enumerate(entry.top[:top], 1):
            tokens.setdefault(str(token), _vllm_entry(tokenizer, token, logprob, rank))
        out.append(tokens)
    return out


def _vllm_entry(tokenizer: TextTokenizer, token: int, logprob: float, rank: int | None) -> dict[str, Any]:
    return {"logprob": _clamped(logprob), "rank": rank, "decoded_token": tokenizer.token_piece(token)[0]}


def _finite(logprob: float | None) -> float | None:
    """JSON has no -Infinity: a token of probability 0 (float32 underflow) gets the lowest finite value,
    as vLLM clamps it. None: a prompt's first token."""
    return None if logprob is None else _clamped(logprob)


def _clamped(logprob: float) -> float:
    return max(logprob, -9999.0)
