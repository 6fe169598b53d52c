"""`dsnode bench load`: concurrent requests against any OpenAI-compatible server, and what they cost.

Only the OpenAI HTTP API is used (aiohttp; the base install has no `openai` package), so the same
command measures a dsnode node, a vLLM server or anything else that speaks it. Each request is one of
the `--mix` shapes: a synthetic prompt of N words (about one token each on a real model's vocabulary)
and a max_tokens. Token counts in the report are the server's own `usage`; streamed requests ask for
it with `stream_options.include_usage`. dsnode's `X-DSNode-Node` / `X-DSNode-Route` answer headers
say which node served each request.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import aiohttp
import numpy as np

from .. import headers

WORDS = tuple(
    "the of and to in is was it that for on as with his he be at by had not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so said "
    "what up its about into than them can only other new some could time these two may then do first any my "
    "now such like our over man me even most made after also did many before must through back years where "
    "much your way well down should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three".split()
)
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class RequestShape:
    prompt_words: int
    max_tokens: int
    weight: float = 1.0

    def __str__(self) -> str:
        return f"{self.prompt_words}:{self.max_tokens}:{self.weight:g}"


DEFAULT_MIX = (RequestShape(64, 64, 4.0), RequestShape(1024, 64, 1.0))


def parse_mix(text: str) -> tuple[RequestShape, ...]:
    """'PROMPT_WORDS:MAX_TOKENS[:WEIGHT],...' e.g. '64:64:8,3000:128:1' (8 short for each long one)."""
    shapes = []
    for part in text.split(","):
        fields = part.strip().split(":")
        try:
            if len(fields) not in (2, 3):
                raise ValueError
            words, max_tokens = int(fields[0]), int(fields[1])
            weight = float(fields[2]) if len(fields) == 3 else 1.0
        except ValueError:
            raise ValueError(f"not PROMPT_WORDS:MAX_TOKENS[:WEIGHT]: {part.strip()!r}") from None
        if words < 1 or max_tokens < 1 or not weight > 0:
            raise ValueError(f"prompt words and max tokens must be >= 1 and the weight > 0: {part.strip()!r}")
        shapes.append(RequestShape(words, max_tokens, weight))
    return tuple(shapes)


@dataclass(frozen=True)
class LoadPlan:
    url: str
    model: str
    endpoint: Literal["chat", "completions", "responses"] = "chat"
    concurrency: int = 4
    requests: int | None = 64  # stop after this many (None: only the duration counts)
    duration_s: float | None = None  # stop sending after this long; requests in flight finish
    mix: tuple[RequestShape, ...] = DEFAULT_MIX
    stream: bool = True
    temperature: float = 0.0
    ignore_eos: bool = False  # vLLM/dsnode extension: always generate max_tokens
    seed: int = 0
    timeout_s: float = 600.0
    api_key: str | None = None


@dataclass
class Outcome:
    index: int
    shape: RequestShape
    status: int | None  # HTTP status; None when no answer came
    error: str | None  # None when it succeeded
    latency_s: float
    ttft_s: float | None = None  # streamed: time to the first chunk with text
    prompt_tokens: int | None = None  # the server's usage
    completion_tokens: int | None = None
    node: str | None = None  # X-DSNode-Node
    route: str | None = None  # X-DSNode-Route

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def error_kind(self) -> str:
        """How errors are grouped in the report: the HTTP status, or what went wrong without one."""
        if self.status is None:
            return "timeout" if self.error == "timeout" else "connection"
        return "stream_error" if self.status < 400 else str(self.status)


@dataclass
class Progress:
    target: int | None
    duration_s: float | None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None  # set when the last request is back
    sent: int = 0
    ok: int = 0
    failed: int = 0

    @property
    def elapsed_s(self) -> float:
        return (self.ended or time.monotonic()) - self.started


class CannotStart(Exception):
    """The server could not be asked at all (unreachable, no model)."""


# --- running --------------------------------------------------------------------------------------
def unreachable(url: str, exc: BaseException) -> CannotStart:
    """What `dsnode status` says too: the reason in words and where to look, not aiohttp's repr."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        errno = exc.os_error.errno if exc.os_error is not None else None
        reason = os.strerror(errno) if errno else str(exc.os_error or exc)
    elif isinstance(exc, asyncio.TimeoutError):
        reason = "no answer in time"
    else:
        reason = str(exc) or type(exc).__name__
    return CannotStart(f"cannot reach {url} ({reason}). Is the server running there? "
                       "(a dsnode node: systemctl status dsnode)")


async def check_reachable(url: str, timeout_s: float = 10.0) -> None:
    """Before a run with --model: a server that cannot be reached fails at once, not once per request."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(f"{url}/health"):
                pass
    except (aiohttp.ClientConnectorError, asyncio.TimeoutError) as exc:
        raise unreachable(url, exc) from None


async def first_model(url: str, timeout_s: float = 10.0, api_key: str | None = None) -> str:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(f"{url}/v1/models", headers=_auth(api_key)) as response:
                if response.status != 200:
                    raise CannotStart(f"{url}/v1/models answered HTTP {response.status}")
                data = await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise unreachable(url, exc) from None
    models = [m.get("id") for m in data.get("data", []) if isinstance(m, dict) and m.get("id")]
    if not models:
        raise CannotStart(f"{url}/v1/models lists no model; pass --model")
    return str(models[0])


async def run_load(
    plan: LoadPlan, progress: Progress | None = None, on_tick: Callable[[Progress], None] | None = None
) -> list[Outcome]:
    """Send the plan's requests with `concurrency` workers; every request sent is in the result."""
    if plan.requests is None and plan.duration_s is None:
        raise ValueError("a load plan needs a request count or a duration")
    progress = progress or Progress(plan.requests, plan.duration_s)
    shapes = _shape_sequence(plan)
    outcomes: list[Outcome] = []
    counter = iter(range(plan.requests if plan.requests is not None else 2**62))
    stop_at = None if plan.duration_s is None else time.monotonic() + plan.duration_s

    async def worker(session: aiohttp.ClientSession) -> None:
        for index in counter:
            if stop_at is not None and time.monotonic() >= stop_at:
                return
            progress.sent += 1
            outcome = await send_one(session, plan, index, next(shapes))
            outcomes.append(outcome)
            if outcome.ok:
                progress.ok += 1
            else:
                progress.failed += 1

    connector = aiohttp.TCPConnector(limit=plan.concurrency)
    timeout = aiohttp.ClientTimeout(total=plan.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        ticker = asyncio.create_task(_tick(progress, on_tick)) if on_tick else None
        try:
            await asyncio.gather(*(worker(session) for _ in range(plan.concurrency)))
            progress.ended = time.monotonic()
        finally:
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
    outcomes.sort(key=lambda o: o.index)
    return outcomes


async def _tick(progress: Progress, on_tick: Callable[[Progress], None]) -> None:
    while True:
        await asyncio.sleep(0.5)
        on_tick(progress)


def _shape_sequence(plan: LoadPlan) -> Any:
    rng = random.Random(plan.seed)
    weights = [s.weight for s in plan.mix]
    while True:
        yield rng.choices(plan.mix, weights)[0]


def make_prompt(words: int, index: int, seed: int = 0) -> str:
    """Synthetic text of `words` words, different for each request (no prefix-cache flattery)."""
    rng = random.Random(seed * 1_000_003 + index)
    return " ".join(rng.choice(WORDS) for _ in range(words))


PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses"}


def request_body(plan: LoadPlan, index: int, shape: RequestShape) -> dict[str, Any]:
    prompt = make_prompt(shape.prompt_words, index, plan.seed)
    body: dict[str, Any] = {"model": plan.model, "temperature": plan.temperature}
    if plan.endpoint == "responses":
        body["input"], body["max_output_tokens"] = prompt, shape.max_tokens
    else:
        body["max_tokens"] = shape.max_tokens
        body["messages" if plan.endpoint == "chat" else "prompt"] = \
            [{"role": "user", "content": prompt}] if plan.endpoint == "chat" else prompt
    if plan.stream:
        body["stream"] = True
        if plan.endpoint != "responses":  # a response's usage comes with response.completed
            body["stream_options"] = {"include_usage": True}
    if plan.ignore_eos:
        body["ignore_eos"] = True
    return body


async def send_one(
    session: aiohttp.ClientSession, plan: LoadPlan, index: int, shape: RequestShape
) -> Outcome:
    path = PATHS[plan.endpoint]
    body = request_body(plan, index, shape)
    started = time.perf_counter()
    outcome = Outcome(index, shape, None, None, 0.0)
    try:
        async with session.post(plan.url + path, json=body, headers=_auth(plan.api_key)) as response:
            outcome.status = response.status
            outcome.node = response.headers.get(headers.NODE)
            outcome.route = response.headers.get(headers.ROUTE)
            if response.status >= 400:
                outcome.error = _error_message(await response.read(), response.status)
            elif plan.stream:
                read = _read_events if plan.endpoint == "responses" else _read_stream
                await read(response, outcome, started)
            else:
                _read_whole(await response.json(content_type=None), outcome)
    except asyncio.TimeoutError:
        outcome.error = "timeout"
    except (aiohttp.ClientError, ValueError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.latency_s = time.perf_counter() - started
    return outcome


async def _read_stream(response: aiohttp.ClientResponse, outcome: Outcome, started: float) -> None:
    done = False
    async for raw in response.content:  # read to the end: leaving early would cut the connection
        line = raw.decode("utf-8", "replace").strip()
        if done or not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            done = True
            continue
        event = json.loads(payload)
        if "error" in event:
            outcome.error = f"stream error: {(event['error'] or {}).get('message', event['error'])}"
            continue
        if outcome.ttft_s is None and any(_chunk_text(c) for c in event.get("choices") or []):
            outcome.ttft_s = time.perf_counter() - started
        if event.get("usage"):
            _read_usage(event["usage"], outcome)
    if not done and outcome.error is None:
        outcome.error = "stream ended without data: [DONE]"


def _chunk_text(choice: dict[str, Any]) -> str:
    """A chunk's generated text: a reasoning model's first tokens are its reasoning."""
    if "delta" in choice:
        delta = choice.get("delta") or {}
        return str(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls") or "")
    return str(choice.get("text") or "")


_FIRST_EVENTS = ("response.output_text.delta", "response.reasoning_text.delta",
                 "response.function_call_arguments.delta")
_LAST_EVENTS = ("response.completed", "response.incomplete", "response.failed")


async def _read_events(response: aiohttp.ClientResponse, outcome: Outcome, started: float) -> None:
    """A Responses API stream: the first token is the first text delta; usage and the end come with
    the last event (`response.failed` is the request's error)."""
    done = False
    async for raw in response.content:
        line = raw.decode("utf-8", "replace").strip()
        if done or not line.startswith("data:"):
            continue
        event = json.loads(line[len("data:"):].strip())
        kind = event.get("type")
        if outcome.ttft_s is None and kind in _FIRST_EVENTS:
            outcome.ttft_s = time.perf_counter() - started
        if kind in _LAST_EVENTS:
            done = True
            answer = event.get("response") or {}
            if kind == "response.failed":
                outcome.error = f"stream error: {(answer.get('error') or {}).get('message')}"
            elif answer.get("usage"):
                _read_usage(answer["usage"], outcome)
    if not done and outcome.error is None:
        outcome.error = "stream ended without response.completed"


def _read_whole(data: Any, outcome: Outcome) -> None:
    if not isinstance(data, dict) or not (data.get("choices") or data.get("output")):
        outcome.error = "answer has no choices"
        return
    if data.get("usage"):
        _read_usage(data["usage"], outcome)


def _read_usage(usage: dict[str, Any], outcome: Outcome) -> None:
    """Chat's and completions' usage, or a response's (input and output tokens)."""
    outcome.prompt_tokens = int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0)
    outcome.completion_tokens = int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)


def _error_message(raw: bytes, status: int) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace")[:200] or f"HTTP {status}"


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


# --- report -----------------------------------------------------------------------------------------
def summarise(plan: LoadPlan, outcomes: list[Outcome], elapsed_s: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    prompt = sum(o.prompt_tokens or 0 for o in ok)
    completion = sum(o.completion_tokens or 0 for o in ok)
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            errors[o.error_kind] = errors.get(o.error_kind, 0) + 1
    tpot = [
        (o.latency_s - o.ttft_s) / (o.completion_tokens - 1)
        for o in ok
        if o.ttft_s is not None and o.completion_tokens is not None and o.completion_tokens > 1
    ]
    return {
        "url": plan.url,
        "model": plan.model,
        "endpoint": plan.endpoint,
        "stream": plan.stream,
        "concurrency": plan.concurrency,
        "mix": [str(s) for s in plan.mix],
        "duration_s": elapsed_s,
        "requests": {
            "sent": len(outcomes),
            "ok": len(ok),
            "failed": len(outcomes) - len(ok),
            "without_usage": sum(1 for o in ok if o.completion_tokens is None),
        },
        "throughput": {
            "requests_per_s": len(ok) / elapsed_s if elapsed_s > 0 else 0.0,
            "output_tokens_per_s": completion / elapsed_s if elapsed_s > 0 else 0.0,
            "total_tokens_per_s": (prompt + completion) / elapsed_s if elapsed_s > 0 else 0.0,
        },
        "tokens": {"prompt": prompt, "completion": completion},
        "ttft_s": distribution([o.ttft_s for o in ok if o.ttft_s is not None]),
        "latency_s": distribution([o.latency_s for o in ok]),
        "tpot_s": distribution(tpot),
        "errors": dict(sorted(errors.items())),
        "error_examples": {
            k: next(o.error for o in outcomes if not o.ok and o.error_kind == k) for k in errors
        },
        "nodes": served_by(ok),
    }


def distribution(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    array = np.asarray(values, dtype=float)
    out = {"mean": float(array.mean())}
    out.update({f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES})
    out["max"] = float(array.max())
    return out


def served_by(ok: list[Outcome]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for o in ok:
        key = (o.node or "?", o.route or "?")
        group = groups.setdefault(
            key, {"node": key[0], "route": key[1], "requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        )
        group["requests"] += 1
        group["prompt_tokens"] += o.prompt_tokens or 0
        group["completion_tokens"] += o.completion_tokens or 0
    return sorted(groups.values(), key=lambda g: (-g["requests"], g["node"], g["route"]))


def format_report(report: dict[str, Any]) -> str:
    req, tp, tok = report["requests"], report["throughput"], report["tokens"]
    ok = max(req["ok"], 1)
    lines = [
        f"dsnode bench load  {report['url']}  model {report['model']}  {report['endpoint']}, "
        f"{'streamed' if report['stream'] else 'not streamed'}, concurrency {report['concurrency']}",
        f"mix          {', '.join(report['mix'])}  (prompt words : max tokens : weight)",
        f"requests     {req['sent']} sent, {req['ok']} ok, {req['failed']} failed "
        f"in {report['duration_s']:.2f} s",
        f"throughput   {tp['requests_per_s']:.2f} req/s   {tp['output_tokens_per_s']:.1f} output tok/s   "
        f"{tp['total_tokens_per_s']:.1f} total tok/s",
        f"tokens       prompt {tok['prompt']} (mean {tok['prompt'] / ok:.1f})   "
        f"completion {tok['completion']} (mean {tok['completion'] / ok:.1f})   from the server's usage",
        f"{'':12} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9}",
    ]
    for label, key in (("TTFT ms", "ttft_s"), ("latency ms", "latency_s"), ("TPOT ms", "tpot_s")):
        dist = report[key]
        if dist is None:
            lines.append(
                f"{label:12} {'-':>9}" + ("  (streamed requests only)" if key != "latency_s" else "")
            )
        else:
            lines.append(
                f"{label:12} "
                + " ".join(f"{dist[k] * 1000:9.1f}" for k in ("mean", "p50", "p90", "p99", "max"))
            )
    if report["errors"]:
        lines.append("errors       " + ", ".join(f"{k}: {v}" for k, v in report["errors"].items()))
        lines += [f"             {k}: {msg}" for k, msg in report["error_examples"].items()]
    else:
        lines.append("errors       none")
    lines.append(
        f"served by    {'NODE':16} {'ROUTE':10} {'REQUESTS':>8} {'PROMPT TOK':>10} {'OUTPUT TOK':>10}"
    )
    for group in report["nodes"]:
        lines.append(
            f"             {group['node']:16} {group['route']:10} {group['requests']:>8} "
            f"{group['prompt_tokens']:>10} {group['completion_tokens']:>10}"
        )
    return "\n".join(lines)


def format_progress(progress: Progress) -> str:
    elapsed = progress.elapsed_s
    if progress.target is not None:
        done = progress.ok + progress.failed
        head = f"[{done}/{progress.target}]"
    else:
        head = f"[{elapsed:.0f}/{progress.duration_s:.0f} s]"
    rate = progress.ok / elapsed if elapsed > 0 else 0.0
    return (
        f"{head} {elapsed:6.1f} s  in flight {progress.sent - progress.ok - progress.failed}  "
        f"ok {progress.ok}  failed {progress.failed}  {rate:.2f} req/s"
    )
