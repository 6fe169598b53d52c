"""The splits of a node (`GET /canary`, or `splits` in `GET /cluster`) as text, for `dsnode status`
and `dsnode canary status`."""

from __future__ import annotations

import time
from typing import Any

HEADER = ("MODEL", "VERSION", "SHARE", "CONFIGURED", "STATE", "REQUESTS", "ERRORS", "TTFT P95", "TPOT P95")


def format_splits(splits: list[dict[str, Any]]) -> str:
    """One row per version of each split, then each decision with its reasons and any problem."""
    rows: list[tuple[str, ...]] = [HEADER]
    notes: list[str] = []
    for split in splits:
        model = str(split.get("model", "?"))
        for version in split.get("versions") or []:
            rows.append(_row(model, version))
        for decision in split.get("decisions") or []:
            notes.append(_decision(model, decision))
        notes += [f"  problem: {p}" for p in split.get("problems") or []]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines = ["splits (requests for a model shared among its versions, decided by this node):", *lines]
    return "\n".join(lines + ([""] + notes if notes else []))


def _row(model: str, version: dict[str, Any]) -> tuple[str, ...]:
    window = version.get("window") or {}
    requests = window.get("requests")
    rate = window.get("error_rate")
    return (model, str(version.get("version", "?")), f"{version.get('share', '?')}%",
            f"{version.get('configured_share', '?')}%", str(version.get("state", "?")).replace("_", " "),
            "-" if requests is None else str(requests), "-" if not requests else f"{rate:.1%}",
            _seconds(window.get("ttft_p95_s")), _seconds(window.get("tpot_p95_s")))


def _decision(model: str, decision: dict[str, Any]) -> str:
    at = decision.get("at")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if isinstance(at, (int, float)) else "?"
    action = str(decision.get("action", "?")).replace("_", " ")
    reasons = "; ".join(decision.get("reasons") or []) or "by an operator"
    return f"  {model} {decision.get('version')}: {action} ({decision.get('by')}) at {when}: {reasons}"


def _seconds(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.3f}s"
