"""`dsnode convert` killed with SIGKILL leaves its staging folder behind (nothing can run on SIGKILL);
the next conversion to the same DST removes it — and leaves alone one that a live process owns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dsnode.edge.convert import OLD_STAGING_AGE_S, remove_abandoned_staging

from tests.edge.conftest import convert_quietly

WAIT_S = 300.0  # a hang guard


def staging_of(dst: Path) -> list[Path]:
    return sorted(dst.parent.glob(f".{dst.name}.partial-*"))


@pytest.mark.slow
def test_a_conversion_killed_with_sigkill_is_cleaned_up_by_the_next_one(tmp_path, dense_dir):
    dst = tmp_path / "dense-fp32"
    child = subprocess.Popen([sys.executable, "-m", "dsnode.cli", "convert", str(dense_dir), str(dst), "--quant", "none"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + WAIT_S
    while not staging_of(dst):
        assert child.poll() is None and time.monotonic() < deadline, "the conversion ended before it was killed"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=WAIT_S)
    left = staging_of(dst)
    assert len(left) == 1 and not dst.exists()  # what SIGKILL leaves
    result = convert_quietly(dense_dir, dst, "none")
    assert result.path == dst and dst.is_dir()
    assert staging_of(dst) == []  # removed by the conversion that followed


def test_only_staging_folders_nobody_owns_are_removed(tmp_path):
    dst = tmp_path / "model-int8"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = tmp_path / f".model-int8.partial-{int(finished.stdout)}-k3j2h1g0"  # its process has exited
    alive = tmp_path / f".model-int8.partial-{os.getpid()}-a1b2c3d4"  # this process: still converting
    old = tmp_path / ".model-int8.partial-x9y8z7w6"  # named before pids were, long ago
    young = tmp_path / ".model-int8.partial-q1w2e3r4"  # named before pids were, just now
    other = tmp_path / f".other-model.partial-{int(finished.stdout)}-zzzzzzzz"  # another DST's
    for folder in (dead, alive, old, young, other):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"half a graph")
    long_ago = time.time() - OLD_STAGING_AGE_S - 60
    os.utime(old, (long_ago, long_ago))
    assert sorted(remove_abandoned_staging(dst)) == sorted([dead, old])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (alive, young, other))
    assert remove_abandoned_staging(tmp_path / "missing" / "dst") == []
