"""Tools and structured output in a chat request: checked, rendered through the model's chat template,
and turned into the grammar its answer must follow.

- `tools` reach the template as `tools` when it lists them (Qwen2.5's, the bundled one); otherwise
  (DeepSeek-R1's template has no tool list) their description goes into the system message, in the
  words of the model's own format. `tool_choice: "none"` renders no tools.
- `tool_choice: "required"` or a named function: the answer is constrained to the model's tool-call
  format, arguments to each tool's parameter schema; `"auto"`: the model decides, its calls are parsed.

The grammar a forced call (or `response_format`, or vLLM's `structured_outputs`) makes the answer
follow is built in `dsnode.api.constraint`.
"""

from __future__ import annotations

from typing import Any

from ..inference.tokenizer import TextTokenizer
from ..inference.toolformats import ToolSpec, format_for_template, template_renders_tools
from .errors import bad_request
from .schemas import ChatCompletionRequest

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def offered_tools(body: ChatCompletionRequest) -> list[ToolSpec]:
    """The tools the model may call: none when `tool_choice` is "none"."""
    if not body.tools or body.tool_choice == "none":
        return []
    return [ToolSpec(t.function.name, t.function.description or "", t.function.parameters or EMPTY_PARAMETERS)
            for t in body.tools]


def forced_tools(body: ChatCompletionRequest) -> list[ToolSpec] | None:
    """The tools one of which must be called (`required`, or the named one), or None: no call forced."""
    offered = offered_tools(body)
    if body.tool_choice == "required":
        return offered
    if body.tool_choice is not None and not isinstance(body.tool_choice, str):
        return [t for t in offered if t.name == body.tool_choice.function.name]
    return None


def check_tool_choice(body: ChatCompletionRequest) -> None:
    """A named function must be one of the tools (that tools are given is checked by the schema)."""
    forced = forced_tools(body)
    if forced == [] and not isinstance(body.tool_choice, str):
        names = ", ".join(t.function.name for t in body.tools)
        raise bad_request(f"tool_choice names the function `{body.tool_choice.function.name}`, which is not among "
                          f"the tools ({names}).", "tool_choice", "invalid_value")


def template_messages(body: ChatCompletionRequest, tokenizer: TextTokenizer) -> tuple[list[dict[str, Any]],
                                                                                      list[dict[str, Any]] | None]:
    """(messages, tools) for the chat template: tools as the template lists them, or described in the
    system message when it does not."""
    check_tool_choice(body)
    form = format_for_template(tokenizer.chat_template)
    messages = [m.for_template(form.arguments_as_text) for m in body.messages]
    offered = offered_tools(body)
    if not offered:
        return messages, None
    if template_renders_tools(tokenizer.chat_template):
        return messages, [t.model_dump(exclude_none=True) for t in body.tools or ()]
    return _with_system_text(messages, form.describe(offered)), None


def _with_system_text(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + text}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
