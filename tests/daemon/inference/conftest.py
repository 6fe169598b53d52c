"""The fast tier's fixtures for the inference core: a trained tokenizer and loaded fake engines."""

from __future__ import annotations

from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from tests.support.engines import FakeEngine
from tests.support.tokenizer import fast_tokenizer, fast_tokenizer_dir  # noqa: F401 - session fixtures

MakeEngine = Callable[..., Awaitable[FakeEngine]]


@pytest.fixture
async def make_engine(fast_tokenizer) -> AsyncIterator[MakeEngine]:  # noqa: F811 - the fixture above
    """`await make_engine(**FakeEngine options)`: a loaded FakeEngine, closed when the test ends."""
    engines: list[FakeEngine] = []

    async def make(**options: Any) -> FakeEngine:
        engine = FakeEngine(fast_tokenizer, **options)
        engines.append(engine)
        await engine.load()
        return engine

    yield make
    for engine in engines:
        await engine.close()
