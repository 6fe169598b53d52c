"""The grammar a request's answer must follow, checked against the model's vocabulary off the event loop:

- a forced tool call (`tool_choice: "required"` or a named function, chat only): the model's tool-call
  format, arguments to each tool's parameter schema;
- otherwise `response_format` `json_object` / `json_schema` (chat, and text completions as vLLM);
- or vLLM's `structured_outputs`: a JSON schema, a regular expression, one of several strings, a Lark
  or GBNF grammar, or any JSON object. The schema rules (one kind, not with a JSON `response_format`)
  are in `dsnode.api.schemas`; a forced tool call with a structured output is refused here.

A schema, tool, regex or grammar the library cannot use is a 400 naming its parameter. A reasoning model
reasons first, unconstrained, in a chat (`after_reasoning`); a text completion is constrained from its
first token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..inference.grammar import (
    Constraint,
    GrammarError,
    cfg_grammar,
    check_grammar,
    choice_grammar,
    json_schema_grammar,
    lark_grammar,
    regex_grammar,
)
from ..inference.tokenizer import TextTokenizer
from ..inference.toolformats import format_for_template
from .errors import APIError, bad_request
from .schemas import Body, ChatCompletionRequest, ResponseFormat, StructuredOutputs
from .tools import forced_tools, offered_tools


@dataclass(frozen=True)
class _Source:
    """What a grammar is built from, and what its errors say."""

    build: Callable[[Any], str]
    value: Any
    param: str
    what: str
    closes_json: bool = True


async def answer_constraint(body: Body, tokenizer: TextTokenizer, reasons: bool = False,
                            in_reasoning: bool = False) -> Constraint | None:
    """The grammar the answer must follow, or None (free text). `reasons`: a chat answer of a reasoning
    model (the grammar starts after its reasoning); `in_reasoning`: the prompt opened `<think>`."""
    chat = isinstance(body, ChatCompletionRequest)
    tools = offered_tools(body) if isinstance(body, ChatCompletionRequest) else []
    if not tools and _response_schema(body.response_format) is None and body.structured_outputs is None:
        return None  # free text: no thread hop
    checked = await asyncio.to_thread(_checked_grammar, body, tokenizer)
    if checked is None:
        return None
    grammar, source = checked
    return Constraint(grammar, after_reasoning=reasons and chat, in_reasoning=in_reasoning,
                      closes_json=source.closes_json, param=source.param)


def _checked_grammar(body: Body, tokenizer: TextTokenizer) -> tuple[str, _Source] | None:
    if isinstance(body, ChatCompletionRequest):
        for i, tool in enumerate(offered_tools(body)):
            _check(_Source(json_schema_grammar, tool.parameters, f"tools[{i}].function.parameters",
                           f"The parameters of tool `{tool.name}` are not a JSON schema dsnode can use"), tokenizer)
        forced = forced_tools(body)
        if forced:
            if body.structured_outputs is not None:
                raise bad_request("Invalid value for 'structured_outputs': a tool call is forced (tool_choice), so "
                                  "the call is the answer; a structured output cannot apply too.",
                                  "structured_outputs", "invalid_value")
            form = format_for_template(tokenizer.chat_template)
            return _check(_Source(lark_grammar, form.lark(forced, tokenizer, body.parallel_tool_calls), "tools",
                                  "The tools cannot be turned into a grammar"), tokenizer)
    schema = _response_schema(body.response_format)
    if schema is not None:
        return _check(_Source(json_schema_grammar, schema, "response_format",
                              "response_format's schema cannot be compiled"), tokenizer)
    if body.structured_outputs is None:
        return None
    return _check(_structured_source(body.structured_outputs), tokenizer)


def _structured_source(structure: StructuredOutputs) -> _Source:
    kind = structure.kinds()[0]
    where = f"structured_outputs.{kind}"
    if kind in ("json", "json_object"):
        return _Source(json_schema_grammar, structure.json_schema(), where, f"{where}'s schema cannot be compiled")
    if kind == "regex":
        return _Source(regex_grammar, structure.regex, where, f"{where} cannot be used", closes_json=False)
    if kind == "choice":
        return _Source(choice_grammar, structure.choice, where, f"{where} cannot be used", closes_json=False)
    return _Source(cfg_grammar, structure.grammar, where, f"{where} is not a grammar dsnode can use",
                   closes_json=False)


def _response_schema(form: ResponseFormat | None) -> dict[str, Any] | None:
    if form is None or form.type == "text":
        return None
    if form.type == "json_object":
        return {"type": "object"}
    assert form.json_schema is not None and form.json_schema.schema_ is not None  # checked by the schema
    return form.json_schema.schema_


def _check(source: _Source, tokenizer: TextTokenizer) -> tuple[str, _Source]:
    """The source's grammar, once it compiles for this tokenizer; else the client's 400."""
    try:
        grammar = source.build(source.value)
        check_grammar(grammar, tokenizer)
    except Exception as exc:  # whatever the library says of a client's schema, it is the client's 400
        why = str(exc) if isinstance(exc, GrammarError) else f"{type(exc).__name__}: {exc}"
        raise APIError(400, f"{source.what}: {why}", param=source.param, code="invalid_schema") from None
    return grammar, source
