"""`[debug]`: settings for testing dsnode itself, never for production (docs/versions.md).

    [debug]
    inject_errors = 0.3     # this share of the requests served here fail with an injected engine
                            # error (500 engine_error) before their first token: a canary that
                            # misbehaves on purpose, to see it rolled back

Applied on reload. Every injected failure is logged (the request's record says `injected fault`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

INJECTED = "injected fault ([debug] inject_errors)"


class DebugSection(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    inject_errors: Annotated[float, Field(ge=0, lt=1)] = 0.0  # share of local requests failed on purpose


class InjectedFaults:
    """Which requests fail: exactly `ratio` of them, spread evenly (at 0.3, 3 of every 10), so a test
    knows how many errors a number of requests brings."""

    def __init__(self) -> None:
        self.seen = 0

    def next_fails(self, ratio: float) -> bool:
        if ratio <= 0:
            return False
        self.seen += 1
        return int(self.seen * ratio) != int((self.seen - 1) * ratio)
