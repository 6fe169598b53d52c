"""The bundled models for tests: the same cache `dsnode demo` uses, so a machine builds them once."""

from __future__ import annotations

import functools
import os
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("DSNODE_CACHE"):
        return Path(os.environ["DSNODE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsnode"


@functools.lru_cache(maxsize=1)
def bundled_models():
    from dsnode.central.bundled import ensure_bundled

    return ensure_bundled(cache_dir(), log=lambda message: print(f"[bundled] {message}", flush=True))
