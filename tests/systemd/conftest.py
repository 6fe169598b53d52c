"""One throw-away systemd container per test session, with dsnode installed as README says: the wheel
built from this checkout, `dsnode models pull`, `dsnode install-service`.

What goes in (read-only): the wheel (`/opt/dsnode-dist`), the packages of the venv running the tests
(`/opt/dsnode-deps`, see payload/install.sh), the bundled dense model, and payload/."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.systemd.container import CommandFailed, Result, SystemdContainer, why_not

TREE = Path(__file__).resolve().parents[2]
PAYLOAD = Path(__file__).resolve().parent / "payload"
UNIT = "dsnode.service"
WAIT_S = 120.0  # upper bound for anything to happen; a hang guard, not a measurement


def system_python_mismatch() -> str | None:
    """The service's venv uses /usr/bin/python3 with this venv's packages: same minor version needed."""
    try:
        out = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30).stdout.split()
    except OSError:
        return "/usr/bin/python3 is missing"
    if tuple(map(int, out)) != sys.version_info[:2]:
        return (f"/usr/bin/python3 is {'.'.join(out)} but the test venv is "
                f"{sys.version_info[0]}.{sys.version_info[1]}: the service venv reuses its packages")
    return None


class Host:
    """The container, with the few things the tests ask it."""

    def __init__(self, container: SystemdContainer) -> None:
        self.container = container

    def sh(self, script: str, timeout: float = WAIT_S) -> Result:
        return self.container.sh(script, timeout=timeout)

    def show(self, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {UNIT} " + " ".join(f"-p {p}" for p in props)).check().stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def client(self, kind: str, path: str, body: dict[str, Any] | None = None, headers: tuple[str, ...] = ()) -> dict[str, Any]:
        args = ["/usr/bin/python3", "/opt/dsnode-test/payload/client.py", kind, path]
        if body is not None:
            args.append(json.dumps(body))
        args += list(headers)
        result = self.sh(shlex.join(args)).check()
        return json.loads(result.stdout.strip().splitlines()[-1])

    def journal(self, *matches: str, lines: int | None = None) -> list[dict[str, Any]]:
        tail = f" -n {lines}" if lines else ""
        out = self.sh(f"journalctl -u {UNIT} -o json --no-pager{tail} " + shlex.join(matches)).check().stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_for(self, what: str, probe: Callable[[], Any], timeout: float = WAIT_S) -> Any:
        """Poll `probe` until it returns something true; fail with the unit's journal if it never does."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = probe()
            except (CommandFailed, ValueError, KeyError):
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {what}\n{self.diagnose()}")
            time.sleep(0.25)

    def diagnose(self) -> str:
        status = self.sh(f"systemctl status {UNIT} --no-pager -n 0").stdout
        journal = self.sh(f"journalctl -u {UNIT} -o cat --no-pager | grep -v '^request ' | tail -n 40").stdout
        return f"--- systemctl status\n{status}\n--- journal\n{journal}"


def build_wheel(outdir: Path) -> Path:
    """`python -m build --wheel`, README's command (without isolation: setuptools comes from this venv,
    so no index is needed)."""
    done = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(outdir),
                           str(TREE)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = outdir.glob("dsnode-*.whl")
    return wheel


@pytest.fixture(scope="session")
def systemd_host(tmp_path_factory, dense_dir) -> Any:
    reason = why_not() or system_python_mismatch()
    if reason:
        pytest.skip(f"no systemd container on this machine: {reason}")
    work = tmp_path_factory.mktemp("systemd")
    wheel = build_wheel(work / "dist")
    container = SystemdContainer(
        binds_ro={
            str(wheel.parent): "/opt/dsnode-dist",
            sysconfig.get_paths()["purelib"]: "/opt/dsnode-deps",
            str(dense_dir): "/opt/dsnode-test/model",
            str(PAYLOAD): "/opt/dsnode-test/payload",
        },
        preset=PAYLOAD / "00-ci.preset",
        log_path=work / "nspawn.log",
    )
    container.start()
    try:
        container.sh("/opt/dsnode-test/payload/install.sh", timeout=300).check()
        yield Host(container)
    finally:
        container.close()
