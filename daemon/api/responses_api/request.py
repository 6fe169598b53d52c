"""A Responses API request (`POST /v1/responses`) → the chat completion request it stands for.

The Responses API is OpenAI's newer interface (the Agents SDK's, Codex's, `client.responses.create`):
`input` is a string or a list of items (messages, function calls and their outputs, reasoning), the
system prompt is `instructions`, a function tool is flat (`{"type": "function", "name": ...}`),
structured output is `text.format`, and the answer is a list of output items. dsnode serves it by
translating the request into a chat completion request (this module) and the chat answer back into a
response (`dsnode.api.responses_api.events`), so routing, forwarding, batching, tools, JSON mode and
reasoning are the chat path's, unchanged.

What dsnode cannot do is refused by name rather than ignored: hosted tools (web search, file search,
code interpreter, MCP...), images and files, `background`, `truncation: "auto"`, conversations and
prompt templates. A reasoning item given back as input is dropped: R1's chat template drops earlier
reasoning from the history too.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..errors import APIError, bad_request
from ..schemas import (
    INTEGRAL,
    MAX_LOGPROBS,
    PENALTY_RANGE,
    Int,
    StructuredOutputs,
    _Body,
    _no_bool,
    _Nullable,
    check_stop,
    error_of,
)

MAX_METADATA = 16  # OpenAI's limit: 16 pairs, keys up to 64 characters, values up to 512
LOGPROBS_INCLUDE = "message.output_text.logprobs"

_UNSUPPORTED_CONTENT = {
    "input_image": "images are not supported: the models served here read text only",
    "input_file": "files are not supported: send their text",
    "input_audio": "audio is not supported: the models served here read text only",
}


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("type 'json_schema' needs schema, a JSON schema")
        return self


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


# --- input items ------------------------------------------------------------------------------------
class InputTextPart(_Body):
    type: Literal["input_text", "output_text", "text"]
    text: str


class RefusalPart(_Body):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[InputTextPart | RefusalPart, Field(discriminator="type")]
Content = str | list[ContentPart]


def _text_parts_only(value: Any) -> Any:
    """Images, files and audio are refused saying so (not as an unknown part)."""
    for part in value if isinstance(value, list) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        why = _UNSUPPORTED_CONTENT.get(kind) if isinstance(kind, str) else None
        if why:
            raise ValueError(why)
    return value


class MessageItem(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Content

    _parts = field_validator("content", mode="before")(lambda cls, v: _text_parts_only(v))


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: Content

    _parts = field_validator("output", mode="before")(lambda cls, v: _text_parts_only(v))


class ReasoningItem(_Body):
    type: Literal["reasoning"]


def _item_kind(value: Any) -> Any:
    if isinstance(value, dict):
        return value.get("type", "message")
    return getattr(value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_kind),
]


# --- tools ------------------------------------------------------------------------------------------
class FunctionTool(_Body):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Body):
    type: Literal["function"]
    name: str


class ResponsesRequest(_Nullable):
    model: str = Field(min_length=1)
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL] | None = None
    stream: bool = False
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: dict[str, Any] | None = None  # effort and summary: R1 reasons as it was trained to
    user: str | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=MAX_METADATA)] | None = None
    store: bool = True
    previous_response_id: str | None = None
    include: list[str] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    stream_options: dict[str, Any] | None = None
    # not implemented: accepted only at their neutral value
    background: Literal[False] | None = None
    truncation: Literal["disabled"] | None = None
    conversation: None = None
    prompt: None = None
    # vLLM's sampling extensions, as its Responses endpoint takes them
    seed: Int | None = None
    top_k: Annotated[int, Field(ge=-1), INTEGRAL] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=10)] | None = None
    presence_penalty: Annotated[float, Field(ge=-PENALTY_RANGE, le=PENALTY_RANGE)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-PENALTY_RANGE, le=PENALTY_RANGE)] | None = None
    stop: str | list[str] | None = None
    cache_salt: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0), INTEGRAL] = 0
    structured_outputs: StructuredOutputs | None = None  # the chat request's (a JSON text.format excludes it)
    guided_json: None = None  # vLLM's removed spellings of structured_outputs: refused with the new name
    guided_regex: None = None
    guided_choice: None = None
    guided_grammar: None = None

    @field_validator("top_logprobs", "max_output_tokens", "top_k", "seed", "min_tokens", mode="before")
    @classmethod
    def _number_not_bool(cls, value: Any) -> Any:
        return _no_bool(value)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _choice_needs_tools(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, "none") and not info.data.get("tools"):
            raise ValueError("'tool_choice' is only allowed when 'tools' are given")
        return value

    _stop = field_validator("stop")(lambda cls, value: check_stop(value))

    @property
    def wants_logprobs(self) -> bool:
        return self.top_logprobs is not None or LOGPROBS_INCLUDE in (self.include or ())

    def text_format(self) -> dict[str, Any]:
        form = self.text.format if self.text and self.text.format else TextFormat()
        return form.model_dump(by_alias=True, exclude_none=True)


UNSUPPORTED_HINTS = {
    "background": "background responses are not supported: send the request and wait for its answer",
    "truncation": "only truncation 'disabled' is supported: a conversation longer than the context is refused",
    "conversation": "the Conversations API is not supported: send the history as input, or use "
                    "previous_response_id",
    "prompt": "stored prompt templates are not supported: send the prompt as instructions and input",
}


def parse_responses(data: Any) -> ResponsesRequest:
    """The request, validated; what is not implemented is refused saying so."""
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return ResponsesRequest.model_validate(data)
    except ValidationError as invalid:
        exc = error_of(_deepest(invalid))
        param = exc.param or ""
        hint = UNSUPPORTED_HINTS.get(param)
        if hint is None and (kind := _unsupported_kind(param, data)) is not None:
            param, hint = kind
        if hint is not None:
            raise bad_request(f"Unsupported value for '{param}': {hint}.", param, "unsupported_value") from None
        raise exc from None


_ITEM_TAGS = {"message", "function_call", "function_call_output", "reasoning"}


def _deepest(exc: ValidationError) -> Any:
    """The error deepest in the body (of `input: str | [items]`, the item's, not "not a string"), its
    location without the item kind pydantic adds after an item's index."""
    error: dict[str, Any] = dict(max(exc.errors(), key=lambda e: len(e["loc"])))
    loc = list(error["loc"])
    error["loc"] = tuple(p for i, p in enumerate(loc) if not (p in _ITEM_TAGS and i and isinstance(loc[i - 1], int)))
    return error


def _unsupported_kind(param: str, data: Any) -> tuple[str, str] | None:
    """An input item, tool or tool choice of a kind dsnode does not serve, said as such."""
    found = re.fullmatch(r"(input|tools)\[(\d+)\](?:\.type)?|tool_choice(?:\.type)?", param)
    if found is None:
        return None
    if found.group(1) is None:
        choice = data.get("tool_choice")
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind in (None, "function"):
            return None
        return "tool_choice", (f"{kind!r} tool choices are not supported here (a mode, or "
                               "{'type': 'function', 'name': NAME})")
    entries = data.get(found.group(1))
    entry = entries[int(found.group(2))] if isinstance(entries, list) and int(found.group(2)) < len(entries) else None
    kind = entry.get("type", "message") if isinstance(entry, dict) else None
    where = f"{found.group(1)}[{found.group(2)}].type"
    if found.group(1) == "input" and kind not in (None, *_ITEM_TAGS):
        return where, (f"{kind!r} items are not supported here (message, function_call, function_call_output "
                       "and reasoning are)")
    if found.group(1) == "tools" and kind not in (None, "function"):
        return where, f"{kind!r} tools are not supported here: only function tools, which the client runs"
    return None


def chat_request(request: ResponsesRequest, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat completion request's JSON: `history` (the messages of the response it continues, if
    any) then `input`, after `instructions` as the system message."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": request.instructions}] \
        if request.instructions is not None else []
    messages += history + input_messages(request.input)
    if not any(m["role"] != "system" for m in messages):
        raise bad_request("The request has no input: give 'input' (a text or a list of items).", "input",
                          "missing_parameter")
    chat: dict[str, Any] = {"model": request.model, "messages": messages, "stream": request.stream}
    if request.stream:
        chat["stream_options"] = {"include_usage": True}  # the usage of `response.completed`
    fields = {
        "max_completion_tokens": request.max_output_tokens, "temperature": request.temperature,
        "top_p": request.top_p, "user": request.user, "prompt_cache_key": request.prompt_cache_key,
        "seed": request.seed, "top_k": request.top_k, "min_p": request.min_p,
        "repetition_penalty": request.repetition_penalty, "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty, "stop": request.stop, "cache_salt": request.cache_salt,
        "ignore_eos": request.ignore_eos or None, "min_tokens": request.min_tokens or None,
        "structured_outputs": request.structured_outputs and request.structured_outputs.model_dump(
            by_alias=True, exclude_none=True),
    }
    chat.update({k: v for k, v in fields.items() if v is not None})
    if request.wants_logprobs:
        chat["logprobs"] = True
        chat["top_logprobs"] = request.top_logprobs or 0
    if request.tools:
        chat["tools"] = [_chat_tool(tool) for tool in request.tools]
        chat["parallel_tool_calls"] = request.parallel_tool_calls
    if request.tool_choice is not None:
        chat["tool_choice"] = _chat_tool_choice(request.tool_choice)
    form = request.text_format()
    if form["type"] == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif form["type"] == "json_schema":
        spec = {k: form[k] for k in ("name", "schema", "description", "strict") if k in form}
        chat["response_format"] = {"type": "json_schema", "json_schema": spec}
    return chat


def as_responses_error(error: APIError) -> None:
    """A refusal of the chat request a Responses request stands for, said in the Responses API's names
    (`max_output_tokens`, `text.format`, `tools[0].name`, `input`): its param and its message."""
    error.param = responses_param(error.param)
    error.message = _renamed(error.message)


def responses_param(param: str | None) -> str | None:
    """A chat parameter's name → the Responses API's name for it."""
    if param is None:
        return None
    if param.startswith("messages"):
        return "input"
    if param.startswith("tools[") and ".function." in param:
        return param.replace(".function.", ".", 1)
    for chat, ours in _RENAMED:
        if param.startswith(chat):
            return ours + param[len(chat):]
    return param


_RENAMED = (("max_completion_tokens", "max_output_tokens"), ("response_format.json_schema", "text.format"),
            ("response_format", "text.format"), ("tool_choice.function", "tool_choice"))


def _renamed(message: str) -> str:
    for chat, ours in _RENAMED:
        message = message.replace(f"'{chat}", f"'{ours}")
    return message.replace("'messages", "'input")


# --- input items ------------------------------------------------------------------------------------
def input_messages(given: str | list[InputItem] | None) -> list[dict[str, Any]]:
    """`input` as chat messages: a text is one user message; items become messages in order, function
    calls joining the assistant message before them, their outputs becoming tool messages."""
    if given is None:
        return []
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    messages: list[dict[str, Any]] = []
    for item in given:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            _add_call(messages, item)
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
        # a reasoning item: dropped (R1's template drops earlier reasoning from the history too)
    return messages


_ITEMS: TypeAdapter[list[InputItem]] = TypeAdapter(list[InputItem])


def as_history(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the chat messages of the next turn's history."""
    return input_messages(_ITEMS.validate_python([i for i in items if i.get("type") in ("message", "function_call")]))


def _text(content: Content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.refusal if isinstance(part, RefusalPart) else part.text for part in content)


def _add_call(messages: list[dict[str, Any]], item: FunctionCallItem) -> None:
    call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _chat_tool(tool: FunctionTool) -> dict[str, Any]:
    function = tool.model_dump(exclude_none=True, exclude={"type"})
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | FunctionChoice) -> Any:
    if isinstance(choice, str):
        return choice
    return {"type": "function", "function": {"name": choice.name}}
