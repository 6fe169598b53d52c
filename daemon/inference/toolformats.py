"""How a model writes tool calls, per family: parsing them out of its text, a grammar that forces one,
and a description of the tools for chat templates that do not render them.

- `HermesFormat` — Qwen2.5 (and the bundled models): `<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`;
- `DeepSeekFormat` — DeepSeek-V3/R1 and the R1 distills:
  `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{…}\\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>`.

`format_for_template` picks one from the chat template's text.
"""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .grammar import json_schema_lark
from .tokenizer import TextTokenizer


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON schema


class ToolFormat(abc.ABC):
    name: str
    start: str  # the text where calls begin
    arguments_as_text: bool  # how the family's template takes `arguments` in history: text or an object

    @abc.abstractmethod
    def parse(self, text: str) -> tuple[str, list[ToolCall]] | None:
        """(the text before the calls, the calls), or None when the calls are malformed."""

    @abc.abstractmethod
    def lark(self, tools: list[ToolSpec], tokenizer: TextTokenizer, parallel: bool) -> str:
        """A Lark grammar for a reply that is one call (or several) of these tools, arguments per schema."""

    @abc.abstractmethod
    def describe(self, tools: list[ToolSpec]) -> str:
        """The tools and how to call them, for a system message."""


def _marker(text: str, tokenizer: TextTokenizer) -> str:
    """A marker in Lark: the token itself when the vocabulary has it as one (llguidance matches added
    tokens by id), else its text."""
    token = tokenizer.single_token_id(text)
    return f"<[{token}]>" if token is not None else _literal(text)


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _arguments(text: str) -> str | None:
    """The arguments as compact JSON text, or None unless they are a JSON object."""
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def _calls_rules(tools: list[ToolSpec], parallel: bool, before: Callable[[ToolSpec], str], after: str) -> list[str]:
    """The Lark rules of one or more calls: `calls` (joined by newlines when `parallel`), `call` as one
    of the tools, and per tool `before(tool)`, its arguments by the tool's JSON schema, then `after`."""
    lines = ['calls: call ("\\n" call)*' if parallel else "calls: call",
             "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
    for i, tool in enumerate(tools):
        lines.append(f"call_{i}: {before(tool)} args_{i} {after}")
        lines.append(f"args_{i}: {json_schema_lark(tool.parameters)}")
    return lines


class HermesFormat(ToolFormat):
    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"
    arguments_as_text = False
    _call = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def parse(self, text: str) -> tuple[str, list[ToolCall]] | None:
        head, at, _ = text.partition(self.start)
        if not at:
            return text, []
        rest, calls = text[len(head):], []
        for match in self._call.finditer(rest):
            call = _hermes_call(match.group(1))
            if call is None:
                return None
            calls.append(call)
        if not calls or self._call.sub("", rest).strip():
            return None  # an unclosed call, or text between or after the calls
        return head, calls

    def lark(self, tools: list[ToolSpec], tokenizer: TextTokenizer, parallel: bool) -> str:
        start, end = _marker(self.start, tokenizer), _marker(self.end, tokenizer)
        def head(tool: ToolSpec) -> str:
            return start + " " + _literal(f'\n{{"name": "{tool.name}", "arguments": ')

        return "\n".join(["start: calls", *_calls_rules(tools, parallel, head, f'"}}\\n" {end}')])

    def describe(self, tools: list[ToolSpec]) -> str:
        listed = "\n".join(json.dumps(_openai_tool(t), ensure_ascii=False) for t in tools)
        return ("# Tools\n<tools>\n" + listed + "\n</tools>\nTo call a tool, answer <tool_call>\n"
                '{"name": NAME, "arguments": ARGS}\n</tool_call>')


def _hermes_call(body: str) -> ToolCall | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = _arguments(value.get("arguments", {}))
    return None if arguments is None else ToolCall(value["name"], arguments)


class DeepSeekFormat(ToolFormat):
    name = "deepseek"
    start = "<｜tool▁calls▁begin｜>"
    end = "<｜tool▁calls▁end｜>"
    call_begin, call_end, sep = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
    arguments_as_text = True
    _call = re.compile(r"<｜tool▁call▁begin｜>\s*(\w+)\s*<｜tool▁sep｜>\s*([^\n]+?)\s*\n```(?:json)?\n(.*?)\n```\s*"
                       r"<｜tool▁call▁end｜>", re.DOTALL)

    def parse(self, text: str) -> tuple[str, list[ToolCall]] | None:
        head, at, _ = text.partition(self.start)
        if not at:
            return text, []
        rest = text[len(head) + len(self.start):]
        body, closed, tail = rest.partition(self.end)
        calls = []
        for match in self._call.finditer(body):
            arguments = _arguments(match.group(3))
            if arguments is None:
                return None
            calls.append(ToolCall(match.group(2), arguments))
        if not calls or not closed or tail.strip() or self._call.sub("", body).strip():
            return None
        return head, calls

    def lark(self, tools: list[ToolSpec], tokenizer: TextTokenizer, parallel: bool) -> str:
        m = {name: _marker(text, tokenizer) for name, text in (
            ("start", self.start), ("end", self.end), ("begin", self.call_begin), ("stop", self.call_end),
            ("sep", self.sep))}
        def head(tool: ToolSpec) -> str:
            return f'{m["begin"]} "function" {m["sep"]} ' + _literal(f"{tool.name}\n```json\n")

        return "\n".join([f"start: {m['start']} calls {m['end']}",
                           *_calls_rules(tools, parallel, head, f'"\\n```" {m["stop"]}')])

    def describe(self, tools: list[ToolSpec]) -> str:
        parts = ["## Tools\nYou have access to the following tools:"]
        for tool in tools:
            parts.append(f"### {tool.name}\nDescription: {tool.description}\n\n"
                         f"Parameters: {json.dumps(tool.parameters, ensure_ascii=False)}")
        parts.append("To call tools, answer exactly: " + self.start + self.call_begin + "function" + self.sep
                     + "NAME\n```json\nARGUMENTS\n```" + self.call_end + self.end)
        return "\n\n".join(parts)


def _openai_tool(tool: ToolSpec) -> dict[str, Any]:
    return {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                             "parameters": tool.parameters}}


def format_for_template(template: str | None) -> ToolFormat:
    """DeepSeek's format when the template writes it; Hermes (Qwen2.5's) otherwise."""
    if template and "tool▁call" in template:
        return DeepSeekFormat()
    return HermesFormat()


def template_renders_tools(template: str | None) -> bool:
    """Whether the template lists `tools` itself (Qwen2.5's does; DeepSeek-R1's does not)."""
    return bool(template) and re.search(r"\btools\b", template or "") is not None
