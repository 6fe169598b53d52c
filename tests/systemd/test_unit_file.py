"""Offline checks of systemd/dsnode.service: `systemd-analyze verify` and `security`, and the
settings the daemon's lifecycle relies on. No running systemd needed (tests/systemd/test_service.py
runs the unit for real)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from dsnode.config import DEFAULT_CONFIG_PATH, NodeSection
from dsnode.server import STOP_MARGIN_S

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD_DIR / "dsnode.service"
MAX_EXPOSURE = 2.5
INSTALLED_BINARY = "/opt/dsnode/bin/dsnode"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is missing (Debian: apt-get install systemd)")


def settings(path: Path = UNIT) -> dict[str, list[str]]:
    """`Key=value` lines of the unit, every value of a repeated key, in order (section names dropped)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, value = line.split("=", 1)
        out.setdefault(key, []).append(value)
    return out


def seconds(value: str) -> float:
    units = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit or "s"]
    return total


@needs_analyze
def test_systemd_analyze_verify_passes():
    """verify insists the ExecStart= binary exists: give it one at the install path, in a private
    mount namespace so that the host's /opt stays as it is."""
    if shutil.which("unshare") is None or subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        pytest.skip("needs root and unshare(1) to put a stand-in for /opt/dsnode/bin/dsnode in place")
    script = (
        "set -e; mount --make-rprivate /; mount -t tmpfs tmpfs /opt; "
        f"mkdir -p {Path(INSTALLED_BINARY).parent}; printf '#!/bin/sh\\n' > {INSTALLED_BINARY}; "
        f"chmod 755 {INSTALLED_BINARY}; exec systemd-analyze verify {UNIT}"
    )
    done = subprocess.run(["unshare", "--mount", "bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", done.stderr + done.stdout


@needs_analyze
def test_exposure_is_at_most_2_5():
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", "--no-pager",
         str(UNIT)], capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for dsnode\.service: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE and done.returncode == 0, done.stdout


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is missing")
def test_sysusers_file_parses():
    done = subprocess.run(["systemd-sysusers", "--dry-run", str(SYSTEMD_DIR / "dsnode.sysusers")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_unit_runs_dsnode_serve_as_a_notify_service():
    unit = settings()
    assert unit["ExecStart"] == [f"{INSTALLED_BINARY} serve --config {DEFAULT_CONFIG_PATH}"]
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"]
    assert seconds(unit["WatchdogSec"][0]) > 0
    assert unit["User"] == ["dsnode"]
    assert unit["StateDirectory"] == ["dsnode"] and unit["ConfigurationDirectory"] == ["dsnode"]


def test_a_model_that_cannot_fit_is_not_restarted():
    """`dsnode serve` exits 78 when the plan says the model cannot fit; a restart would fail the same
    way, while exit 1 (a dead rank, a failed load) is still restarted."""
    from dsnode.sizing import EXIT_DOES_NOT_FIT

    prevent = settings()["RestartPreventExitStatus"]
    assert [str(EXIT_DOES_NOT_FIT)] == prevent[0].split() and "1" not in prevent[0].split()


def test_stop_timeout_covers_the_default_drain():
    """Longer drains ask for more time at STOPPING=1 (EXTEND_TIMEOUT_USEC); the default must fit as is."""
    unit = settings()
    default_drain = NodeSection.model_fields["drain_timeout"].default
    assert seconds(unit["TimeoutStopSec"][0]) >= default_drain + STOP_MARGIN_S
    assert unit["KillMode"] == ["mixed"]  # SIGTERM to the main process only: it decides when helpers go


def test_gpus_stay_reachable_under_the_sandbox():
    unit = settings()
    assert "PrivateDevices" not in unit and "MemoryDenyWriteExecute" not in unit
    assert unit["DevicePolicy"] == ["closed"]
    allowed = {entry.split()[0] for entry in unit["DeviceAllow"]}
    assert {"char-nvidia*", "/dev/nvidiactl", "/dev/nvidia-uvm"} <= allowed
