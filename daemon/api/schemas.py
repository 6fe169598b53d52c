"""OpenAI request bodies, validated with pydantic. A bad value is refused with 400 naming the parameter.

Fields dsnode does not implement are accepted only at their neutral value (e.g. `best_of = 1`,
`suffix = null`); anything else is refused rather than silently ignored. Unknown fields are
ignored, as vLLM and Ollama do, so newer SDKs keep working. An explicit `null` for a field with a
default means the default (OpenAI's parameters are nullable: `"temperature": null` is temperature 1).
"""

from __future__ import annotations

import json
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import APIError, bad_request

MAX_STOP_SEQUENCES = 16
MAX_CHOICES = 16  # n: choices per prompt, each a sequence of its own in the batch
MAX_PROMPTS = 64  # prompts in one text completion; prompts x n sequences at most too
MAX_LOGPROBS = 20  # alternatives per token: OpenAI's top_logprobs limit, vLLM's default max_logprobs
MAX_LOGIT_BIAS = 300  # token ids in one logit_bias
MAX_STOP_TOKEN_IDS = 64
LOGIT_BIAS_RANGE = 100.0
PENALTY_RANGE = 2.0


def _integral(value: Any) -> Any:
    """JSON Schema's integer is any number with no fraction (`10.0` is 10, as a client in Rust or Go may
    send it, and as vLLM's pydantic reads it); strict validation would refuse it. Not booleans, not
    strings: those stay refused."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


INTEGRAL = BeforeValidator(_integral)  # on every integer of a request body
Int = Annotated[int, INTEGRAL]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


class _Nullable(_Body):
    """`null` for a field with a default means the default (OpenAI's parameters are nullable)."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and None in data.values():
            defaulted = null_means_default(cls)
            return {k: v for k, v in data.items() if v is not None or k not in defaulted}
        return data


def check_stop(value: str | list[str] | None) -> str | list[str] | None:
    """At most MAX_STOP_SEQUENCES stop strings, none empty."""
    stops = [value] if isinstance(value, str) else (value or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
    if any(not s for s in stops):
        raise ValueError("stop sequences must not be empty")
    return value


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


_UNSUPPORTED_PARTS = {
    "image_url": "images are not supported: the models served here read text only",
    "input_image": "images are not supported: the models served here read text only",
    "input_audio": "audio is not supported: the models served here read text only",
    "file": "files are not supported: send their text",
}


class FunctionCall(_Body):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = "{}"


class ToolCallMessage(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        for part in value if isinstance(value, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            why = _UNSUPPORTED_PARTS.get(kind) if isinstance(kind, str) else None
            if why:
                raise ValueError(why)
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self, arguments_as_text: bool = False) -> dict[str, Any]:
        """The message as chat templates take it; a call's `arguments` as text (DeepSeek's templates)
        or as an object (Qwen's, which apply `tojson`)."""
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [_call_for_template(c, arguments_as_text) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


def _call_for_template(call: ToolCallMessage, arguments_as_text: bool) -> dict[str, Any]:
    arguments: Any = call.function.arguments
    if arguments_as_text and not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    elif not arguments_as_text and isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # not JSON: the template gets the text as it came
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


class FunctionSpec(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpecIn(_Body):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("type 'json_schema' needs json_schema.schema, a JSON schema")
        return self


MAX_CHOICE_STRINGS = 1024  # structured_outputs.choice
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs`: the answer matches exactly one of a JSON schema (an object, or its
    JSON text), a regular expression, one of several strings, a Lark or GBNF grammar, or any JSON
    object. vLLM's knobs with no meaning here are refused rather than ignored."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: Annotated[str, Field(min_length=1)] | None = None
    choice: Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICE_STRINGS)] | None = None
    grammar: Annotated[str, Field(min_length=1)] | None = None
    json_object: bool | None = None
    whitespace_pattern: None = None
    structural_tag: None = None
    disable_fallback: bool | None = None  # one grammar library, no fallback: true or not, the same
    disable_any_whitespace: bool | None = None  # JSON is always compact here (no free whitespace)

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputs":
        given = self.kinds()
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(STRUCTURED_KINDS[:-1])} or json_object: true"
                             + (f", not {' and '.join(given)}" if given else ""))
        return self

    def kinds(self) -> list[str]:
        values = {"json": self.json_, "regex": self.regex, "choice": self.choice, "grammar": self.grammar,
                  "json_object": self.json_object or None}
        return [kind for kind in STRUCTURED_KINDS if values[kind] is not None]

    def json_schema(self) -> dict[str, Any] | str | None:
        """The JSON schema asked for, as an object or its JSON text (`json_object`: any object); None:
        not JSON."""
        return {"type": "object"} if self.json_object else self.json_


class _Sampling(_Nullable):
    model: str = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1), INTEGRAL] = -1  # vLLM: -1 or 0 disable it
    seed: Int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES), INTEGRAL] = 1
    presence_penalty: Annotated[float, Field(ge=-PENALTY_RANGE, le=PENALTY_RANGE)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-PENALTY_RANGE, le=PENALTY_RANGE)] = 0.0
    repetition_penalty: Annotated[float, Field(ge=0.01, le=10)] = 1.0  # vLLM's extension
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0  # vLLM's extension
    min_tokens: Annotated[int, Field(ge=0), INTEGRAL] = 0  # vLLM's extension
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0), INTEGRAL]],
                              Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False
    # the prompt cache (docs/edge.md): `cache_salt` (vLLM's) keeps this request's cached prefixes apart
    # from those of requests without the same salt; `prompt_cache_key` (OpenAI's) replaces the prompt's
    # opening as the key that keeps requests on one upstream ([routing] affinity = "prefix")
    cache_salt: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    prompt_cache_key: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    return_tokens_as_token_ids: bool = False  # vLLM's: log-probability entries name tokens `token_id:N`
    # vLLM's: the prompt's log-probabilities in vLLM's shape, with this many alternatives (whole answers)
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL] | None = None
    response_format: ResponseFormat | None = None  # a text completion takes it too (as vLLM)
    structured_outputs: StructuredOutputs | None = None  # vLLM's
    # vLLM's older spellings, removed in vLLM 0.12: refused with the new name rather than ignored
    guided_json: None = None
    guided_regex: None = None
    guided_choice: None = None
    guided_grammar: None = None
    guided_whitespace_pattern: None = None
    guided_decoding_backend: str | None = None  # one grammar library here: whatever is named, it is used

    @field_validator("structured_outputs")
    @classmethod
    def _one_structure(cls, value: Any, info: ValidationInfo) -> Any:
        """One way of asking for structured output."""
        form = info.data.get("response_format")
        if value is not None and form is not None and form.type != "text":
            raise ValueError("'response_format' is given too; give one of them: each sets the answer's structure")
        return value

    def requested_prompt_logprobs(self) -> int | None:
        """How many alternatives the engine keeps for each prompt token, if the prompt is scored."""
        return self.prompt_logprobs

    @field_validator("n", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens",
                     mode="before")
    @classmethod
    def _number_not_bool(cls, value: Any) -> Any:
        return _no_bool(value)

    _stop = field_validator("stop")(lambda cls, value: check_stop(value))

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if not value:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} token ids")
        for token, bias in value.items():
            if not (token.isascii() and token.isdigit() and len(token) <= 9):
                raise ValueError(f"its keys are token ids (digits), not {token!r}")
            if not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:
                raise ValueError(f"the bias of token {token} is {bias}, outside -100..100")
        return value

    def carries_token_ids(self) -> bool:
        """Token ids in the request: they mean one tokenizer's vocabulary (`dsnode.cluster.routing`)."""
        return bool(self.logit_bias or self.stop_token_ids)

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted((int(token), float(bias)) for token, bias in (self.logit_bias or {}).items()))

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL] | None = None
    tools: list[ToolSpecIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("logprobs", mode="before")
    @classmethod
    def _bool_not_number(cls, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError("Input should be a valid boolean")
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _named_choice_shape(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, "none") and not info.data.get("tools"):
            raise ValueError("'tool_choice' is only allowed when 'tools' are given")
        if isinstance(value, dict):
            function = value.get("function")
            if value.get("type") != "function" or not isinstance(function, dict) or \
                    not isinstance(function.get("name"), str):
                raise ValueError('a named tool choice is {"type": "function", "function": {"name": NAME}}')
        return value

    @field_validator("top_logprobs", mode="before")
    @classmethod
    def _top_logprobs_not_bool(cls, value: Any) -> Any:
        return _no_bool(value)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def requested_logprobs(self) -> int | None:
        """Alternatives per token, when log-probabilities were asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[Int] | list[list[Int]] = Field(min_length=1)
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL] | None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("best_of", "logprobs", mode="before")
    @classmethod
    def _best_of_not_bool(cls, value: Any) -> Any:
        return _no_bool(value)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str] | list[int] | list[list[int]], info: ValidationInfo) -> Any:
        prompts, n = _as_prompts(value), info.data.get("n", 1)
        if len(prompts) * n > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} sequences per request (prompts x n: {len(prompts)} x {n})")
        for prompt in prompts:
            if not prompt:
                raise ValueError("the prompt is empty" if len(prompts) == 1 else "a prompt is empty")
            if isinstance(prompt, list) and min(prompt) < 0:
                raise ValueError("token ids must be >= 0")
        return value

    def prompts(self) -> list[str] | list[list[int]]:
        """One entry per prompt: a text, or token ids."""
        return _as_prompts(self.prompt)

    def carries_token_ids(self) -> bool:
        return super().carries_token_ids() or not isinstance(self.prompts()[0], str)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def requested_prompt_logprobs(self) -> int | None:
        """`echo` with `logprobs`: the prompt's tokens are scored too (OpenAI's legacy completions,
        lm-evaluation-harness's loglikelihood requests); and vLLM's `prompt_logprobs`."""
        wanted = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs) if k is not None]
        return max(wanted) if wanted else None

    def echoes_scores(self) -> bool:
        """The echoed prompt's entries go first in the answer's `logprobs` block."""
        return self.echo and self.logprobs is not None


@cache
def null_means_default(model: type[BaseModel]) -> frozenset[str]:
    """The fields for which `null` stands for the default: those whose default is not None."""
    return frozenset(name for name, f in model.model_fields.items() if not f.is_required() and f.default is not None)


def _as_prompts(value: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [value]  # list[int]: one prompt of token ids
    return value  # type: ignore[return-value]  # list[str] or list[list[int]]


def _no_bool(value: Any) -> Any:
    """`Literal[1]` and `Literal[0]` compare by equality, so JSON true/false would pass as 1/0."""
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


Body = ChatCompletionRequest | CompletionRequest


def parse_body(model: type[_Body], body: Any) -> Any:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _as_api_error(exc) from None


def _as_api_error(exc: ValidationError) -> APIError:
    return error_of(exc.errors()[0])


def error_of(first: Any) -> APIError:
    """One of pydantic's errors (`ValidationError.errors()`) as the 400 that names its parameter."""
    loc = [p for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    param = _param_name(loc)
    if first["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param, code="missing_parameter")
    if first["type"] in ("literal_error", "none_required") and param in _UNSUPPORTED_HINT:
        return bad_request(
            f"Unsupported value for '{param}': {_UNSUPPORTED_HINT[param]} (got {_show(first.get('input'))}).",
            param=param,
            code="unsupported_value",
        )
    if first["type"] == "none_required":  # never pydantic's "Input should be None"
        return bad_request(f"Unsupported parameter: '{param}' is not supported by this server.", param=param,
                           code="unsupported_parameter")
    message = first["msg"].removeprefix("Value error, ")
    return bad_request(
        f"Invalid value for '{param}': {message} (got {_show(first.get('input'))}).",
        param=param,
        code="invalid_value",
    )


_UNION_TAGS = {"str", "int", "list[str]", "list[int]", "list[list[int]]", "list[TextPart]", "none", "function-after",
               "function-before", "NamedToolChoice"}

_UNSUPPORTED_HINT = {
    "best_of": "only best_of=1 is supported",
    "suffix": "suffix (insertion) is not supported",
    **{f"guided_{kind}": f"vLLM's guided_{kind} is structured_outputs.{kind} since vLLM 0.12; send that"
       for kind in ("json", "regex", "choice", "grammar")},
}


def _param_name(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "body"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
