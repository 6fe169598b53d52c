"""Model versions in the cluster: the version a node serves, and the settings that share a model's
requests among versions and roll a bad canary back (docs/versions.md). Apart from `dsnode.config`,
which only names these types; checks on the raw tables (`split_problems`) run with every other check.

    [model]
    path = "deepseek-r1@2026-12"     # a store version: its id is the manifest's version (12 hex)
    label = "2026-12"                # optional: a name of your own (default: the store's label)

    [routing.split.deepseek-r1]      # per model name: percent of requests per version, summing to 100
    "2026-11" = 90                   # a version id (dsnode models list) or a label; the largest
    "2026-12" = 10                   # share is the baseline, the others are canaries

    [routing.canary]                 # when a canary is rolled back (defaults below)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

UNVERSIONED = "unversioned"  # a model folder outside the store, without a label
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}")

NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Share = Annotated[int, Field(ge=0, le=100)]


def _check_label(value: str) -> str:
    if not LABEL_RE.fullmatch(value):
        raise ValueError("must be 1-64 characters: letters, digits and . _ - (starting with a letter or digit)")
    return value


Label = Annotated[str, AfterValidator(_check_label)]


class ModelVersion(BaseModel):
    """The store version `[model] path` resolved to (set by load_config from its manifest; not a key)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    name: str
    version: str
    label: str | None = None
    content_sha256: str


@dataclass(frozen=True)
class ServedVersion:
    """What a node says it serves of a model: `id` goes into `X-DSNode-Version`, the request log and
    the `version` metric label; a split names a version by its id or its label."""

    id: str
    label: str | None = None

    def matches(self, key: str) -> bool:
        return key == self.id or (self.label is not None and key == self.label)

    def shown(self) -> str:
        return self.id if self.label is None or self.label == self.id else f"{self.id} ({self.label})"


def served_version(model_version: ModelVersion | None, label: str | None) -> ServedVersion:
    """The store's version (and `[model] label`, else the store's label); without a store version,
    the label stands for the id, or `unversioned`."""
    if model_version is not None:
        return ServedVersion(model_version.version, label or model_version.label)
    return ServedVersion(label or UNVERSIONED, label)


class CanarySection(BaseModel):
    """`[routing.canary]`: how the versions of a split are judged against its baseline."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    enabled: bool = True  # roll a canary back automatically (false: only watch and show)
    window: PositiveInt = 200  # the latest requests of each version that are judged
    window_seconds: PositiveFloat = 600.0  # ... of which only those that ended this recently
    min_requests: PositiveInt = 50  # no verdict before the canary and the baseline have this many
    error_rate_margin: NonNegativeFloat = 0.05  # canary error rate may exceed the baseline's by this
    ttft_p95_margin: NonNegativeFloat = 0.5  # canary TTFT p95 may exceed the baseline's by this fraction
    tpot_p95_margin: NonNegativeFloat = 0.5  # same for time per output token p95
    min_ttft_difference_s: NonNegativeFloat = 0.05  # smaller TTFT p95 differences never count (noise)
    min_tpot_difference_s: NonNegativeFloat = 0.005  # smaller TPOT p95 differences never count

    @field_validator("min_requests")
    @classmethod
    def _within_window(cls, value: int, info: ValidationInfo) -> int:
        window = info.data.get("window")
        if window is not None and value > window:
            raise ValueError(f"must be <= window ({window}): a window holds no more requests")
        return value


SplitTable = dict[str, dict[str, Share]]  # model name → version (id or label) → percent


def split_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, why) for what the file alone can tell about `[routing.split]`: names that can be no
    model or version, shares that do not sum to 100. Whether a node serves each model and version
    is the node's to check (on reload) or `dsnode check-config --cluster URL`'s."""
    routing = raw.get("routing")
    split = routing.get("split") if isinstance(routing, dict) else None
    if not isinstance(split, dict):
        return []
    problems: list[tuple[str, str]] = []
    for model, shares in split.items():
        key = f"routing.split.{model}"
        if not MODEL_NAME_RE.fullmatch(model):
            problems.append((key, f"is not a model name (got {model!r})"))
        if not isinstance(shares, dict):
            continue  # the type check says so
        problems += _share_problems(key, shares)
    return problems


def _share_problems(key: str, shares: dict[str, Any]) -> list[tuple[str, str]]:
    if not shares:
        return [(key, "names no version; give each version its percent, e.g. \"2026-12\" = 10 (got an empty table)")]
    problems = [(f"{key}.{v}", f"is not a version id or label (got {v!r})") for v in shares if not LABEL_RE.fullmatch(v)]
    numbers = [s for s in shares.values() if isinstance(s, int) and not isinstance(s, bool)]
    if len(numbers) == len(shares) and sum(numbers) != 100:
        terms = " + ".join(str(n) for n in numbers)
        problems.append((key, f"the shares must sum to 100 (got {terms} = {sum(numbers)})"))
    return problems
