"""A real systemd (PID 1 of a throw-away `systemd-nspawn` container) for end-to-end tests.

The machines these tests run on are VMs whose own PID 1 is not systemd. systemd-nspawn boots the
host's systemd with `--volatile=yes`: a tmpfs root, the host's /usr read-only, an empty /etc,
nothing kept. `--private-network` gives the container its own loopback only, so a service port
never meets the host's. Commands run inside with nsenter(1); no machined or D-Bus on the host.

Needs root and `systemd-nspawn` (Debian: `apt-get install systemd-container`); `why_not()` says
what is missing, for a skip reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")
CGROUP_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup"))
INSIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT_S = 120.0


def why_not() -> str | None:
    """None if this machine can boot a systemd container, else the reason it cannot."""
    if os.geteuid() != 0:
        return "booting systemd in a container needs root"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is missing (apt-get install systemd-container)"
    if shutil.which("nsenter") is None:
        return "nsenter (util-linux) is missing"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is missing (apt-get install systemd)"
    return None


class CommandFailed(AssertionError):
    pass


@dataclass
class Result:
    args: str
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> "Result":
        if self.returncode != 0:
            raise CommandFailed(f"`{self.args}` exited {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}")
        return self


@dataclass
class SystemdContainer:
    """Boot with `start()`, run commands with `sh()`, always `close()`."""

    binds_ro: dict[str, str]  # host path → path inside
    preset: Path  # a `disable *` preset, so first boot enables none of the host's services
    log_path: Path
    name: str = field(default_factory=lambda: f"dsnode-sdtest-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    leader: int | None = None  # the container's PID 1, as the host numbers it
    _nspawn: subprocess.Popen[bytes] | None = None
    _cgroups: list[Path] = field(default_factory=list)

    def start(self) -> "SystemdContainer":
        # With no systemd on the host, nspawn makes its payload/supervisor cgroups under its own
        # cgroup: give it one of its own in each hierarchy, to keep them apart and remove them after.
        for root in CGROUP_ROOTS:
            if (root / "cgroup.procs").exists():
                (root / self.name).mkdir(exist_ok=True)
                self._cgroups.append(root / self.name)
        args = [
            "systemd-nspawn", "-D", "/", "--volatile=yes", f"--machine={self.name}",
            "--register=no", "--keep-unit", "--console=passive", "--private-network",
            f"--bind-ro={self.preset}:/etc/systemd/system-preset/00-ci.preset",
            "--bind-ro=/etc/alternatives",
            *[f"--bind-ro={host}:{inside}" for host, inside in self.binds_ro.items()],
            # kernel-command-line style arguments for PID 1: no first-boot questions on a console
            "-b", "systemd.firstboot=off", "systemd.unit=multi-user.target",
        ]
        join = "".join(f'echo $$ > "{c}/cgroup.procs"; ' for c in self._cgroups)
        # If pytest dies without close(), nspawn gets SIGTERM and powers the container off.
        pdeathsig = ["setpriv", "--pdeathsig", "TERM", "--"] if shutil.which("setpriv") else []
        self._log = open(self.log_path, "ab")
        self._nspawn = subprocess.Popen(
            [*pdeathsig, "bash", "-c", join + 'exec "$@"', "nspawn", *args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env={"PATH": INSIDE_PATH, "LANG": "C.UTF-8"},
        )
        try:
            self._boot()
        except BaseException:
            self.close()
            raise
        return self

    def _boot(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while self.leader is None:
            self._check_alive()
            self.leader = _child_named(self._nspawn.pid, "systemd")  # type: ignore[union-attr]
            self._wait(deadline, "the container's systemd to start")
        while not Path(f"/proc/{self.leader}/root/run/systemd/private").exists():
            self._check_alive()
            self._wait(deadline, "PID 1's private socket")
        state = self.sh("timeout 90 systemctl is-system-running --wait || true", timeout=100).stdout.strip()
        if state not in ("running", "degraded"):
            raise CommandFailed(f"the container did not boot: {state!r}\n{self.log_tail()}")

    def _check_alive(self) -> None:
        assert self._nspawn is not None
        if self._nspawn.poll() is not None:
            raise CommandFailed(f"systemd-nspawn exited {self._nspawn.returncode}\n{self.log_tail()}")

    def _wait(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise CommandFailed(f"timed out waiting for {what}\n{self.log_tail()}")
        time.sleep(0.1)

    def sh(self, script: str, timeout: float = 120.0) -> Result:
        """Run a bash script inside the container (all its namespaces), with a clean environment."""
        assert self.leader is not None
        args = ["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={INSIDE_PATH}", "LANG=C.UTF-8",
                "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "bash", "-c", script]
        # A session of its own: a signal to "the process group" inside never reaches pytest's group.
        done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
        return Result(script, done.returncode, done.stdout, done.stderr)

    def popen(self, script: str) -> subprocess.Popen[str]:
        """Like sh(), in the background; stdout is a pipe."""
        assert self.leader is not None
        args = ["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={INSIDE_PATH}", "LANG=C.UTF-8",
                "bash", "-c", script]
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    def close(self) -> None:
        if self._nspawn is not None and self._nspawn.poll() is None:
            if self.leader is not None:
                subprocess.run(["nsenter", "-t", str(self.leader), "-a", "systemctl", "poweroff", "--no-block"],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=30, start_new_session=True)
            try:
                self._nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._nspawn.terminate()
                try:
                    self._nspawn.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._nspawn.kill()
                    self._nspawn.wait()
        if self._nspawn is not None:
            self._log.close()
        for cgroup in self._cgroups:
            _remove_cgroup(cgroup)
        self._cgroups.clear()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _child_named(parent: int, comm: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid …; comm may hold spaces, so split after the closing parenthesis
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == parent and name == comm:
            return int(entry.name)
    return None


def _remove_cgroup(path: Path) -> None:
    """Depth-first rmdir (cgroup folders cannot be removed while they have children)."""
    if not path.exists():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            child.rmdir()
        except OSError:
            pass
    try:
        path.rmdir()
    except OSError:
        pass
