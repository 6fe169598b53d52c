"""Fixtures shared by the tests of `dsnode` itself."""

from __future__ import annotations

import logging

import pytest
import structlog


@pytest.fixture
def restore_logging():
    """Logging as it was before the test: structlog's defaults, the root logger's handlers and level,
    and the aiohttp and asyncio loggers' handlers."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libraries = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
                 for name in ("aiohttp", "asyncio")}  # configure_logging routes these itself
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, (kept, propagate) in libraries.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = kept
        logger.propagate = propagate
