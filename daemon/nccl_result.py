"""The published `dsnode bench nccl` result: where it lives, written atomically, read defensively.

`dsnode bench nccl --publish` writes it; the node on the same host reads it at every scrape of
`/metrics` (`dsnode_nccl_allreduce_latency_seconds`). Its folder is systemd's `StateDirectory=`
(`$STATE_DIRECTORY`, read by the CLI and passed in), else `/var/lib/dsnode`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

RESULT_KIND = "dsnode.nccl-allreduce"
RESULT_VERSION = 1
RESULT_FILE = "nccl-allreduce.json"
DEFAULT_STATE_DIR = Path("/var/lib/dsnode")


def result_path(state_directory: str | None) -> Path:
    """`$STATE_DIRECTORY` (its first folder, if several) or /var/lib/dsnode, plus the file name."""
    base = Path(state_directory.split(":")[0]) if state_directory else DEFAULT_STATE_DIR
    return base / RESULT_FILE


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Atomically (write, then rename), so a scrape never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".nccl-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(result, out, indent=2)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_result(path: Path) -> dict[str, Any] | None:
    """A published result, or None when there is none (or it isn't one of ours)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("kind") != RESULT_KIND
        or not isinstance(data.get("results"), list)
    ):
        return None
    return data
