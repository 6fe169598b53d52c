"""The edge run-time path needs no torch and no transformers.

A real `dsnode serve` (role edge, backend onnx) runs in a subprocess whose `sitecustomize.py` makes
importing torch or transformers impossible, and records every attempt and, at exit, every loaded module.
It must serve a real request; the distributions it loaded must fit an edge host (< 300 MB installed).
"""

from __future__ import annotations

import importlib.metadata
import json
import textwrap
import urllib.request
from pathlib import Path

import pytest

from tests.support.nodes import ServeProcess, free_port, node_toml

pytestmark = pytest.mark.slow

BLOCKER = textwrap.dedent(
    """
    import atexit, json, os, sys

    BLOCKED = ("torch", "transformers")
    attempts = []

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ModuleNotFoundError(f"{name} is blocked on this edge host", name=name)
            return None

    sys.meta_path.insert(0, NoTorch())

    def report():
        with open(os.environ["DSNODE_IMPORT_REPORT"], "w") as f:
            json.dump({"attempts": attempts, "modules": sorted(sys.modules)}, f)

    atexit.register(report)
    """
)
EDGE_BUDGET_BYTES = 300 * 2**20


def installed_bytes(modules: list[str]) -> dict[str, int]:
    """Installed size of every distribution that provides one of `modules` (stdlib excluded)."""
    providers = importlib.metadata.packages_distributions()
    names = {dist for module in modules for dist in providers.get(module.split(".")[0], [])}
    sizes = {}
    for name in sorted(names):
        files = importlib.metadata.distribution(name).files or []
        sizes[name] = sum(f.locate().stat().st_size for f in files if Path(f.locate()).is_file())
    return sizes


@pytest.fixture(scope="module")
def edge(tmp_path_factory, int8_dir):
    work = tmp_path_factory.mktemp("edge-no-torch")
    (work / "site").mkdir()
    (work / "site" / "sitecustomize.py").write_text(BLOCKER)
    port = free_port()
    config = work / "dsnode.toml"
    config.write_text(node_toml("edge-no-torch", "edge", port, "tiny-edge", int8_dir, "onnx"))
    env = {"PYTHONPATH": str(work / "site"), "DSNODE_IMPORT_REPORT": str(work / "imports.json")}
    node = ServeProcess("edge-no-torch", config, port, work / "edge.log", env=env).start()
    try:
        node.wait_ready(timeout=60)
        yield node, work / "imports.json"
    finally:
        node.stop()


def test_edge_serves_without_torch_or_transformers(edge):
    node, report_path = edge
    body = {"model": "tiny-edge", "prompt": "It was the best", "max_tokens": 14, "temperature": 0}
    request = urllib.request.Request(node.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
        assert response.headers["X-DSNode-Node"] == "edge-no-torch"
    assert answer["choices"][0]["text"].startswith(" of times, it was the worst of times")
    with urllib.request.urlopen(node.url + "/cluster", timeout=10) as response:
        advert = json.loads(response.read())
    model = advert["node"]["models"][0]
    assert (model["backend"], model["device"], model["quantization"]) == ("onnx", "CPUExecutionProvider", "int8")

    assert node.stop() == 0, node.log_tail()
    report = json.loads(report_path.read_text())
    assert report["attempts"] == [], "something on the edge path tried to import torch/transformers"
    loaded = report["modules"]
    assert "onnxruntime" in loaded and "dsnode.edge.onnx_engine" in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("torch", "transformers")]
    sizes = installed_bytes(loaded)
    total = sum(size for name, size in sizes.items() if name != "dsnode")
    print(f"edge run-time distributions: {total / 2**20:.0f} MB", {k: f"{v / 2**20:.1f}" for k, v in sizes.items()})
    assert total < EDGE_BUDGET_BYTES
