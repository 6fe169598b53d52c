"""The store without a hub: local folders and archives, versions, the current marker, list / rm / use,
and `[model] path = NAME | NAME@VERSION | NAME@LABEL` in a node config."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from dsnode.config import ConfigError, load_config
from dsnode.store import ModelStore

from tests.store.conftest import files_under, models


def node_config(folder: Path, ref: str, store: Path | None, backend: str = "transformers") -> Path:
    path = folder / "node.toml"
    store_line = f'[store]\nroot = "{store}"\n' if store else ""
    path.write_text(f'[node]\nrole = "central"\n[model]\nname = "m"\npath = "{ref}"\nbackend = "{backend}"\n'
                    + store_line)
    return path


def edited_copy(src: Path, dst: Path, note: str) -> Path:
    """The model with a different generation_config.json: other bytes, so another version."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "generation_config.json").read_text())
    (dst / "generation_config.json").write_text(json.dumps({**config, "note": note}))
    return dst


def test_a_local_folder_becomes_a_version_named_by_its_content(tmp_path, dense_dir):
    store = tmp_path / "models"
    first = models(store, "pull", str(dense_dir), "--name", "tiny", "--quiet")
    assert first.code == 0, first.stderr
    stored = ModelStore(store).resolve("tiny")
    assert stored.manifest.source == {"kind": "folder", "path": str(dense_dir)}
    assert stored.version == stored.manifest.content_sha256[:12]
    assert sorted(stored.manifest.files) == sorted(p.name for p in dense_dir.iterdir() if p.is_file())

    copy = shutil.copytree(dense_dir, tmp_path / "elsewhere")
    again = models(store, "pull", str(copy), "--name", "tiny", "--quiet")
    assert again.code == 0 and "is already in the store" in again.stderr  # same bytes, same version
    assert [v.version for v in ModelStore(store).versions("tiny")] == [stored.version]
    assert files_under(store / ".partial") == []


def test_an_archive_with_one_top_folder_is_pulled_like_the_folder(tmp_path, dense_dir):
    archive = tmp_path / "tiny-model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(dense_dir, arcname="tiny-model")
    store = tmp_path / "models"
    assert models(store, "pull", str(dense_dir), "--name", "tiny", "--quiet").code == 0
    run = models(store, "pull", str(archive), "--quiet")  # default name: the archive's, without .tar.gz
    assert run.code == 0, run.stderr
    from_archive = ModelStore(store).resolve("tiny-model")
    assert from_archive.manifest.content_sha256 == ModelStore(store).resolve("tiny").manifest.content_sha256
    assert from_archive.manifest.source["kind"] == "archive"


def test_versions_current_marker_labels_and_use(tmp_path, dense_dir):
    store = tmp_path / "models"
    v2_folder = edited_copy(dense_dir, tmp_path / "v2", "second")
    assert models(store, "pull", str(dense_dir), "--name", "r1", "--label", "2026-11", "--quiet").code == 0
    assert models(store, "pull", str(v2_folder), "--name", "r1", "--label", "2026-12", "--keep-current",
                  "--quiet").code == 0
    s = ModelStore(store)
    first, second = s.versions("r1")
    assert s.resolve("r1").version == first.version  # --keep-current: the first stays current
    assert s.resolve("r1@2026-12").version == second.version
    assert s.resolve(f"r1@{second.version}").manifest.label == "2026-12"

    run = models(store, "use", "r1@2026-12")
    assert run.code == 0 and s.resolve("r1").version == second.version
    assert (store / "r1" / "current").readlink() == Path(second.version)

    listing = models(store, "list").stdout.splitlines()
    assert listing[0].split() == ["NAME", "VERSION", "CURRENT", "LABEL", "FORMAT", "QUANTIZATION", "SIZE", "USED", "BY"]
    assert [line.split()[:4] for line in listing[1:]] == [["r1", first.version, "2026-11", "huggingface"],
                                                         ["r1", second.version, "*", "2026-12"]]


def test_a_node_config_names_a_store_version(tmp_path, dense_dir):
    store = tmp_path / "models"
    assert models(store, "pull", str(dense_dir), "--name", "tiny", "--label", "prod", "--quiet").code == 0
    stored = ModelStore(store).resolve("tiny")
    for ref in ("tiny", f"tiny@{stored.version}", "tiny@prod"):
        config = load_config(node_config(tmp_path, ref, store))
        assert config.model.path == stored.path, ref
        assert config.model_version is not None
        assert (config.model_version.name, config.model_version.version, config.model_version.label) == (
            "tiny", stored.version, "prod")


def test_a_version_not_in_the_store_is_one_line_naming_file_key_and_value(tmp_path, dense_dir):
    store = tmp_path / "models"
    assert models(store, "pull", str(dense_dir), "--name", "tiny", "--quiet").code == 0
    version = ModelStore(store).resolve("tiny").version
    path = node_config(tmp_path, "tiny@0123456789ab", store)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}: model.path: tiny@0123456789ab is not in the model store {store} (versions of tiny: {version}) "
        "(got 'tiny@0123456789ab')"]
    assert load_config(path, check_paths=False).model_version is None  # a config for another host
    missing = node_config(tmp_path, "other", store)
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert "model.path: other is not in the model store" in str(info.value)


def test_check_config_cli_exits_1_on_a_missing_version(tmp_path, dense_dir):
    from tests.store.conftest import dsnode

    path = node_config(tmp_path, "tiny@feedfeedfeed", tmp_path / "models")
    run = dsnode("check-config", str(path))
    assert run.code == 1
    assert run.stdout.strip().splitlines() == [
        f"{path}: model.path: tiny is not in the model store {tmp_path / 'models'} (dsnode models pull …) "
        "(got 'tiny@feedfeedfeed')"]


def test_a_folder_next_to_the_config_still_wins_over_the_store(tmp_path, dense_dir):
    shutil.copytree(dense_dir, tmp_path / "tiny")
    config = load_config(node_config(tmp_path, "tiny", tmp_path / "models"))
    assert config.model.path == tmp_path / "tiny" and config.model_version is None


def test_rm_a_version_the_node_serves_is_refused_without_force(tmp_path, dense_dir):
    store = tmp_path / "models"
    v2_folder = edited_copy(dense_dir, tmp_path / "v2", "second")
    assert models(store, "pull", str(dense_dir), "--name", "r1", "--quiet").code == 0
    assert models(store, "pull", str(v2_folder), "--name", "r1", "--quiet").code == 0
    first, second = ModelStore(store).versions("r1")
    node = node_config(tmp_path, "r1", store)

    def rm(*args: str):
        from tests.store.conftest import dsnode

        return dsnode("models", "rm", *args, "--config", str(node))

    refused = rm("r1")
    assert refused.code == 1 and f"r1@{second.version} is what {node} serves" in refused.stderr
    assert rm(f"r1@{first.version}").code == 0  # not the served one
    assert [v.version for v in ModelStore(store).versions("r1")] == [second.version]
    forced = rm("r1", "--force")
    assert forced.code == 0 and ModelStore(store).names() == []
    assert files_under(store) == []


def test_rm_of_the_current_version_leaves_no_current_marker(tmp_path, dense_dir):
    store = tmp_path / "models"
    assert models(store, "pull", str(dense_dir), "--name", "r1", "--quiet").code == 0
    assert models(store, "pull", str(edited_copy(dense_dir, tmp_path / "v2", "x")), "--name", "r1", "--quiet").code == 0
    current = ModelStore(store).resolve("r1")
    run = models(store, "rm", current.ref)
    assert run.code == 0 and "r1 has no current version now: dsnode models use r1@VERSION" in run.stdout
    with pytest.raises(Exception, match="r1 has no current version"):
        ModelStore(store).resolve("r1")


def test_bad_local_input_is_one_line_and_leaves_nothing(tmp_path, dense_dir):
    store = tmp_path / "models"
    bert = shutil.copytree(dense_dir, tmp_path / "bert")
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    not_archive = tmp_path / "weights.bin"
    not_archive.write_bytes(b"x")
    cases = {
        (str(bert),): f"{bert}: unsupported architecture BertModel",
        (str(not_archive),): "not a model folder or an archive",
        (str(dense_dir), "--revision", "main"): "--revision applies to hub sources",
    }
    for args, message in cases.items():
        run = models(store, "pull", *args, "--quiet")
        assert run.code == 1 and message in run.stderr, (args, run.stderr)
        assert len(run.stderr.strip().splitlines()) <= 2, run.stderr  # "pulling …" and the error
    assert files_under(store) == []
    assert models(store, "rm", "nothing@here").code == 1
    assert models(store, "use", "nothing@here").stderr.strip() == (
        f"dsnode models use: error: nothing is not in the model store {store} (dsnode models pull …)")


def test_list_says_which_config_uses_a_version(tmp_path, dense_dir):
    from tests.store.conftest import dsnode

    store = tmp_path / "models"
    assert models(store, "pull", str(dense_dir), "--name", "tiny", "--quiet").code == 0
    node = node_config(tmp_path, "tiny", store)
    listed = json.loads(dsnode("models", "list", "--json", "--config", str(node)).stdout)  # store from [store]
    assert listed["store"] == str(store)
    (row,) = listed["models"]
    assert row["used_by"] == [str(node)] and row["current"] and row["bytes"] > 3_000_000


def test_a_store_that_cannot_be_written_is_one_line(tmp_path, dense_dir):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    run = models(blocker / "models", "pull", str(dense_dir), "--quiet")
    assert run.code == 1
    assert run.stderr.strip().splitlines() == [f"dsnode models pull: error: {blocker / 'models'}: Not a directory"]
