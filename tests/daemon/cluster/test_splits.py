"""A node's splits (`dsnode.cluster.splits`): choosing, the automatic rollback, an operator's
promote / rollback / reset, reloads, and what the cluster does not serve."""

from __future__ import annotations

from collections import Counter

import pytest
from dsnode.cluster.canary import Outcome
from dsnode.cluster.splits import SplitError, Splits, cluster_problems
from dsnode.versions import CanarySection, ServedVersion

MODEL = "deepseek-r1"
RULE = CanarySection(window=20, min_requests=10, error_rate_margin=0.1)
SPLIT = {MODEL: {"2026-11": 90, "2026-12": 10}}


def splits(rule: CanarySection = RULE) -> Splits:
    return Splits(SPLIT, rule)


def feed(s: Splits, version: str, n: int, errors: int = 0, start: float = 0.0) -> list:
    """n outcomes for `version`, the last `errors` of them errors; the decisions they brought."""
    out = []
    for i in range(n):
        decision = s.observe(MODEL, version, Outcome(start + i * 0.01, i >= n - errors, 0.1, 0.01), wall=1000.0 + i)
        if decision is not None:
            out.append(decision)
    return out


def test_a_choice_names_the_version_then_the_others_to_fail_over_to():
    s = splits()
    choices = [s.choose(MODEL, None) for _ in range(100)]
    assert Counter(c.version for c in choices) == {"2026-11": 90, "2026-12": 10}
    canary = next(c for c in choices if c.version == "2026-12")
    assert canary.order == ("2026-12", "2026-11") and canary.baseline == "2026-11" and not canary.sticky
    sticky = s.choose(MODEL, "alice")
    assert sticky.sticky and all(s.choose(MODEL, "alice").version == sticky.version for _ in range(20))
    assert s.choose("another-model", None) is None


def test_a_failing_canary_is_rolled_back_once_both_have_min_requests():
    s = splits()
    assert feed(s, "2026-12", 10, errors=3) == []  # the baseline has no outcome yet: no verdict
    feed(s, "2026-11", 10)
    [decision] = feed(s, "2026-12", 1)
    assert (decision.action, decision.by, decision.version, decision.baseline) == (
        "rolled_back", "automatic", "2026-12", "2026-11")
    assert decision.canary.requests == 11 and decision.canary.errors == 3
    assert decision.baseline_figures.requests == 10 and decision.baseline_figures.errors == 0
    assert decision.reasons == ("error rate 27.3% > baseline 0.0% + margin 10.0%",)
    split = s.models[MODEL]
    assert split.shares == {"2026-11": 100, "2026-12": 0}
    assert {s.choose(MODEL, None).version for _ in range(50)} == {"2026-11"}
    assert feed(s, "2026-12", 30, errors=30) == []  # once: it stays rolled back
    assert s.rollbacks == {(MODEL, "2026-12"): 1}
    state = split.state(now=1.0)
    assert [(v["version"], v["share"], v["configured_share"], v["state"]) for v in state["versions"]] == [
        ("2026-11", 100, 90, "baseline"), ("2026-12", 0, 10, "rolled_back")]


def test_a_healthy_canary_stays_and_a_disabled_rule_only_watches():
    s = splits()
    feed(s, "2026-11", 20, errors=1)
    assert feed(s, "2026-12", 20, errors=2) == []  # 10% vs 5%: within the margin
    watching = splits(RULE.model_copy(update={"enabled": False}))
    feed(watching, "2026-11", 20)
    assert feed(watching, "2026-12", 20, errors=20) == []
    assert watching.models[MODEL].shares == {"2026-11": 90, "2026-12": 10}


def test_baseline_errors_are_no_verdict_on_the_canary():
    s = splits()
    feed(s, "2026-12", 10)
    assert feed(s, "2026-11", 20, errors=20) == []


def test_an_operator_promotes_rolls_back_and_resets():
    s = splits()
    split = s.models[MODEL]
    promoted = split.promote(None, wall=5.0)  # the only canary
    assert (promoted.action, promoted.version, promoted.by) == ("promoted", "2026-12", "operator")
    assert split.shares == {"2026-11": 0, "2026-12": 100} and split.baseline == "2026-12"
    with pytest.raises(SplitError, match="is the baseline"):
        split.roll_back("2026-12", wall=6.0, now=1.0)
    split.reset()
    assert split.shares == {"2026-11": 90, "2026-12": 10} and split.decisions == {}
    rolled = split.roll_back("2026-12", wall=7.0, now=1.0)
    assert (rolled.action, rolled.by, split.shares["2026-12"]) == ("rolled_back", "operator", 0)
    with pytest.raises(SplitError, match="was rolled back"):
        split.promote("2026-12", wall=8.0)
    with pytest.raises(SplitError, match="has no version 2027-01"):
        split.promote("2027-01", wall=8.0)
    with pytest.raises(SplitError, match="no split for model `other`"):
        s.split_of("other")
    assert s.rollbacks == {}  # automatic rollbacks only


def test_a_reload_keeps_the_state_of_an_unchanged_split_and_restarts_a_changed_one():
    s = splits()
    feed(s, "2026-11", 10)
    feed(s, "2026-12", 10, errors=10)
    assert s.models[MODEL].shares["2026-12"] == 0
    assert s.configure(SPLIT, RULE) == []
    assert s.models[MODEL].shares["2026-12"] == 0  # an unrelated reload does not bring it back
    assert s.configure({MODEL: {"2026-11": 80, "2026-12": 20}}, RULE) == [MODEL]
    assert s.models[MODEL].shares == {"2026-11": 80, "2026-12": 20} and s.models[MODEL].decisions == {}
    assert s.configure({}, RULE) == [] and s.models == {}
    assert s.rollbacks == {(MODEL, "2026-12"): 1}  # the counter outlives the split


def test_the_first_of_equal_shares_is_the_baseline():
    s = Splits({MODEL: {"b": 50, "a": 50}}, RULE)
    assert s.models[MODEL].baseline == "b"


def test_cluster_problems_name_models_and_versions_no_node_serves():
    served = {MODEL: [ServedVersion("3865e12a1eb7", "2026-11"), ServedVersion("0a1b2c3d4e5f", None)],
              "other": []}
    split = {MODEL: {"2026-11": 50, "0a1b2c3d4e5f": 40, "2027-01": 10}, "nobody": {"x": 100}}
    assert cluster_problems(split, served) == [
        (MODEL, f"routing.split.{MODEL}.2027-01",
         f"no node serves version 2027-01 of `{MODEL}` (versions served: 0a1b2c3d4e5f, 3865e12a1eb7 (2026-11))"),
        ("nobody", "routing.split.nobody", f"no node serves a model `nobody` (models served: {MODEL}, other)"),
    ]
