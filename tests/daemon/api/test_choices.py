"""n choices: all admitted together, the first error raised only when none is left running, every
stream closed whatever happens (the engine frees a sequence when its stream is closed)."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack, aclosing

import pytest
from dsnode.api.choices import choice_params, first_deltas, merged
from dsnode.inference.engine import ContextLengthExceeded, Delta, EngineError, SamplingParams


class Stream:
    """A stand-in for `Engine.generate`: deltas with a pause between, an error at admission or after
    `fail_after` deltas; remembers whether it was closed before its end."""

    def __init__(self, n: int, fail_at_admission: bool = False, fail_after: int | None = None, pause: float = 0.0):
        self.n, self.fail_at_admission, self.fail_after, self.pause = n, fail_at_admission, fail_after, pause
        self.admitted = self.aborted = False

    async def run(self):
        if self.fail_at_admission:
            raise ContextLengthExceeded(10, 10, 5)
        self.admitted, finished = True, False
        try:
            for i in range(self.n):
                await asyncio.sleep(self.pause)
                if self.fail_after is not None and i == self.fail_after:
                    finished = True
                    raise EngineError("the model failed")
                last = i == self.n - 1
                finished = last
                yield Delta(str(i), (i,), 3, i + 1, "length" if last else None)
        finally:
            self.aborted = not finished


async def serve(streams: list[Stream]) -> list[tuple[int, str]]:
    gens = [s.run() for s in streams]
    async with AsyncExitStack() as stack:
        for gen in gens:
            await stack.enter_async_context(aclosing(gen))
        firsts = await first_deltas(gens)
        async with aclosing(merged(gens, firsts)) as deltas:
            return [(i, d.text) async for i, d in deltas]


async def test_every_choice_runs_to_its_end_interleaved():
    streams = [Stream(3, pause=0.001), Stream(2, pause=0.002), Stream(4)]
    out = await serve(streams)
    assert sorted(out) == sorted([(0, "0"), (0, "1"), (0, "2"), (1, "0"), (1, "1"), (2, "0"), (2, "1"), (2, "2"),
                                  (2, "3")])
    assert [text for i, text in out if i == 0] == ["0", "1", "2"]  # each choice in order
    assert not any(s.aborted for s in streams)


async def test_an_admission_error_closes_the_choices_already_admitted():
    streams = [Stream(5, pause=0.01), Stream(5, fail_at_admission=True), Stream(5, pause=0.01)]
    with pytest.raises(ContextLengthExceeded):
        await serve(streams)
    assert streams[0].admitted and streams[2].admitted  # admitted together, then freed
    assert streams[0].aborted and streams[2].aborted


async def test_a_choice_failing_mid_way_ends_the_answer_and_frees_the_others():
    streams = [Stream(50, pause=0.005), Stream(50, fail_after=3, pause=0.001), Stream(50, pause=0.005)]
    with pytest.raises(EngineError):
        await serve(streams)
    assert streams[0].aborted and streams[2].aborted


async def test_a_cancelled_request_frees_every_choice():
    streams = [Stream(1000, pause=0.01) for _ in range(3)]
    task = asyncio.ensure_future(serve(streams))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(s.aborted for s in streams)


def test_a_seed_gives_each_choice_its_own():
    params = SamplingParams(max_tokens=1, seed=40)
    assert [choice_params(params, i).seed for i in range(3)] == [40, 41, 42]
    assert choice_params(SamplingParams(max_tokens=1), 2).seed is None
