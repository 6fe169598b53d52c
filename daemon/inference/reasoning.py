"""Reasoning models (DeepSeek-R1 and its distills) think in `<think>…</think>` before they answer;
clients get the thinking as `reasoning_content` and the answer as `content`, split exactly at the tags
(the tags themselves belong to neither).

`ReasoningSplitter` does it incrementally on streamed text: a tag may arrive split across tokens, so a
tail that could be the start of the tag is held back until it is known. Where the reasoning starts:
- the prompt ended with `<think>` (R1's newer templates open it for the model): in the reasoning;
- else only a `<think>` at the very start of the answer (whitespace before it is dropped) opens it;
  a `<think>` later in an answer is ordinary text, as is a `</think>` outside reasoning.
A stream cut inside the reasoning (max_tokens) leaves everything in `reasoning_content`, including a
partial `</thi` tail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

THINK_START, THINK_END = "<think>", "</think>"

Channel = Literal["reasoning", "content"]
Piece = tuple[Channel, str]


@dataclass
class ReasoningCounter:
    """How many of an answer's tokens are its reasoning, the tags included (OpenAI's
    `completion_tokens_details.reasoning_tokens`): a delta's tokens count when the answer was in the
    reasoning before them or is after them. Fed the same deltas, streamed or whole."""

    splitter: ReasoningSplitter
    tokens: int = 0
    _seen: int = 0

    def push(self, text: str, completion_tokens: int) -> None:
        """A delta: its text and the answer's token count after it."""
        was = self.splitter.in_reasoning
        self.splitter.push(text)
        if was or self.splitter.in_reasoning:
            self.tokens += completion_tokens - self._seen
        self._seen = completion_tokens


def prompt_opens_reasoning(prompt_tail: str) -> bool:
    """Whether a rendered prompt (its last characters suffice) leaves the model inside `<think>`."""
    return prompt_tail.rstrip().endswith(THINK_START)


@dataclass
class ReasoningSplitter:
    in_reasoning: bool = False
    _held: str = ""
    _answer_started: bool = False  # content has begun: a <think> now is text
    _pieces: list[Piece] = field(default_factory=list)

    def push(self, text: str) -> list[Piece]:
        self._held += text
        while self._held and self._step():
            pass
        return self._take()

    def flush(self) -> list[Piece]:
        """The generation ended: release what was held back, in the channel it was in."""
        if self._held:
            self._emit("reasoning" if self.in_reasoning else "content", self._held)
            self._held = ""
        return self._take()

    def _step(self) -> bool:
        """Consume what can be decided in `_held`; returns whether to look again."""
        if self.in_reasoning:
            return self._in_reasoning()
        if self._answer_started:
            self._emit("content", self._held)
            self._held = ""
            return False
        return self._before_answer()

    def _in_reasoning(self) -> bool:
        end = self._held.find(THINK_END)
        if end >= 0:
            self._emit("reasoning", self._held[:end])
            self._held = self._held[end + len(THINK_END):]
            self.in_reasoning, self._answer_started = False, True
            return True
        keep = _partial_tag_suffix(self._held, THINK_END)
        self._emit("reasoning", self._held[: len(self._held) - keep])
        self._held = self._held[len(self._held) - keep:]
        return False

    def _before_answer(self) -> bool:
        stripped = self._held.lstrip()
        if stripped.startswith(THINK_START):
            self._held = stripped[len(THINK_START):]
            self.in_reasoning = True
            return True
        if THINK_START.startswith(stripped):  # only whitespace, or the start of the tag: wait
            return False
        self._answer_started = True
        return True

    def _emit(self, channel: Channel, text: str) -> None:
        if not text:
            return
        if self._pieces and self._pieces[-1][0] == channel:
            self._pieces[-1] = (channel, self._pieces[-1][1] + text)
        else:
            self._pieces.append((channel, text))

    def _take(self) -> list[Piece]:
        out, self._pieces = self._pieces, []
        return out


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str]:
    """A whole answer: (reasoning or None when there was none, content)."""
    splitter = ReasoningSplitter(in_reasoning)
    pieces = splitter.push(text) + splitter.flush()
    reasoning = [t for channel, t in pieces if channel == "reasoning"]
    content = "".join(t for channel, t in pieces if channel == "content")
    opened = in_reasoning or bool(reasoning) or splitter.in_reasoning or text.lstrip().startswith(THINK_START)
    return ("".join(reasoning) if opened else None), content
