"""Tokenizer and chat template from a Hugging Face model folder, without transformers or torch.

Reads `tokenizer.json` (the `tokenizers` library), `tokenizer_config.json` and `chat_template.jinja`
(or the template inside `tokenizer_config.json`), and `generation_config.json` for end-of-sequence ids.
The template is rendered the way transformers does (sandboxed jinja2, trim_blocks, lstrip_blocks).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class TokenizerError(Exception):
    pass


class ChatTemplateError(TokenizerError):
    pass


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


@dataclass(frozen=True)
class TextTokenizer:
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: frozenset[int]
    digest: str  # sha256 of tokenizer.json: identifies the vocabulary across nodes

    @classmethod
    def from_folder(cls, folder: Path) -> "TextTokenizer":
        folder = Path(folder)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{folder}: no tokenizer.json")
        raw = tokenizer_file.read_bytes()
        tok = Tokenizer.from_str(raw.decode("utf-8"))
        config = _read_json(folder / "tokenizer_config.json")
        template = _read_template(folder, config)
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        eos_ids = set(_generation_eos_ids(folder))
        if eos is not None and tok.token_to_id(eos) is not None:
            eos_ids.add(tok.token_to_id(eos))
        return cls(tok, template, bos, eos, frozenset(eos_ids), hashlib.sha256(raw).hexdigest())

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        return render_template(self.chat_template, messages, add_generation_prompt, tools,
                               self.bos_token or "", self.eos_token or "")

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.encode(self.render_chat(messages, tools=tools), add_special_tokens=False)

    def token_piece(self, token_id: int) -> tuple[str, bytes]:
        """One token as the logprobs of OpenAI's API show it: its text and its bytes. A byte-level
        token that is part of a UTF-8 character has the replacement character as text (as vLLM), its
        own bytes as bytes; a special token is its name."""
        name = self.tokenizer.id_to_token(token_id)
        if name is None:
            return "", b""
        if self._byte_level and token_id not in self._special_ids:
            raw = bytes(_UNICODE_TO_BYTE[c] for c in name if c in _UNICODE_TO_BYTE)
            if len(raw) == len(name):
                return raw.decode("utf-8", errors="replace"), raw
        special = token_id in self._special_ids
        text = name if special else self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text, text.encode("utf-8")

    @cached_property
    def _byte_level(self) -> bool:
        return type(self.tokenizer.decoder).__name__ == "ByteLevel"

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(i for i, added in self.tokenizer.get_added_tokens_decoder().items() if added.special)

    def single_token_id(self, text: str) -> int | None:
        """The id of `text` when the vocabulary has it as one token (a format marker such as
        `</think>` usually is), else None."""
        ids = self.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the printable bytes as themselves, the others shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {char: byte for byte, char in _bytes_to_unicode().items()}


def render_template(
    source: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """A chat template rendered the way transformers renders it."""
    try:
        return _compile(source).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            tools=tools or None,
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from exc


_COMPILED: dict[str, jinja2.Template] = {}


def _compile(source: str) -> jinja2.Template:
    template = _COMPILED.get(source)
    if template is None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        template = _COMPILED[source] = env.from_string(source)
    return template


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _read_template(folder: Path, config: dict[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _generation_eos_ids(folder: Path) -> list[int]:
    value = _read_json(folder / "generation_config.json").get("eos_token_id")
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []
