"""The JSON-lines path of `dsnode.logs`: the same lines structlog's stock processors write, each
written with one call (docs/performance.md)."""

from __future__ import annotations

import datetime
import io
import json
import logging
import re
from pathlib import Path

import structlog
from dsnode.logs import LineWriter, configure_logging, iso_utc


class Custom:
    def __structlog__(self) -> str:
        return "custom"


def emit() -> None:
    log = structlog.get_logger("dsnode.test")
    log.info("request", request_id="r-1", ttft_ms=1.25, ok=True, none=None, text='héllo "q"\n\t',
             items=[1, 2.5, "a"], nested={"k": {"z": 1}}, path=Path("/x"), obj=Custom(), big=1e20)
    log.warning("unusual", n=3)
    try:
        raise ValueError("bad weights")
    except ValueError:
        log.exception("model_load_failed", model="m")
    log.info("with_stack", stack_info=True)
    log.error("no_exc", exc_info=False)
    structlog.contextvars.bind_contextvars(rank=3)
    log.info("bound")
    structlog.contextvars.clear_contextvars()


def stock(out: io.StringIO) -> None:
    """structlog's own processors, as dsnode configured them before."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def ours(out: io.StringIO) -> None:
    configure_logging("debug", "json", stream=out)


def lines_of(configure) -> str:  # type: ignore[no-untyped-def]
    out = io.StringIO()
    configure(out)
    emit()
    return out.getvalue()


def comparable(text: str) -> str:
    text = re.sub(r'"timestamp": "[^"]+"', '"timestamp": T', text)
    return re.sub(r"line \d+", "line N", text)


def test_json_lines_are_byte_for_byte_structlogs_own(restore_logging):
    text, expected = (lines_of(configure) for configure in (ours, stock))  # one call site: same stacks
    assert comparable(text) == comparable(expected)
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["event"] == "request" and list(lines[0])[-3:] == ["event", "level", "timestamp"]
    assert lines[2]["exception"].startswith("Traceback") and lines[5]["rank"] == 3
    stack = lines[3]["stack"]
    assert "emit" in stack and "dsnode/logs.py" not in stack  # the stack starts at the caller


def test_timestamps_read_as_datetime_isoformat_writes_them():
    for ns in (0, 1_795_873_827_000_000_000, 1_795_873_827_500_000_000, 1_795_873_827_000_001_999,
               1_795_873_827_999_999_999, 1_795_873_828_123_456_000):
        micro = ns // 1000
        expected = datetime.datetime.fromtimestamp(micro // 1_000_000, tz=datetime.timezone.utc).replace(
            microsecond=micro % 1_000_000).isoformat().replace("+00:00", "Z")
        assert iso_utc(ns) == expected


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_each_line_is_one_write():
    out = CountingStream()
    writer = LineWriter(out)
    writer.msg('{"event": "a"}')
    writer.info('{"event": "b"}')
    assert out.writes == 2 and out.getvalue() == '{"event": "a"}\n{"event": "b"}\n'
