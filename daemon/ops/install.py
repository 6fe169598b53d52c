"""`dsnode install-service`: this host's dsnode as a systemd service, in one idempotent step.

A command rather than a shell script because the wheel carries everything it installs (the unit,
sysusers and tmpfiles files, the example configs, as package data) and the command knows which venv it
runs from, so the unit's ExecStart names the `dsnode` that was installed; `check-config` runs in
process. Rerunning it changes only what differs, and restarts or reloads a running service only when
its unit or config changed. `--uninstall` keeps the config and the models unless `--purge`.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

UNIT = "dsnode.service"
PACKAGED_BINARY = "/opt/dsnode/bin/dsnode"  # what systemd/dsnode.service says; replaced by the real one
PACKAGED_DOC = "/opt/dsnode/share/doc/dsnode/systemd.md"
# The unit's sandbox hides these (ProtectHome=, PrivateTmp=): a venv there cannot be started.
HIDDEN_FROM_SERVICE = (Path("/home"), Path("/root"), Path("/tmp"), Path("/var/tmp"), Path("/run/user"))


@dataclass(frozen=True)
class Paths:
    """Where each piece goes, under `root` (`/`, or a folder for --root)."""

    root: Path

    def _at(self, relative: str) -> Path:
        return self.root / relative

    unit = property(lambda self: self._at("etc/systemd/system/dsnode.service"))
    dropins = property(lambda self: self._at("etc/systemd/system/dsnode.service.d"))
    sysusers = property(lambda self: self._at("etc/sysusers.d/dsnode.conf"))
    tmpfiles = property(lambda self: self._at("etc/tmpfiles.d/dsnode.conf"))
    config_dir = property(lambda self: self._at("etc/dsnode"))
    config = property(lambda self: self._at("etc/dsnode/dsnode.toml"))
    state = property(lambda self: self._at("var/lib/dsnode"))
    cache = property(lambda self: self._at("var/cache/dsnode"))


@dataclass
class Host:
    """Runs the system commands, or (with --root) only says what it would run."""

    paths: Paths
    dry: bool
    changed: set[str] = field(default_factory=set)

    def run(self, *args: str, check: bool = True) -> int:
        if self.dry:
            print(f"  (--root: not running `{' '.join(args)}`)")
            return 0
        done = subprocess.run(args, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise InstallError(f"`{' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")
        return done.returncode

    def put(self, what: str, target: Path, text: str, mode: int = 0o644) -> None:
        """Write `text` to `target` unless it already holds exactly that."""
        if target.is_file() and target.read_text() == text:
            print(f"  {target}: unchanged")
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.new")
        tmp.write_text(text)
        tmp.chmod(mode)
        os.replace(tmp, target)
        self.changed.add(what)
        print(f"  {target}: written")


class InstallError(Exception):
    """The install cannot go on; the message says what to do."""


def register(p: argparse.ArgumentParser) -> None:
    p.description = ("Install dsnode as this host's systemd service: the dsnode user and folders (sysusers, "
                     "tmpfiles), the unit (running this venv's dsnode), the example config for the role, "
                     "check-config, enable and start. Safe to run again.")
    p.add_argument("--role", choices=("edge", "central"), default="edge",
                   help="which example config to install when there is none yet (default edge)")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="install FILE as /etc/dsnode/dsnode.toml (an existing different one is kept as .bak)")
    p.add_argument("--no-start", action="store_true", help="enable the service but don't start it")
    p.add_argument("--uninstall", action="store_true", help="stop, disable and remove the service; keeps "
                   "/etc/dsnode and the models")
    p.add_argument("--purge", action="store_true", help="with --uninstall: also remove /etc/dsnode, "
                   "/var/lib/dsnode (every model) and /var/cache/dsnode")
    p.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                   help="install into DIR as if it were / (packaging, tests): files only, no systemctl")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    host = Host(Paths(args.root), dry=args.root.resolve() != Path("/"))
    try:
        if not host.dry and os.geteuid() != 0:
            raise InstallError("run it as root (sudo), from the venv it should use: "
                               f"sudo {sys.prefix}/bin/dsnode install-service …")
        if args.uninstall:
            return uninstall(host, purge=args.purge)
        if args.purge:
            raise InstallError("--purge goes with --uninstall")
        return install(host, args.role, args.config, start=not args.no_start)
    except InstallError as exc:
        print(f"dsnode install-service: error: {exc}", file=sys.stderr)
        return 1


def install(host: Host, role: str, config: Path | None, start: bool) -> int:
    binary = service_binary(check_visible=not host.dry)
    print(f"installing dsnode.service running {binary}")
    put_users_and_folders(host)
    put_unit(host, binary)
    put_config(host, role, config)
    problems = check_config(host.paths.config)
    host.run("systemctl", "daemon-reload")
    host.run("systemctl", "enable", UNIT)
    if problems:
        print(f"\n{host.paths.config} is not ready to serve:")
        print("".join(f"  {p}\n" for p in problems), end="")
        print(next_steps(host.paths, ready=False))
        return 0
    if start:
        start_or_refresh(host)
    print(next_steps(host.paths, ready=True))
    return 0


def service_binary(check_visible: bool) -> Path:
    """This venv's `dsnode`: what the unit runs. Refused where the unit's sandbox cannot see it."""
    binary = Path(sys.prefix) / "bin" / "dsnode"
    if not binary.is_file():
        raise InstallError(f"{binary} is missing: install dsnode into a venv (see README) and run its dsnode")
    for hidden in HIDDEN_FROM_SERVICE if check_visible else ():
        if binary.is_relative_to(hidden):
            raise InstallError(f"{binary} is under {hidden}, which the service's sandbox hides; install "
                               "dsnode into a venv such as /opt/dsnode (python3 -m venv /opt/dsnode)")
    return binary


def put_users_and_folders(host: Host) -> None:
    host.put("sysusers", host.paths.sysusers, packaged("systemd", "dsnode.sysusers"))
    host.put("tmpfiles", host.paths.tmpfiles, packaged("systemd", "dsnode.tmpfiles"))
    host.run("systemd-sysusers", str(host.paths.sysusers))
    host.run("systemd-tmpfiles", "--create", str(host.paths.tmpfiles))


def put_unit(host: Host, binary: Path) -> None:
    doc = Path(sys.prefix) / "share" / "doc" / "dsnode" / "systemd.md"
    unit = packaged("systemd", UNIT).replace(PACKAGED_BINARY, str(binary)).replace(PACKAGED_DOC, str(doc))
    host.put("unit", host.paths.unit, unit)
    if not host.dry:
        Host(host.paths, dry=False).put("doc", doc, packaged("docs", "systemd.md"))


def put_config(host: Host, role: str, given: Path | None) -> None:
    target = host.paths.config
    if given is None and target.exists():
        print(f"  {target}: kept (yours)")
        return
    if given is not None and target.exists() and filecmp.cmp(given, target, shallow=False):
        print(f"  {target}: unchanged")
        return
    if target.exists():
        shutil.copy2(target, target.with_name(target.name + ".bak"))
        print(f"  {target}.bak: the previous config")
    try:
        text = given.read_text() if given else packaged("configs", f"{role}.toml")
    except OSError as exc:
        raise InstallError(f"{given}: cannot read: {exc.strerror}") from None
    host.put("config", target, text, mode=0o640)
    _chgrp(target, "dsnode")


def check_config(path: Path) -> list[str]:
    from ..config import ConfigError, load_config

    try:
        load_config(path)
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    return []


def start_or_refresh(host: Host) -> None:
    """Start it; if it was running, restart for a new unit, reload for a new config (no request dropped)."""
    active = host.run("systemctl", "is-active", "--quiet", UNIT, check=False) == 0
    if not active:
        print("starting dsnode (returns once the model is loaded) …")
        host.run("systemctl", "start", UNIT)
    elif "unit" in host.changed:
        host.run("systemctl", "restart", UNIT)
    elif "config" in host.changed:
        host.run("systemctl", "reload", UNIT)


def next_steps(paths: Paths, ready: bool) -> str:
    if ready:
        return (f"\ndsnode is enabled and serving. Next:\n"
                f"  systemctl status dsnode; journalctl -u dsnode -f\n"
                f"  edit {paths.config}, then: systemctl reload dsnode\n")
    return (f"\nThe service is enabled but not started. Next:\n"
            f"  dsnode models pull SOURCE --name NAME       (e.g. deepseek-ai/DeepSeek-R1-Distill-Qwen-7B "
            f"--convert int8 on an edge)\n"
            f"  edit {paths.config}: [model] path = \"NAME\", [node] name, [[routing.upstream]]\n"
            f"  dsnode check-config {paths.config}\n"
            f"  dsnode install-service   (again: it starts the service once the config is valid)\n")


def uninstall(host: Host, purge: bool) -> int:
    if host.paths.unit.exists():
        host.run("systemctl", "disable", "--now", UNIT, check=False)
    for path in (host.paths.unit, host.paths.sysusers, host.paths.tmpfiles):
        if path.exists():
            path.unlink()
            print(f"  {path}: removed")
    host.run("systemctl", "daemon-reload")
    kept = (host.paths.config_dir, host.paths.state, host.paths.cache, host.paths.dropins)
    if purge:
        for path in kept:
            shutil.rmtree(path, ignore_errors=True)
            print(f"  {path}: removed")
    else:
        print(f"kept {host.paths.config_dir} and the models in {host.paths.state}/models (--purge removes them)")
    print(f"the dsnode user stays (remove it with userdel dsnode); the program stays in {sys.prefix}")
    return 0


def packaged(folder: str, name: str) -> str:
    """A file the wheel carries: systemd/, configs/ and docs/systemd.md of the source tree (an editable
    install from a checkout reads the tree itself: setuptools' editable finder skips data-only folders)."""
    package = {"systemd": "dsnode.systemd_units", "configs": "dsnode.example_configs", "docs": "dsnode.docs"}
    try:
        return resources.files(package[folder]).joinpath(name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, OSError):
        pass
    checkout = Path(__file__).resolve().parents[2] / folder / name
    try:
        return checkout.read_text(encoding="utf-8")
    except OSError:
        raise InstallError(f"this dsnode install lacks its {folder}/{name}; reinstall the wheel") from None


def _chgrp(path: Path, group: str) -> None:
    try:
        shutil.chown(path, group=group)
    except (LookupError, PermissionError):
        pass  # --root into a tree whose group this host doesn't have
