"""JSON from untrusted bytes (a client's body, a peer's advertisement), parsed within bounds.

`json.loads` accepts what the rest of a node cannot hold: nesting deep enough to exhaust Python's
recursion limit (a `RecursionError`, in the parser or in whatever walks the result later), integers
of more than 4300 digits (a `ValueError` that is not a `JSONDecodeError`), and `\\ud800`-style escapes
that decode to lone surrogates, which are not Unicode text: UTF-8 cannot encode them, so a tokenizer
or the JSON encoder of the next hop fails on them. `loads` refuses all three with `JSONRefused`.

The checks cost almost nothing on ordinary bodies: the depth is only walked when the body has more
brackets than the bound, and strings are only checked when the bytes hold a surrogate escape.
"""

from __future__ import annotations

import json
import re
from typing import Any

# `\uD800`-`\uDFFF` escapes: the only way a surrogate gets into JSON (raw UTF-8 cannot carry one)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


class JSONRefused(ValueError):
    """Bytes that are not JSON this node accepts; `code` names why, `path` where (if known)."""

    def __init__(self, message: str, code: str, path: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.path = path


def loads(raw: bytes, max_depth: int) -> Any:
    """Parse `raw` (UTF-8 JSON, a leading BOM allowed); raises JSONRefused for anything that is not
    valid JSON in strict UTF-8, nested deeper than `max_depth`, or holding a lone surrogate.

    The bytes are decoded here, strictly: `json.loads(bytes)` would guess UTF-16 or UTF-32 and decode
    UTF-8 with `surrogatepass`, letting a UTF-8-encoded surrogate (`\xed\xa0\x80`) through."""
    try:
        text = raw.decode("utf-8")
        data = json.loads(text[1:] if text.startswith("\ufeff") else text)
    except RecursionError:
        raise JSONRefused(f"The JSON is nested more than {max_depth} levels deep.", "json_too_deep") from None
    except UnicodeDecodeError as exc:
        raise JSONRefused(f"The body is not valid UTF-8: {exc.reason} at byte {exc.start}.", "invalid_json") from None
    except json.JSONDecodeError as exc:
        raise JSONRefused(f"The body is not valid JSON: {exc}", "invalid_json") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise JSONRefused(f"The body is not JSON this server accepts: {exc}", "invalid_json") from None
    if raw.count(b"[") + raw.count(b"{") > max_depth and depth_of(data) > max_depth:
        raise JSONRefused(f"The JSON is nested more than {max_depth} levels deep.", "json_too_deep")
    if _SURROGATE_ESCAPE.search(raw):
        path = lone_surrogate_path(data)
        if path is not None:
            where = f" in '{path}'" if path else ""
            raise JSONRefused(f"The body holds a lone UTF-16 surrogate escape{where}: that is not Unicode text.",
                              "invalid_unicode", path)
    return data


def depth_of(data: Any) -> int:
    """How deeply lists and objects nest in `data` (a scalar: 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((item, depth) for item in value if isinstance(item, (dict, list)))
    return deepest


def lone_surrogate_path(data: Any) -> str | None:
    """Where the first string (or key) that UTF-8 cannot encode is: `messages[0].content`, "" for
    the top level, None if there is none."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not _encodable(value):
                return path
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                child = f"{path}.{key}" if path else str(key)
                if not _encodable(key):
                    return path
                stack.append((item, child))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
