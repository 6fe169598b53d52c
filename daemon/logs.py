"""Structured logs (structlog): events with fields, one record each.

`json` writes JSON lines (what a log shipper or `jq` wants), `console` a readable line for a terminal,
`journal` sends each event to journald with its fields (`DSNODE_REQUEST_ID`, `DSNODE_ROUTE`…, see
`dsnode.journal`). `auto` picks journal when stdout is systemd's journal stream (`$JOURNAL_STREAM`
names it), console on a TTY, JSON otherwise.

Every request logs one event, so the JSON path is kept cheap (docs/performance.md): the timestamp and
the encoder are built once, not per event, and each line is one write(2) — structlog's `PrintLogger`
prints the text and the newline separately, which under PYTHONUNBUFFERED=1 (the systemd unit sets it)
is two system calls per line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import traceback
from typing import Any, Callable, MutableMapping, TextIO

import structlog

from .journal import (
    JOURNAL_SOCKET,
    JournalHandler,
    JournalLoggerFactory,
    JournalRenderer,
    JournalSender,
    stream_is_journal,
)

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def resolve_format(fmt: str, out: TextIO, journal_stream: str | None = None) -> str:
    """`auto` → the concrete format for this output."""
    if fmt != "auto":
        return fmt
    if stream_is_journal(journal_stream, out):
        return "journal"
    return "console" if out.isatty() else "json"


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    journal_stream: str | None = None,
    journal_socket: str = JOURNAL_SOCKET,
) -> str:
    """Set up structlog (and the stdlib root logger); returns the format chosen.

    `journal_stream` is `$JOURNAL_STREAM` as the entry point read it; `journal_socket` is where
    journald listens (tests point it elsewhere)."""
    out = stream or sys.stdout
    fmt = resolve_format(fmt, out, journal_stream)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    logger_factory: Any = LineWriterFactory(out)
    sender: JournalSender | None = None
    if fmt == "journal":  # the journal stamps entries itself
        sender = JournalSender(journal_socket)
        logger_factory = JournalLoggerFactory(sender, out)
        processors += [format_exc_and_stack, JournalRenderer()]
    elif fmt == "console":
        processors += [add_timestamp, format_exc_and_stack, structlog.dev.ConsoleRenderer(colors=out.isatty())]
    else:
        processors.append(render_json_line)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=logger_factory,
        cache_logger_on_first_use=False,
    )
    _quiet_libraries(sender)
    return fmt


# --- the JSON-lines path ---------------------------------------------------------------------------
def add_timestamp(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """`timestamp`, as structlog's `TimeStamper(fmt="iso", utc=True)` writes it
    (`2026-11-28T15:28:41.971385Z`), with the date and time formatted once per second, not per event."""
    event_dict["timestamp"] = iso_utc(time.time_ns())
    return event_dict


_second: list[Any] = [None, ""]  # [the last whole second formatted, its text]


def iso_utc(now_ns: int) -> str:
    second, micro = divmod(now_ns // 1000, 1_000_000)
    cached = _second
    if cached[0] != second:
        cached[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        cached[0] = second
    # like datetime.isoformat(): no fraction at all when it is zero
    return f"{cached[1]}.{micro:06d}Z" if micro else f"{cached[1]}Z"


_render_stack = structlog.processors.StackInfoRenderer(additional_ignores=[__name__])  # our frames aren't the caller


def format_exc_and_stack(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog's `StackInfoRenderer()` then `format_exc_info`, run only for the events that ask for
    them (`exc_info`, `stack_info`): the others skip two calls."""
    if "exc_info" in event_dict or "stack_info" in event_dict:
        event_dict = _render_stack(logger, method_name, event_dict)
        event_dict = structlog.processors.format_exc_info(logger, method_name, event_dict)
    return event_dict


def _json_fallback(obj: Any) -> Any:
    """What structlog's JSONRenderer does with a value JSON can't hold."""
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


def _make_encode() -> Callable[[Any], str]:
    """`json.dumps(obj, default=_json_fallback)`, same text. `json.dumps` with any keyword builds a
    JSONEncoder, and `JSONEncoder.encode` a C encoder, on every call; this C encoder is built once.
    (Without a circular-reference check: a log event that holds itself fails with RecursionError
    rather than ValueError.)"""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator in this Python
        return json.JSONEncoder(default=_json_fallback).encode
    c_encode = make(None, _json_fallback, json.encoder.encode_basestring_ascii, None, ": ", ", ",
                    False, False, True)
    return lambda obj: "".join(c_encode(obj, 0))


_encode = _make_encode()


def render_json_line(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
    """The `json` format's processors after the level, in one: `timestamp`, then the stack and the
    traceback when asked for, then the JSON text — what structlog's `TimeStamper(fmt="iso",
    utc=True)`, `StackInfoRenderer()`, `format_exc_info` and `JSONRenderer()` make, key order included."""
    event_dict["timestamp"] = iso_utc(time.time_ns())
    if "exc_info" in event_dict or "stack_info" in event_dict:
        event_dict = format_exc_and_stack(logger, method_name, event_dict)
    return _encode(event_dict)


class LineWriter:
    """The structlog logger of the `json` and `console` formats: each event is one write of the whole
    line, then a flush, under a lock (engine threads log too)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        line = message + "\n"
        with self._lock:
            self.out.write(line)
            self.out.flush()

    debug = info = warning = warn = error = critical = exception = fatal = failure = err = log = msg


class LineWriterFactory:
    """One shared `LineWriter` (structlog asks the factory on every call of a module-level logger)."""

    def __init__(self, out: TextIO) -> None:
        self._logger = LineWriter(out)

    def __call__(self, *args: Any) -> LineWriter:
        return self._logger


# --- other libraries' logs --------------------------------------------------------------------------
# Header values that are credentials, wherever a library quotes a request (`name: value`, `name=value`)
_SECRET_HEADER = re.compile(r"(?i)\b(authorization|proxy-authorization|x-dsnode-peer|cookie|set-cookie)"
                            r"(\s*[:=]\s*)([^\r\n'\"\\]*)")
_BEARER = re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s'\"\\]+")
REDACTED = "<redacted>"


def redact(text: str) -> str:
    """`text` with the values of credential headers (Authorization, X-DSNode-Peer, cookies) and
    bearer tokens replaced by `<redacted>`."""
    text = _SECRET_HEADER.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
    return _BEARER.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)


class LibraryBridge(logging.Handler):
    """aiohttp's and asyncio's own log records, as structured events (`library_log`, one line each,
    through the same output as every other event) with credentials redacted: a library that quotes
    a request it refused (aiohttp quotes the header line) must not put a key in the log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name, "message": redact(record.getMessage())[:2000]}
            if record.exc_info and record.exc_info[1] is not None:
                fields["error"] = exception_text(record.exc_info[1])[-4000:]
            structlog.get_logger(record.name).log(record.levelno, "library_log", **fields)
        except Exception:
            self.handleError(record)


class RedactCredentials(logging.Filter):
    """The same for the journal's handler of stdlib records: the record's message and exception
    rewritten, redacted, before the handler formats them."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = redact(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            text += "\n" + exception_text(record.exc_info[1])
        record.msg, record.args, record.exc_info, record.exc_text = text, None, None, None
        return True


# an excerpt of the request that an HTTP parser error quotes (`...: b'...'`, `b'...'`), and what follows
_QUOTED = re.compile(r"""\s*:\s*b?['"].*|\s*\bb['"].*""", re.S)


def describe_http_error(exc: BaseException) -> str:
    """What an HTTP parser error (aiohttp's `HttpProcessingError`) says was wrong, without any of the
    request it quotes: the first line of its message, quoted bytes cut off."""
    limit = getattr(exc, "args", ())[1:2] if type(exc).__name__ == "LineTooLong" else ()
    if limit:
        return f"a request line or header is longer than {limit[0]} bytes"
    message = getattr(exc, "message", None)
    text = message if isinstance(message, str) and message else str(exc)
    first = _QUOTED.sub("", text.split("\n", 1)[0]).strip().rstrip(":.")
    return redact(first)[:200] or type(exc).__name__


def exception_text(exc: BaseException) -> str:
    """An exception for a log: its traceback, redacted; only a summary when an HTTP parser error is in
    its chain (such an error quotes the request, and a continuation line carries no header name)."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    parser_errors = [e for e in chain if _is_http_parser_error(e)]
    if parser_errors:
        return f"{type(exc).__name__}: {describe_http_error(parser_errors[-1])}"
    return redact("".join(traceback.format_exception(exc)))


def _is_http_parser_error(exc: BaseException) -> bool:
    return any(c.__name__ == "HttpProcessingError" and c.__module__.startswith("aiohttp") for c in type(exc).__mro__)


LIBRARY_LOGGERS = ("aiohttp", "asyncio")
_our_handler: list[logging.Handler] = []  # the root handler configure_logging installed, if any
_our_bridge: list[logging.Handler] = []


def _quiet_libraries(sender: JournalSender | None) -> None:
    """Third-party stdlib logging goes to stderr (or the journal) at WARNING, so it never floods
    the request log."""
    root = logging.getLogger()
    while _our_handler:
        root.removeHandler(_our_handler.pop())
    handler: logging.Handler | None = None
    if sender is not None:
        handler = JournalHandler(sender)
    elif not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if handler is not None:
        root.addHandler(handler)
        _our_handler.append(handler)
    root.setLevel(logging.WARNING)
    for noisy in ("aiohttp.access", "DeepSpeed", "transformers", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _no_progress_bars()
    _bridge_libraries(sender)


def _no_progress_bars() -> None:
    """Progress bars are for terminals; in a node's log they are lines that aren't events (transformers'
    `Loading weights: 0%|…` while a checkpoint loads). huggingface_hub's switch turns off its own bars
    and, read when transformers is imported, transformers' too; an already imported transformers is
    told directly."""
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ModuleNotFoundError:
        return
    disable_progress_bars()
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:
        transformers_logging.disable_progress_bar()


def _bridge_libraries(sender: JournalSender | None) -> None:
    """aiohttp and asyncio log with credentials redacted: through structlog (`LibraryBridge`), or to
    the journal as other libraries do (with `RedactCredentials`), never through the plain root handler."""
    while _our_bridge:
        old = _our_bridge.pop()
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).removeHandler(old)
    bridge: logging.Handler = LibraryBridge(logging.WARNING)
    if sender is not None:
        bridge = JournalHandler(sender)
        bridge.addFilter(RedactCredentials())
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(bridge)
        logger.propagate = False
    _our_bridge.append(bridge)
