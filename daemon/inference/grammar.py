"""Constrained decoding: each step, a token mask from a grammar, applied to the logits before sampling.

The grammar library is llguidance: it compiles JSON schemas, regular expressions and Lark grammars,
computes the mask as a numpy bitmask on the CPU (no torch: the edge has none) and has no dependencies
of its own. A request's `Constraint` is plain data; the engine's worker thread turns it into a
`TokenGuide` (one per sequence) and steps it: `mask(logits, remaining)` before sampling,
`accept(token)` after.

Two things beyond the mask keep every answer complete:
- near the end of `max_tokens` (the last third, 8 to 160 tokens) the guide prefers, among the
  allowed tokens, the one that closes the innermost open JSON string, array or object (it follows
  the nesting of the text so far), then separators (`,`, `:`) that move on to what the schema still
  requires, then end of text and closing markers (`</tool_call>`), so a document finishes instead of
  being cut; a grammar that is not JSON (a regex, a choice, a Lark/GBNF grammar: vLLM's
  `structured_outputs`) is only steered to end of text, where it allows it, so its match ends there;
- a reasoning model thinks first, unconstrained, until `</think>`; its reasoning is closed for it
  when only half of `max_tokens` is left, so the answer has room.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.numpy as llnp
import numpy as np
from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

from .tokenizer import TextTokenizer

FIRST_MASK_BUDGET_S = 0.5  # check_grammar: a grammar whose first token mask takes more CPU is refused
# Compact JSON with Python's separators (what the bundled models were trained on); no free whitespace,
# which a model could otherwise repeat until max_tokens.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
THINK_START, THINK_END = "<think>", "</think>"
_CLOSING_CHARS = frozenset('"}]` \n')
_MOVING_ON_CHARS = _CLOSING_CHARS | frozenset(",:")  # closers and separators: on to the next required part
_CLOSER = {"{": "}", "[": "]", '"': '"'}


class GrammarError(ValueError):
    """A schema or grammar the library cannot compile; the message says why."""


class GuideError(RuntimeError):
    """The model's token broke the grammar (cannot happen with the mask applied; a bug if it does)."""


@dataclass(frozen=True)
class Constraint:
    """What a request's answer must match. `grammar` is llguidance's grammar text (`json_schema_grammar`,
    `lark_grammar`). `after_reasoning`: the model may reason first (unconstrained) and the grammar
    starts after `</think>`; `in_reasoning`: the prompt already opened `<think>`."""

    grammar: str
    after_reasoning: bool = False
    in_reasoning: bool = False
    # a JSON document (a schema, a tool call): near `max_tokens` the guide steers towards closing it;
    # otherwise (a regex, a choice, a grammar) it only prefers ending where the grammar allows it
    closes_json: bool = True
    param: str = "response_format"  # the request parameter the grammar came from, for its errors


def json_schema_grammar(schema: dict[str, Any] | str) -> str:
    """`schema`: a JSON schema, or its JSON text."""
    try:
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_STYLE))  # type: ignore[arg-type]
    except ValueError as exc:
        raise GrammarError(str(exc)) from None


def json_schema_lark(schema: dict[str, Any]) -> str:
    """A JSON schema as a Lark rule body, to embed in a larger Lark grammar."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE})


def lark_grammar(lark: str) -> str:
    return str(llguidance.LLMatcher.grammar_from_lark(lark))


def regex_grammar(pattern: str) -> str:
    """The whole answer matches `pattern` (Rust's regex syntax, as vLLM's guidance backend)."""
    return str(llguidance.LLMatcher.grammar_from_regex(pattern))


def choice_grammar(choices: list[str]) -> str:
    """The whole answer is exactly one of `choices`."""
    return lark_grammar("start: " + " | ".join(json.dumps(choice) for choice in choices))


def cfg_grammar(text: str) -> str:
    """A context-free grammar in Lark syntax or in llama.cpp's GBNF (as vLLM's `grammar`)."""
    try:
        return lark_grammar(any_to_lark(text))
    except GbnfToLarkError as exc:
        raise GrammarError(f"neither Lark nor GBNF: {exc}") from None


def check_grammar(grammar: str, tokenizer: TextTokenizer | None = None,
                  first_mask_budget_s: float = FIRST_MASK_BUDGET_S) -> None:
    """Compile `grammar` (for this tokenizer's vocabulary when given); raises GrammarError saying why it
    cannot be used. Milliseconds for usual schemas: call it off the event loop.

    With a tokenizer, the first token mask is computed too, and a grammar whose first mask takes over
    `first_mask_budget_s` is refused: some regexes (`(a{1000}){1000}`) compile in a millisecond, then
    spend over a second on their first mask and fail at the next token with "too many expressions
    constructed". Found here, in the API's thread, that time is not taken from the engine's worker
    thread, which steps every running sequence. Usual schemas and regexes take milliseconds. The time
    is this thread's CPU time, not the wall clock: on a host busy with other work a legitimate grammar
    is not refused for waiting its turn (measured: the regex above 1.52 s of CPU both alone and beside
    four busy processes, whose wall time was 3.87 s)."""
    vocab = vocab_of(tokenizer) if tokenizer is not None else None
    llg = vocab.llg if vocab is not None else None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, llg)
    if is_error:
        raise GrammarError(messages[0] if messages else "the grammar does not compile")
    if vocab is None:
        return
    started = time.thread_time()
    matcher = llguidance.LLMatcher(vocab.llg, grammar, log_level=0)
    llnp.fill_next_token_bitmask(matcher, llnp.allocate_token_bitmask(1, vocab.size))
    took = time.thread_time() - started
    if matcher.is_error():
        raise GrammarError(matcher.get_error().split("\n<state>", 1)[0].strip())
    if took > first_mask_budget_s:
        raise GrammarError(f"it is too complex to follow while decoding: its first token mask took {took:.2f} s "
                           f"of CPU (at most {first_mask_budget_s} s; usual grammars take milliseconds)")


@dataclass(frozen=True)
class _Vocab:
    """What the guide needs to know about a tokenizer, computed once per tokenizer."""

    llg: Any  # llguidance.LLTokenizer
    size: int
    texts: list[str]  # each token's text
    first_char: np.ndarray  # (size,) str: a token's first non-blank character ("" if none)
    closing: np.ndarray  # (size,) bool: tokens of closers only
    moving_on: np.ndarray  # (size,) bool: tokens of closers and separators only
    ending: np.ndarray  # (size,) bool: end of text and closing markers (`</tool_call>`)
    eos: np.ndarray  # (size,) bool
    think_start: int | None
    think_end: int | None


_VOCABS: dict[str, _Vocab] = {}
_VOCABS_LOCK = threading.Lock()


def vocab_of(tokenizer: TextTokenizer) -> _Vocab:
    with _VOCABS_LOCK:
        vocab = _VOCABS.get(tokenizer.digest)
        if vocab is None:
            vocab = _VOCABS[tokenizer.digest] = _build_vocab(tokenizer)
        return vocab


def _build_vocab(tokenizer: TextTokenizer) -> _Vocab:
    eos_ids = sorted(tokenizer.eos_token_ids)
    llg = llguidance.LLTokenizer(tokenizer.tokenizer.to_str(), eos_token=eos_ids or None)
    size = llg.vocab_size
    texts = tokenizer.tokenizer.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
    first_char = np.array([text.strip()[:1] for text in texts])
    closing = np.array([bool(text.strip()) and set(text) <= _CLOSING_CHARS for text in texts], dtype=bool)
    moving_on = np.array([bool(text.strip()) and set(text) <= _MOVING_ON_CHARS for text in texts], dtype=bool)
    eos = np.zeros(size, dtype=bool)
    eos[[i for i in eos_ids if i < size]] = True
    ending = np.array([_closing_marker(text) for text in texts], dtype=bool) | eos
    return _Vocab(llg, size, texts, first_char, closing, moving_on, ending, eos,
                  tokenizer.single_token_id(THINK_START), tokenizer.single_token_id(THINK_END))


def _closing_marker(text: str) -> bool:
    """`</tool_call>`, `<｜tool▁calls▁end｜>` and the like."""
    core = text.strip()
    return len(core) > 2 and core[0] == "<" and core[-1] == ">" and (core.startswith("</") or "end" in core)


@dataclass
class _Nesting:
    """The JSON strings, arrays and objects open in the text so far (innermost last)."""

    open: list[str]
    in_escape: bool = False

    def feed(self, text: str) -> None:
        for char in text:
            if self.open and self.open[-1] == '"':
                if self.in_escape:
                    self.in_escape = False
                elif char == "\\":
                    self.in_escape = True
                elif char == '"':
                    self.open.pop()
            elif char in _CLOSER:
                self.open.append(char)
            elif char in "}]" and self.open:
                self.open.pop()

    @property
    def closer(self) -> str:
        return _CLOSER[self.open[-1]] if self.open else ""


def closing_reserve(max_tokens: int) -> int:
    return min(160, max(8, max_tokens // 3))


class TokenGuide:
    """One sequence's constraint. Used only by the engine's worker thread."""

    def __init__(self, vocab: _Vocab, matcher: Any, constraint: Constraint, max_tokens: int) -> None:
        self._vocab = vocab
        self._matcher = matcher
        self._bits = llnp.allocate_token_bitmask(1, vocab.size)  # (1, ceil(V/32)) int32
        self._reserve = closing_reserve(max_tokens)
        self._end_reasoning_at = max(2 * self._reserve, max_tokens // 2)
        reasons = constraint.after_reasoning and vocab.think_end is not None
        self._phase = ("reasoning" if constraint.in_reasoning else "may_reason") if reasons else "grammar"
        self._nesting = _Nesting([])
        self._closes_json = constraint.closes_json

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more."""
        return self._phase == "grammar" and self._matcher.is_stopped()

    def mask(self, logits: np.ndarray, remaining: int) -> np.ndarray:
        """logits: (V,). Returns them with every token the grammar forbids at -inf."""
        if self._phase == "reasoning":  # free text, but no end of text before the answer
            if remaining > self._end_reasoning_at:
                return _keep(logits, ~self._vocab.eos)
            return _keep(logits, self._only(self._vocab.think_end))
        allowed = self._allowed()
        if self._phase == "may_reason" and self._vocab.think_start is not None:
            allowed[self._vocab.think_start] = True
        if remaining <= self._reserve:
            vocab = self._vocab
            if self._closes_json:
                innermost = vocab.first_char == self._nesting.closer
                allowed = _narrowed(allowed, innermost & vocab.closing, innermost & vocab.moving_on,
                                    vocab.moving_on, vocab.ending)
            else:
                allowed = _narrowed(allowed, vocab.eos)
        if not allowed.any():
            raise GuideError(f"the grammar allows no token: {self._matcher.get_error() or 'it is complete'}")
        return _keep(logits, allowed)

    def accept(self, token: int) -> None:
        if self._phase == "reasoning":
            if token == self._vocab.think_end:
                self._phase = "grammar"
            return
        if self._phase == "may_reason":
            self._phase = "grammar"
            if token == self._vocab.think_start:
                self._phase = "reasoning"
                return
        if not self._matcher.consume_token(token):
            raise GuideError(f"token {token} breaks the grammar: {self._matcher.get_error()}")
        if token < self._vocab.size:
            self._nesting.feed(self._vocab.texts[token])

    def _allowed(self) -> np.ndarray:
        llnp.fill_next_token_bitmask(self._matcher, self._bits)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        return bits[: self._vocab.size].astype(bool)

    def _only(self, token: int | None) -> np.ndarray:
        allowed = np.zeros(self._vocab.size, dtype=bool)
        if token is not None:
            allowed[token] = True
        return allowed


def _narrowed(allowed: np.ndarray, *preferences: np.ndarray) -> np.ndarray:
    """The allowed tokens of the first preference that has any, else all the allowed ones."""
    for preferred in preferences:
        both = allowed & preferred
        if both.any():
            return both
    return allowed


def _keep(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The logits of allowed tokens; -inf elsewhere, and for ids past the tokenizer's vocabulary."""
    out = np.full(logits.shape, -np.inf, dtype=logits.dtype)
    n = min(allowed.shape[0], logits.shape[0])
    keep = np.flatnonzero(allowed[:n])
    out[keep] = logits[keep]
    return out


def start_guide(tokenizer: TextTokenizer, constraint: Constraint, max_tokens: int) -> TokenGuide:
    """Compile `constraint` for this tokenizer (milliseconds for usual schemas; call it off the event
    loop). Raises GrammarError."""
    vocab = vocab_of(tokenizer)
    matcher = llguidance.LLMatcher(vocab.llg, constraint.grammar, log_level=0)
    if matcher.is_error():
        raise GrammarError(matcher.get_error())
    return TokenGuide(vocab, matcher, constraint, max_tokens)
