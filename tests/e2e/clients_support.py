"""Two real `dsnode serve` processes for the client tests: a central (transformers, the bundled MoE) and
an edge (int8 ONNX, the bundled dense model) with the central as its upstream.

They serve different names so each route can be asked for: `CENTRAL_MODEL` at the central (direct) or
at the edge (forwarded: only the central serves it), `EDGE_MODEL` at the edge (its ONNX engine).
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.nodes import ServeProcess, free_port, node_toml

CENTRAL_MODEL = "deepseek-r1-tiny"
EDGE_MODEL = "deepseek-r1-tiny-edge"
THINK_PROMPT = "Think step by step: Four score and"


@dataclass(frozen=True)
class Route:
    """One way to reach an engine: `url` (a node) asked for `model`."""

    name: str  # "central", "edge", "edge→central"
    url: str
    model: str
    node: str  # the node that generates the answer


def start_pair(work: Path, moe_dir: Path, onnx_dir: Path) -> tuple[ServeProcess, ServeProcess]:
    central_port, edge_port = free_port(), free_port()
    central_config = work / "central.toml"
    central_config.write_text(node_toml("central-c", "central", central_port, CENTRAL_MODEL, moe_dir, "transformers"))
    central = ServeProcess("central-c", central_config, central_port, work / "central.log").start()
    routing = (f'[routing]\nlong_prompt_tokens = 400\npoll_interval = 0.5\nfirst_token_timeout = 120\n\n'
               f'[[routing.upstream]]\nurl = "{central.url}"\n')
    edge_config = work / "edge.toml"
    edge_config.write_text(node_toml("edge-c", "edge", edge_port, EDGE_MODEL, onnx_dir, "onnx", extra=routing))
    edge = ServeProcess("edge-c", edge_config, edge_port, work / "edge.log").start()
    central.wait_ready(timeout=180)
    edge.wait_ready(timeout=180)
    edge.wait_peers_healthy(60.0)
    return central, edge


def post(url: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
