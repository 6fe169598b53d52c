"""Incremental detokenization with stop strings.

Byte-level tokens can split a UTF-8 character, so text is released only once it decodes cleanly
(the prefix/read-offset method of TGI and vLLM). Text that might be the start of a stop string is held
back until it is known not to be one; a stop string ends the generation and is not returned (OpenAI).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .tokenizer import TextTokenizer

_REPLACEMENT = "\ufffd"


@dataclass
class Detokenizer:
    tokenizer: TextTokenizer
    stop: tuple[str, ...] = ()
    _ids: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0
    _pending: str = ""  # decoded text not yet released (may begin a stop string)
    stopped: bool = False

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text that can be released now."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        self._pending += self._decode_new()
        return self._release(final=False)

    def flush(self) -> str:
        """The generation ended: release whatever is left (minus an unfinished stop string)."""
        if self.stopped:
            return ""
        return self._release(final=True)

    def _decode_new(self) -> str:
        prefix = self.tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self.tokenizer.decode(self._ids[self._prefix_offset :])
        if full.endswith(_REPLACEMENT) or len(full) <= len(prefix):
            return ""  # an incomplete character (or a special token that decodes to nothing)
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def _release(self, final: bool) -> str:
        if self.stop:
            hit = _first_stop(self._pending, self.stop)
            if hit is not None:
                self.stopped = True
                out, self._pending = self._pending[:hit], ""
                return out
        if final or not self.stop:
            out, self._pending = self._pending, ""
            return out
        keep = _longest_stop_prefix_suffix(self._pending, self.stop)
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(positions) if positions else None


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
