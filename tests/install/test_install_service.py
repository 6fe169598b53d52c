"""`dsnode install-service --root DIR`: the files it installs and how a rerun and an uninstall treat
them, without touching this host (tests/systemd/test_service.py runs it for real under systemd)."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.store.conftest import dsnode

REPO = Path(__file__).resolve().parents[2]


def install(root: Path, *args: str):
    return dsnode("install-service", "--root", str(root), *args)


def test_install_writes_the_unit_users_folders_and_the_role_config(tmp_path):
    run = install(tmp_path, "--role", "central")
    assert run.code == 0, run.stderr
    unit = (tmp_path / "etc/systemd/system/dsnode.service").read_text()
    assert f"ExecStart={sys.prefix}/bin/dsnode serve --config /etc/dsnode/dsnode.toml" in unit
    assert "/opt/dsnode/bin/dsnode" not in unit
    assert unit.replace(f"{sys.prefix}/bin/dsnode", "/opt/dsnode/bin/dsnode").replace(
        f"{sys.prefix}/share/doc", "/opt/dsnode/share/doc") == (REPO / "systemd/dsnode.service").read_text()
    assert (tmp_path / "etc/sysusers.d/dsnode.conf").read_text() == (REPO / "systemd/dsnode.sysusers").read_text()
    assert (tmp_path / "etc/tmpfiles.d/dsnode.conf").read_text() == (REPO / "systemd/dsnode.tmpfiles").read_text()
    config = tmp_path / "etc/dsnode/dsnode.toml"
    assert config.read_text() == (REPO / "configs/central.toml").read_text()
    assert config.stat().st_mode & 0o777 == 0o640
    # the example names a model this host doesn't have: check-config says so, and what to do next
    assert "is not ready to serve" in run.stdout and "model.path" in run.stdout
    assert "dsnode models pull SOURCE --name NAME" in run.stdout
    assert "(--root: not running `systemctl enable dsnode.service`)" in run.stdout


def test_a_second_run_changes_nothing_and_keeps_an_edited_config(tmp_path):
    assert install(tmp_path).code == 0
    config = tmp_path / "etc/dsnode/dsnode.toml"
    config.write_text(config.read_text().replace('name = "edge-1"', 'name = "edge-7"'))
    again = install(tmp_path, "--role", "central")
    assert again.code == 0
    assert "dsnode.service: unchanged" in again.stdout and "dsnode.toml: kept (yours)" in again.stdout
    assert 'name = "edge-7"' in config.read_text()


def test_config_file_replaces_the_config_and_keeps_the_old_one(tmp_path):
    assert install(tmp_path).code == 0
    config = tmp_path / "etc/dsnode/dsnode.toml"
    before = config.read_text()
    mine = tmp_path / "mine.toml"
    mine.write_text((REPO / "configs/standalone.toml").read_text())
    run = install(tmp_path, "--config", str(mine))
    assert run.code == 0
    assert config.read_text() == mine.read_text()
    assert (tmp_path / "etc/dsnode/dsnode.toml.bak").read_text() == before
    assert "dsnode.toml: unchanged" in install(tmp_path, "--config", str(mine)).stdout


def test_uninstall_keeps_config_and_models_unless_purged(tmp_path):
    assert install(tmp_path).code == 0
    model = tmp_path / "var/lib/dsnode/models/tiny/abc/config.json"
    model.parent.mkdir(parents=True)
    model.write_text("{}")
    run = install(tmp_path, "--uninstall")
    assert run.code == 0, run.stderr
    assert not (tmp_path / "etc/systemd/system/dsnode.service").exists()
    assert not (tmp_path / "etc/sysusers.d/dsnode.conf").exists()
    assert (tmp_path / "etc/dsnode/dsnode.toml").exists() and model.exists()
    assert install(tmp_path, "--uninstall", "--purge").code == 0
    assert not (tmp_path / "etc/dsnode").exists() and not (tmp_path / "var/lib/dsnode").exists()


def test_purge_alone_is_refused(tmp_path):
    run = install(tmp_path, "--purge")
    assert run.code == 1 and run.stderr.strip() == "dsnode install-service: error: --purge goes with --uninstall"
