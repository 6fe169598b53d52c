"""Structured logs (structlog): events with fields, one record each.

`json` writes JSON lines (what a log shipper or `jq` wants), `console` a readable line for a terminal,
`journal` sends each event to journald with its fields (`DSNODE_REQUEST_ID`, `DSNODE_ROUTE`…, see
`dsnode.journal`). `auto` picks journal when stdout is systemd's journal stream (`$JOURNAL_STREAM`
names it), console on a TTY, JSON otherwise.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

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
    logger_factory: Any = structlog.PrintLoggerFactory(out)
    sender: JournalSender | None = None
    if fmt == "journal":  # the journal stamps entries itself
        sender = JournalSender(journal_socket)
        logger_factory = JournalLoggerFactory(sender, out)
        tail: list[Any] = [JournalRenderer()]
    elif fmt == "console":
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
        tail = [structlog.dev.ConsoleRenderer(colors=out.isatty())]
    else:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
        tail = [structlog.processors.JSONRenderer(sort_keys=False)]
    structlog.configure(
        processors=[
            *processors,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=logger_factory,
        cache_logger_on_first_use=False,
    )
    _quiet_libraries(sender)
    return fmt


_our_handler: list[logging.Handler] = []  # the root handler configure_logging installed, if any


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
