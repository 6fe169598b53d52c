"""`dsnode canary status|promote|rollback|reset`, the splits in `dsnode status`, and `dsnode
check-config --cluster URL`, against a live node whose model folder is a store version."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest_asyncio
from dsnode.api.app import create_app
from dsnode.cli import main
from dsnode.store.manifest import FileRecord, VersionManifest, content_sha256

from tests.daemon.api.conftest import MODEL, config_text, make_node

VERSION = "0a1b2c3d4e5f"
SPLIT = f'[routing.split."{MODEL}"]\n"v1" = 90\n"v2" = 10\n'


def store_version(folder: Path, source: Path) -> Path:
    """`source` copied into a folder with a store manifest: version VERSION, label v1."""
    shutil.copytree(source, folder)
    files = {"config.json": FileRecord(1, "00" * 32)}
    manifest = VersionManifest(MODEL, VERSION, {"kind": "folder", "path": str(source)}, content_sha256(files), files,
                               "huggingface", "none", "FakeForCausalLM", "2026-11-30T00:00:00Z", "test", "v1")
    (folder / "dsnode-version.json").write_text(manifest.to_json())
    return folder


@pytest_asyncio.fixture
async def url(tmp_path, stub_model_dir, fake_engines, aiohttp_server):  # noqa: F811
    model_dir = store_version(tmp_path / "tiny-dense" / VERSION, stub_model_dir)
    node = await make_node(tmp_path, model_dir, fake_engines, extra=SPLIT)
    assert node.served.id == VERSION and node.served.label == "v1"
    server = await aiohttp_server(create_app(node))
    yield str(server.make_url("")).rstrip("/")
    await node.engine.close()


async def cli(*args: str) -> int:
    return await asyncio.to_thread(main, list(args))


async def test_canary_commands_show_and_change_the_split(url, capsys):
    assert await cli("canary", "status", "--url", url) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(MODEL)]
    assert rows == [[MODEL, "v1", "90%", "90%", "baseline", "0", "-", "-", "-"],
                    [MODEL, "v2", "10%", "10%", "canary", "0", "-", "-", "-"]]
    assert f"problem: routing.split.{MODEL}.v2: no node serves version v2 of `{MODEL}` " \
           f"(versions served: {VERSION} (v1))" in out

    assert await cli("status", "--url", url) == 0
    status = capsys.readouterr().out
    assert f"{VERSION} (v1)" in status.splitlines()[1] and "splits (requests for a model" in status

    assert await cli("canary", "promote", MODEL, "--url", url) == 0
    assert f"{MODEL} v2: promoted" in capsys.readouterr().out.splitlines()
    assert await cli("canary", "rollback", MODEL, "v2", "--url", url) == 1
    err = capsys.readouterr().err
    assert "HTTP 409" in err and "v2 is the baseline" in err
    assert await cli("canary", "reset", MODEL, "--url", url) == 0
    assert await cli("canary", "rollback", MODEL, "--url", url) == 0
    assert f"{MODEL} v2: rolled back" in capsys.readouterr().out.splitlines()
    assert await cli("canary", "status", "--url", url, "--json") == 0
    out = capsys.readouterr().out  # this process's log lines (the node's) may come first
    [split] = json.loads(out[out.find("{\n"):])["splits"]
    assert [(v["version"], v["share"], v["state"]) for v in split["versions"]] == [
        ("v1", 100, "baseline"), ("v2", 0, "rolled_back")]
    assert split["decisions"][0]["by"] == "operator"


async def test_check_config_asks_the_cluster_what_it_serves(url, tmp_path, stub_model_dir, capsys):  # noqa: F811
    path = tmp_path / "edge.toml"
    path.write_text(config_text(stub_model_dir, extra=f'[routing.split."{MODEL}"]\n"v1" = 50\n"v9" = 50\n\n'
                                                      '[routing.split.ghost]\n"a" = 100\n'))
    assert await cli("check-config", str(path)) == 0  # the file alone is fine
    capsys.readouterr()
    assert await cli("check-config", str(path), "--cluster", url) == 1
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(path))] == [
        f"{path}: routing.split.{MODEL}.v9: no node serves version v9 of `{MODEL}` (versions served: {VERSION} (v1))",
        f"{path}: routing.split.ghost: no node serves a model `ghost` (models served: {MODEL})",
    ]
    path.write_text(config_text(stub_model_dir, extra=f'[routing.split."{MODEL}"]\n"{VERSION}" = 100\n'))
    assert await cli("check-config", str(path), "--cluster", url) == 0


KEY, SECRET = "sk-canary-test-key", "a-cluster-secret-of-enough-length-0123456789"


@pytest_asyncio.fixture
async def guarded_url(tmp_path, stub_model_dir, fake_engines, aiohttp_server):  # noqa: F811
    """The node of `url`, with API keys and a cluster secret."""
    (tmp_path / "keys").write_text(f"operator: {KEY}\n")
    (tmp_path / "cluster.secret").write_text(SECRET + "\n")
    model_dir = store_version(tmp_path / "tiny-dense" / VERSION, stub_model_dir)
    auth = f'[auth]\napi_keys_file = "{tmp_path / "keys"}"\ncluster_secret_file = "{tmp_path / "cluster.secret"}"\n'
    node = await make_node(tmp_path, model_dir, fake_engines, extra=SPLIT + auth)
    server = await aiohttp_server(create_app(node))
    yield str(server.make_url("")).rstrip("/")
    await node.engine.close()


async def test_canary_decisions_are_signed_with_the_cluster_secret(guarded_url, tmp_path, capsys):
    assert await cli("canary", "promote", MODEL, "--url", guarded_url) == 1
    assert "HTTP 401" in capsys.readouterr().err
    secret = ("--secret-file", str(tmp_path / "cluster.secret"))
    assert await cli("canary", "promote", MODEL, "--url", guarded_url, *secret) == 0  # a signed POST
    assert f"{MODEL} v2: promoted" in capsys.readouterr().out.splitlines()
    key = ("--api-key-file", str(tmp_path / "key"))
    (tmp_path / "key").write_text(KEY + "\n")
    assert await cli("canary", "status", "--url", guarded_url, *key) == 0  # an API key may look
    assert await cli("canary", "reset", MODEL, "--url", guarded_url, *key) == 1  # not decide
    assert "HTTP 403" in capsys.readouterr().err
    assert await cli("canary", "reset", MODEL, "--url", guarded_url, *secret) == 0
    (tmp_path / "wrong.secret").write_text("another-secret-of-enough-length-0123456789\n")
    assert await cli("canary", "status", "--url", guarded_url, "--secret-file", str(tmp_path / "wrong.secret")) == 1
    assert "HTTP 401" in capsys.readouterr().err
