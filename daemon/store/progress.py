"""Byte progress for pulls, on stderr: one bar per file with bytes, rate and time left (tqdm, which the
hub clients use too). Off a terminal (a log, journald) it redraws at most every 5 s, so a log holds a
few lines per file rather than hundreds."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def file_bar_class(enabled: bool) -> type[tqdm]:  # type: ignore[type-arg]
    """A tqdm class for the hub clients' `tqdm_class=` and for local copies."""
    interactive = sys.stderr.isatty()

    class FileBar(tqdm):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)  # huggingface_hub's group name; plain tqdm rejects it
            kwargs.update(disable=not enabled, unit="B", unit_scale=True, unit_divisor=1024,
                          mininterval=0.2 if interactive else 5.0, file=sys.stderr, dynamic_ncols=interactive)
            super().__init__(*args, **kwargs)

    return FileBar


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
