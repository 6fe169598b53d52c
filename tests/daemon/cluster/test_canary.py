"""The canary rule (`dsnode.cluster.canary`): windows, percentiles and the verdict."""

from __future__ import annotations

from dsnode.cluster.canary import Figures, Outcome, Window, judge, p95
from dsnode.versions import CanarySection

RULE = CanarySection(window=50, min_requests=20, error_rate_margin=0.05, ttft_p95_margin=0.5,
                     tpot_p95_margin=0.5, min_ttft_difference_s=0.05, min_tpot_difference_s=0.005)


def figures(requests: int = 100, errors: int = 0, ttft: float | None = 0.2, tpot: float | None = 0.02) -> Figures:
    return Figures(requests, errors, errors / requests if requests else 0.0, ttft, tpot)


def test_p95_is_the_nearest_rank():
    assert p95([]) is None
    assert p95([3.0]) == 3.0
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    assert p95([float(i) for i in range(1, 21)]) == 19.0


def test_no_verdict_before_both_versions_have_min_requests():
    assert judge(figures(), figures(requests=19, errors=19), RULE) is None
    assert judge(figures(requests=19), figures(requests=20, errors=20), RULE) is None
    assert judge(figures(), figures(requests=20, errors=20), RULE) != ()


def test_a_canary_as_good_as_the_baseline_is_healthy():
    assert judge(figures(errors=2), figures(errors=6), RULE) == ()  # 6% vs 2%: within the 5 points
    assert judge(figures(ttft=0.2), figures(ttft=0.29), RULE) == ()  # within 50%
    assert judge(figures(ttft=0.01), figures(ttft=0.05), RULE) == ()  # 5x, but only 40 ms: noise


def test_each_margin_trips_on_its_own():
    assert judge(figures(errors=2), figures(errors=8), RULE) == ("error rate 8.0% > baseline 2.0% + margin 5.0%",)
    assert judge(figures(ttft=0.2), figures(ttft=0.4), RULE) == ("TTFT p95 0.400s > baseline 0.200s × 1.5",)
    assert judge(figures(tpot=0.02), figures(tpot=0.05), RULE) == (
        "time per output token p95 0.050s > baseline 0.020s × 1.5",)
    worse = judge(figures(), figures(errors=50, ttft=1.0, tpot=0.1), RULE)
    assert worse is not None and len(worse) == 3


def test_a_zero_margin_rolls_back_on_any_error_more_than_the_baseline():
    strict = RULE.model_copy(update={"error_rate_margin": 0.0})
    assert judge(figures(errors=0), figures(errors=0), strict) == ()
    assert judge(figures(errors=0), figures(errors=1), strict) == ("error rate 1.0% > baseline 0.0% + margin 0.0%",)


def test_a_window_keeps_the_latest_outcomes_of_the_last_window_seconds():
    window = Window(4)
    for i in range(6):
        window.add(Outcome(at=float(i), error=i < 3, ttft_s=0.1 * i, tpot_s=None))
    figures_now = window.figures(now=5.0, max_age_s=100.0)
    assert (figures_now.requests, figures_now.errors) == (4, 1)  # outcomes 2..5
    assert figures_now.ttft_p95_s == 0.5  # errors have no latency to count
    recent = window.figures(now=5.0, max_age_s=1.5)
    assert (recent.requests, recent.errors, recent.error_rate) == (2, 0, 0.0)  # outcomes 4 and 5
    assert Window(3).figures(0.0, 10.0) == Figures(0, 0, 0.0, None, None)
