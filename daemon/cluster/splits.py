"""A node's splits (`[routing.split]`): per model, the shares configured and the shares in force,
each version's window of outcomes, and the decisions taken (a canary rolled back, a version
promoted). Pure state, no I/O: the caller passes the time, logs the events and counts the metrics
(`dsnode.api.versioning`).

The **baseline** of a split is the version with the largest share in force (the first listed, on a
tie); every other version with a share is a **canary**, judged against the baseline
(`dsnode.cluster.canary`). A rollback moves the canary's share to the baseline, at once; a promotion
gives one version 100%. Either stays until an operator resets the split, or a reload changes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from ..versions import CanarySection, ServedVersion, SplitTable
from .canary import Figures, Outcome, Window, judge
from .split import RoundRobin, sticky_pick


class SplitError(Exception):
    """An operator's command that does not apply; the message says why."""


@dataclass(frozen=True)
class Choice:
    model: str
    version: str  # the split's key: a version id or label
    sticky: bool
    order: tuple[str, ...]  # `version`, then every other version in force, largest share first
    baseline: str


@dataclass(frozen=True)
class Decision:
    model: str
    version: str
    action: Literal["rolled_back", "promoted"]
    by: Literal["automatic", "operator"]
    at: float  # wall-clock time
    baseline: str
    reasons: tuple[str, ...] = ()
    canary: Figures | None = None
    baseline_figures: Figures | None = None

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "action": self.action, "by": self.by, "at": self.at,
                "baseline": self.baseline, "reasons": list(self.reasons),
                "canary": self.canary.as_json() if self.canary else None,
                "baseline_figures": self.baseline_figures.as_json() if self.baseline_figures else None}


class ModelSplit:
    def __init__(self, model: str, shares: Mapping[str, int], rule: CanarySection) -> None:
        self.model = model
        self.rule = rule
        self.configured = tuple(shares.items())
        self.windows = {key: Window(rule.window) for key in shares}
        self.decisions: dict[str, Decision] = {}
        self._apply(dict(self.configured))

    def _apply(self, shares: dict[str, int]) -> None:
        self.shares = shares
        self._rotation = RoundRobin(tuple(shares.items()))

    @property
    def baseline(self) -> str:
        return max(self.shares.items(), key=lambda item: item[1])[0]  # max keeps the first of a tie

    def choose(self, user: str | None) -> Choice:
        shares = tuple(self.shares.items())
        version = sticky_pick(shares, self.model, user) if user else self._rotation.pick()
        assert version is not None  # the shares in force always sum to 100
        others = sorted((k for k, s in shares if s > 0 and k != version), key=lambda k: -self.shares[k])
        return Choice(self.model, version, bool(user), (version, *others), self.baseline)

    def observe(self, key: str, outcome: Outcome, wall: float) -> Decision | None:
        """Count an outcome; returns the rollback it brings, if it brings one."""
        window = self.windows.get(key)
        if window is None:
            return None
        window.add(outcome)
        baseline = self.baseline
        if not self.rule.enabled or key == baseline or not self.shares[key] or key in self.decisions:
            return None
        canary = window.figures(outcome.at, self.rule.window_seconds)
        base = self.windows[baseline].figures(outcome.at, self.rule.window_seconds)
        reasons = judge(base, canary, self.rule)
        if not reasons:
            return None
        return self._roll_back(key, "automatic", wall, reasons, canary, base)

    def roll_back(self, key: str | None, wall: float, now: float) -> Decision:
        key = self._canary(key, "roll back")
        base = self.windows[self.baseline].figures(now, self.rule.window_seconds)
        canary = self.windows[key].figures(now, self.rule.window_seconds)
        return self._roll_back(key, "operator", wall, ("rolled back by an operator",), canary, base)

    def _roll_back(self, key: str, by: Literal["automatic", "operator"], wall: float, reasons: tuple[str, ...],
                   canary: Figures, base: Figures) -> Decision:
        baseline = self.baseline
        shares = dict(self.shares)
        shares[baseline] += shares[key]
        shares[key] = 0
        self._apply(shares)
        decision = Decision(self.model, key, "rolled_back", by, wall, baseline, reasons, canary, base)
        self.decisions[key] = decision
        return decision

    def promote(self, key: str | None, wall: float) -> Decision:
        key = self._canary(key, "promote")
        baseline = self.baseline
        self._apply({k: 100 if k == key else 0 for k in self.shares})
        decision = Decision(self.model, key, "promoted", "operator", wall, baseline)
        self.decisions[key] = decision
        return decision

    def reset(self) -> None:
        """The configured shares again, fresh windows, no decisions."""
        self.decisions.clear()
        self.windows = {key: Window(self.rule.window) for key in self.windows}
        self._apply(dict(self.configured))

    def _canary(self, key: str | None, verb: str) -> str:
        """The canary an operator's command names (or the only one there is)."""
        baseline = self.baseline
        if key is None:
            canaries = [k for k, s in self.shares.items() if s > 0 and k != baseline]
            if len(canaries) != 1:
                raise SplitError(f"`{self.model}` has {len(canaries)} canaries in force "
                                 f"({', '.join(canaries) or 'none'}): name the version to {verb}")
            key = canaries[0]
        if key not in self.shares:
            raise SplitError(f"the split of `{self.model}` has no version {key} (it has {', '.join(self.shares)})")
        if key == baseline:
            raise SplitError(f"{key} is the baseline of `{self.model}` (it has {self.shares[key]}%); "
                             "nothing to " + verb)
        if key in self.decisions and self.decisions[key].action == "rolled_back":
            raise SplitError(f"{key} of `{self.model}` was rolled back; `dsnode canary reset {self.model}` "
                             "gives it its configured share again")
        return key

    def state(self, now: float) -> dict[str, Any]:
        baseline = self.baseline
        configured = dict(self.configured)
        versions = [{"version": key, "configured_share": configured[key], "share": share,
                     "state": self._state_of(key, baseline),
                     "window": self.windows[key].figures(now, self.rule.window_seconds).as_json()}
                    for key, share in self.shares.items()]
        return {"model": self.model, "baseline": baseline, "versions": versions,
                "decisions": [d.as_json() for d in self.decisions.values()]}

    def _state_of(self, key: str, baseline: str) -> str:
        decision = self.decisions.get(key)
        if decision is not None:
            return decision.action
        if key == baseline:
            return "baseline"
        return "canary" if self.shares[key] else "off"


class Splits:
    def __init__(self, split: SplitTable, rule: CanarySection) -> None:
        self.models = {model: ModelSplit(model, shares, rule) for model, shares in split.items()}
        self.rollbacks: dict[tuple[str, str], int] = {}  # (model, version) → automatic rollbacks, ever

    def configure(self, split: SplitTable, rule: CanarySection) -> list[str]:
        """A reload: a model whose shares and rule stay keeps its state (rollbacks included); the others
        start afresh. Returns the models that started afresh."""
        kept, fresh = {}, []
        for model, shares in split.items():
            old = self.models.get(model)
            if old is not None and old.configured == tuple(shares.items()) and old.rule == rule:
                kept[model] = old
            else:
                kept[model] = ModelSplit(model, shares, rule)
                fresh.append(model)
        self.models = kept
        return fresh

    def choose(self, model: str, user: str | None) -> Choice | None:
        split = self.models.get(model)
        return None if split is None else split.choose(user)

    def observe(self, model: str, key: str, outcome: Outcome, wall: float) -> Decision | None:
        split = self.models.get(model)
        decision = None if split is None else split.observe(key, outcome, wall)
        if decision is not None:
            self.rollbacks[(model, key)] = self.rollbacks.get((model, key), 0) + 1
        return decision

    def split_of(self, model: str) -> ModelSplit:
        split = self.models.get(model)
        if split is None:
            raise SplitError(f"no split for model `{model}` on this node (splits: {', '.join(self.models) or 'none'})")
        return split

    def state(self, now: float) -> list[dict[str, Any]]:
        return [split.state(now) for split in self.models.values()]


def cluster_problems(split: SplitTable, served: Mapping[str, Sequence[ServedVersion]]) -> list[tuple[str, str, str]]:
    """(model, key, why) for each model of the split that no node serves, and each version no node
    serves. `served`: model → the versions the nodes known here serve."""
    problems = []
    for model, shares in split.items():
        versions = served.get(model)
        if not versions:
            names = ", ".join(sorted(served)) or "none"
            problems.append((model, f"routing.split.{model}", f"no node serves a model `{model}` (models served: {names})"))
            continue
        for key in shares:
            if not any(v.matches(key) for v in versions):
                listed = ", ".join(sorted({v.shown() for v in versions}))
                problems.append((model, f"routing.split.{model}.{key}",
                                 f"no node serves version {key} of `{model}` (versions served: {listed})"))
    return problems
