"""The one engine contract every backend implements (edge ONNX, central transformers / DeepSpeed).

An engine turns prompt token ids into a stream of `Delta`s. It never touches HTTP: the daemon maps the
errors below to status codes in one place (`dsnode.api.errors`).
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Literal

if TYPE_CHECKING:
    from .grammar import Constraint
    from .tokenizer import TextTokenizer

FinishReason = Literal["stop", "length", "abort"]
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    # Logits processors, applied before temperature (OpenAI and vLLM semantics): presence and frequency
    # penalties count the tokens generated so far, the repetition penalty (vLLM's, as transformers')
    # the prompt's and the generated ones, logit_bias adds to the named token ids.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_p: float = 0.0  # vLLM's: tokens under min_p x the likeliest's probability are cut (after temperature)
    min_tokens: int = 0  # vLLM's: no end of sequence (nor a stop token id) before this many tokens
    stop_token_ids: frozenset[int] = frozenset()  # vLLM's: these end the answer as end-of-sequence does
    # Log-probabilities of the model's own distribution (before the processors, the temperature and a
    # constraint's mask, as vLLM's default), for the sampled token and this many alternatives; None: none.
    logprobs: int | None = None
    # The same for every prompt token (a text completion's `echo` with `logprobs`: scoring a text, as
    # lm-evaluation-harness does); None: not asked. They come on the first delta.
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        """Temperatures under 1e-5 are greedy too (vLLM's rule): logits divided by 1e-320 are infinite."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_k == 1

    @property
    def processes_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    # The grammar the output must follow (structured output, forced tool calls): the engine masks the
    # logits with it every step before sampling. None: free text.
    constraint: "Constraint | None" = None
    # Whose prompt cache entries it may take and leave: requests of another scope never share a prefix
    # (the API key's identity and the request's `cache_salt`)
    cache_scope: str = ""
    # The first of several choices of one prompt (`n`): its prompt's KV goes into the prompt cache as
    # soon as it is prefilled, so the other choices, asked for after its first token, take it from there
    share_prompt: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability, and the most likely tokens at its step (best first). A prompt's first
    token has none (nothing comes before it): logprob None."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # 1 + how many tokens were likelier (vLLM's prompt_logprobs show it)


@dataclass(frozen=True)
class Delta:
    """One streamed step of a generation: new text (possibly empty) and, on the last one, why it ended."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    queued_s: float | None = None  # first delta only: seconds from admission until the batch took it
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when the request asked for them
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # first delta only: one per prompt token, when asked
    cached_tokens: int = 0  # first delta only: prompt tokens taken from the prompt cache, not computed


@dataclass(frozen=True)
class ModelInfo:
    name: str
    backend: str
    architecture: str
    quantization: str
    max_context: int
    device: str  # e.g. "cpu", "cuda:0", "CUDAExecutionProvider"
    tensor_parallel: int = 1
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Health:
    ready: bool
    reason: str = ""


@dataclass(frozen=True)
class EngineLoad:
    waiting: int
    running: int
    batch_tokens: int  # tokens held by the running batch
    batch_token_budget: int
    tokens_per_second: float  # generated tokens/s over the recent window
    max_queue: int
    prompt_cache_bytes: int = 0  # host memory the runner's prompt cache holds (runners that have one)


class EngineError(Exception):
    """The engine failed while generating; only the affected requests see it."""


class ConstraintFailed(EngineError):
    """The request's grammar could not be followed (it compiled, but the library gave up on it): the
    client's schema, not the node, is at fault. `param`: the request parameter the grammar came from."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class EngineNotReady(EngineError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class QueueFull(Exception):
    def __init__(self, waiting: int, max_queue: int, retry_after_s: int = 1) -> None:
        super().__init__(f"server is at capacity: {waiting} requests waiting (max_queue={max_queue})")
        self.retry_after_s = retry_after_s


class ContextLengthExceeded(Exception):
    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int) -> None:
        if max_tokens:
            message = (
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for "
                f"the completion). Please reduce the prompt or max_tokens."
            )
        else:
            message = (
                f"This model's maximum context length is {limit} tokens, and the prompt has "
                f"{prompt_tokens} tokens, leaving no room for a completion."
            )
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.limit = limit


class Engine(abc.ABC):
    """load → generate* → close. Implementations run inference off the event loop."""

    def __init__(self) -> None:
        # Set when the engine can serve no more (a tensor-parallel rank died, the device was lost):
        # the server then exits non-zero so systemd restarts the node. A failed request or a failed
        # load does not set it. Implementations set it from the event loop's thread.
        self.failed = asyncio.Event()

    @property
    @abc.abstractmethod
    def info(self) -> ModelInfo: ...

    @property
    @abc.abstractmethod
    def tokenizer(self) -> "TextTokenizer": ...

    @abc.abstractmethod
    async def load(self) -> None:
        """Load weights and start workers; raises on failure (the node then reports not-ready)."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream deltas; the last carries `finish_reason`. Closing the iterator early aborts the
        generation and frees its batch slot. Raises QueueFull / ContextLengthExceeded before the
        first delta, EngineError at any point."""

    @abc.abstractmethod
    def health(self) -> Health: ...

    @abc.abstractmethod
    def load_figures(self) -> EngineLoad: ...

    @property
    def shares_prompts(self) -> bool:
        """Whether a prompt prefilled for one request can be given to the next ones (a prompt cache
        that keeps on request: `GenerationRequest.share_prompt`)."""
        return False

    @abc.abstractmethod
    async def close(self) -> None: ...
