"""OpenAI request bodies, validated with pydantic. A bad value is refused with 400 naming the parameter.

Fields dsnode does not implement are accepted only at their neutral value (e.g. `n = 1`,
`presence_penalty = 0`); anything else is refused rather than silently ignored. Unknown fields are
ignored, as vLLM and Ollama do, so newer SDKs keep working. An explicit `null` for a field with a
default means the default (OpenAI's parameters are nullable: `"temperature": null` is temperature 1).
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import APIError, bad_request

MAX_STOP_SEQUENCES = 16


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class _Sampling(_Body):
    model: str = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = -1  # vLLM: -1 or 0 disable it
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and None in data.values():
            defaulted = null_means_default(cls)
            return {k: v for k, v in data.items() if v is not None or k not in defaulted}
        return data

    @field_validator("n", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _number_not_bool(cls, value: Any) -> Any:
        return _no_bool(value)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> None:
        if value:
            raise ValueError("logit_bias is not supported")
        return None

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: Literal[False] = False
    tools: None = None
    tool_choice: Literal["none"] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("logprobs", mode="before")
    @classmethod
    def _bool_not_number(cls, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError("Input should be a valid boolean")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") != "text":
            raise ValueError("only response_format {\"type\": \"text\"} is supported")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    echo: bool = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("best_of", mode="before")
    @classmethod
    def _best_of_not_bool(cls, value: Any) -> Any:
        return _no_bool(value)

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, value: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str) and len(value) > 1:
            raise ValueError("only one prompt per request is supported")
        if value == [""]:
            raise ValueError("the prompt is empty")
        if isinstance(value, list) and value and isinstance(value[0], int) and min(value) < 0:
            raise ValueError("token ids must be >= 0")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


@cache
def null_means_default(model: type[BaseModel]) -> frozenset[str]:
    """The fields for which `null` stands for the default: those whose default is not None."""
    return frozenset(name for name, f in model.model_fields.items() if not f.is_required() and f.default is not None)


def _no_bool(value: Any) -> Any:
    """`Literal[1]` and `Literal[0]` compare by equality, so JSON true/false would pass as 1/0."""
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


Body = ChatCompletionRequest | CompletionRequest


def parse_body(model: type[_Sampling], body: Any) -> Any:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _as_api_error(exc) from None


def _as_api_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    loc = [p for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    param = _param_name(loc)
    if first["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param, code="missing_parameter")
    if first["type"] in ("literal_error",) and param in _UNSUPPORTED_HINT:
        return bad_request(
            f"Unsupported value for '{param}': {_UNSUPPORTED_HINT[param]} (got {_show(first.get('input'))}).",
            param=param,
            code="unsupported_value",
        )
    message = first["msg"].removeprefix("Value error, ")
    return bad_request(
        f"Invalid value for '{param}': {message} (got {_show(first.get('input'))}).",
        param=param,
        code="invalid_value",
    )


_UNION_TAGS = {"str", "int", "list[str]", "list[int]", "list[TextPart]", "none", "function-after", "function-before"}

_UNSUPPORTED_HINT = {
    "n": "only n=1 is supported",
    "best_of": "only best_of=1 is supported",
    "presence_penalty": "presence_penalty is not supported (use 0)",
    "frequency_penalty": "frequency_penalty is not supported (use 0)",
    "logprobs": "logprobs are not supported",
    "tool_choice": "tool calling is not supported",
}


def _param_name(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "body"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
