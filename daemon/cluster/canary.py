"""Is a canary worse than its baseline? Figures over a sliding window of each version's requests,
and the verdict from `[routing.canary]`'s margins. Pure logic: no I/O, time passed in.

A request's **outcome** for its version: an error (an answer 500/502/504, an engine error, a stream
that ended in an error event — never a 4xx, nor a 503/429 that says "busy" or "draining"), its time
to first token, and its time per output token (the mean gap between its tokens after the first).
A version's **window** holds its latest `window` outcomes of the last `window_seconds`.

The **rule**: once the canary and the baseline each have `min_requests` outcomes in their windows,
the canary is rolled back when any of these holds:
- error rate: canary > baseline + `error_rate_margin` (absolute: 0.05 is 5 percentage points);
- TTFT p95: canary > baseline × (1 + `ttft_p95_margin`), and by more than `min_ttft_difference_s`;
- TPOT p95: canary > baseline × (1 + `tpot_p95_margin`), and by more than `min_tpot_difference_s`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from ..versions import CanarySection


@dataclass(frozen=True)
class Outcome:
    at: float  # monotonic seconds when the request ended
    error: bool
    ttft_s: float | None = None  # None: no token came
    tpot_s: float | None = None  # None: fewer than two tokens


@dataclass(frozen=True)
class Figures:
    requests: int
    errors: int
    error_rate: float
    ttft_p95_s: float | None
    tpot_p95_s: float | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class Window:
    """The latest outcomes of one version."""

    def __init__(self, size: int) -> None:
        self.outcomes: deque[Outcome] = deque(maxlen=size)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def figures(self, now: float, max_age_s: float) -> Figures:
        recent = [o for o in self.outcomes if now - o.at <= max_age_s]
        errors = sum(o.error for o in recent)
        return Figures(
            requests=len(recent),
            errors=errors,
            error_rate=errors / len(recent) if recent else 0.0,
            ttft_p95_s=p95([o.ttft_s for o in recent if o.ttft_s is not None and not o.error]),
            tpot_p95_s=p95([o.tpot_s for o in recent if o.tpot_s is not None and not o.error]),
        )


def p95(values: Sequence[float]) -> float | None:
    """Nearest-rank 95th percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def judge(baseline: Figures, canary: Figures, rule: CanarySection) -> tuple[str, ...] | None:
    """Why the canary is worse than the baseline (empty: it is not); None before `min_requests`."""
    if canary.requests < rule.min_requests or baseline.requests < rule.min_requests:
        return None
    reasons = []
    if canary.error_rate > baseline.error_rate + rule.error_rate_margin:
        reasons.append(f"error rate {canary.error_rate:.1%} > baseline {baseline.error_rate:.1%} "
                       f"+ margin {rule.error_rate_margin:.1%}")
    ttft = _slower("TTFT p95", canary.ttft_p95_s, baseline.ttft_p95_s, rule.ttft_p95_margin,
                   rule.min_ttft_difference_s)
    tpot = _slower("time per output token p95", canary.tpot_p95_s, baseline.tpot_p95_s, rule.tpot_p95_margin,
                   rule.min_tpot_difference_s)
    return tuple(reasons + [r for r in (ttft, tpot) if r])


def _slower(what: str, canary: float | None, baseline: float | None, margin: float, slack: float) -> str | None:
    if canary is None or baseline is None:
        return None
    if canary > baseline * (1 + margin) and canary - baseline > slack:
        return f"{what} {canary:.3f}s > baseline {baseline:.3f}s × {1 + margin:g}"
    return None
