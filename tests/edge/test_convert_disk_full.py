"""`dsnode convert` onto a disk that is, or becomes, full: a clear error and no trace of DST.

The disk is a real tmpfs mounted for the test (root only; skipped elsewhere). Too small from the start,
the free-space check refuses before anything is written. Filling up on the way (what happens when
another writer takes the space after the check: the check's estimate is set aside to let the
conversion start) fails the stage that hits ENOSPC, and the staging folder is removed. An ENOSPC at
the very last write (injected) is handled the same way.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dsnode.edge import convert as convert_module

from tests.edge.conftest import convert_cli

pytestmark = pytest.mark.slow


def leftovers(disk: Path) -> list[str]:
    return sorted(p.name for p in disk.iterdir())


def used_bytes(disk: Path) -> int:
    stat = os.statvfs(disk)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def test_a_disk_too_small_is_refused_before_anything_is_written(small_disk, dense_dir):
    disk = small_disk(16)
    run = subprocess.run([sys.executable, "-m", "dsnode.cli", "convert", str(dense_dir), str(disk / "out")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "not enough free space" in run.stderr and "16.0 MB free" in run.stderr, run.stderr
    assert leftovers(disk) == [] and used_bytes(disk) == 0


# onnxruntime's quantizer does not report the ENOSPC of its own write: it leaves a truncated graph,
# which fails when read back ("Wire format was corrupt"); convert sees the full disk and says so.
@pytest.mark.parametrize("quant, megabytes, stage, why", [
    ("int8", 0.5, "export", "No space left on device"),  # the GQA builder's weight file
    ("int8-dynamic", 1.5, "export", "No space left on device"),  # torch.onnx.export
    ("int8-dynamic", 4.2, "quantize", "the disk filled up while converting"),
])
def test_a_disk_that_fills_up_on_the_way_leaves_no_destination(small_disk, dense_dir, monkeypatch,
                                                                quant, megabytes, stage, why):
    disk = small_disk(megabytes)
    monkeypatch.setattr(convert_module, "estimate_bytes", lambda *args, **kwargs: 0)  # the check passed, then...
    run = convert_cli(str(dense_dir), str(disk / "out"), "--quant", quant)
    assert run.code == 1
    assert f"{stage} failed" in run.stderr.replace("  ", " ").replace("  ", " "), run.stderr
    assert "dsnode convert: error:" in run.stderr and why in run.stderr, run.stderr
    assert leftovers(disk) == [], "DST or its staging folder was left behind"
    assert used_bytes(disk) == 0


def test_no_space_at_the_last_write_leaves_no_destination(tmp_path, dense_dir, monkeypatch):
    real_write = Path.write_text

    def full_at_the_manifest(self: Path, data: str, *args, **kwargs) -> int:
        if self.name == "manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_at_the_manifest)
    run = convert_cli(str(dense_dir), str(tmp_path / "out"), "--quant", "none")
    assert run.code == 1 and "No space left on device" in run.stderr, run.stderr
    assert leftovers(tmp_path) == []
    assert shutil.disk_usage(tmp_path)  # the folder itself is fine
