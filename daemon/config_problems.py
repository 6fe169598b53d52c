"""Configuration problems as operators read them: `file: key: why (got value)`, one per problem, all
of a file's problems at once (`ConfigError`), pydantic's errors reworded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Problem:
    file: str
    key: str
    why: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.why}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


_WHY = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "path_type": "must be a path string",
    "tuple_type": "must be a list",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "dict_type": "must be a table",
}


def problem_of(path: Path, err: Any) -> Problem:
    """One pydantic validation error as a Problem."""
    key = _dotted(err["loc"])
    kind = err["type"]
    if kind == "literal_error":
        why = f"must be one of {err['ctx']['expected']}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(err["ctx"].values()))
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        why = f"must be {op} {bound}"
    elif kind == "value_error":
        why = str(err["ctx"]["error"])
    else:
        why = _WHY.get(kind, err["msg"])
    if kind != "missing":
        why += f" (got {_show(err.get('input'))})"
    return Problem(str(path), key or "(top level)", why)


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.startswith("function-"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
