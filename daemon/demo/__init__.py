"""`dsnode demo`: a central and an edge node on loopback, serving the bundled models.

The central serves the DeepSeek-V3-architecture MoE model (transformers backend, CPU); the edge serves
the dense model as int8 ONNX and forwards prompts longer than `long_prompt_tokens` to the central.
Both are real `dsnode serve` processes with real config files, as on a LAN.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import headers
from ..processes import sigterm_when_parent_dies, stop_process
from .formats import curl_examples, show_formats

MODEL_NAME = "deepseek-r1-tiny"  # both nodes serve this name: the edge a distilled int8 variant
DEMO_LONG_PROMPT_TOKENS = 48
READY_TIMEOUT_S = 180.0
INTERRUPTED = 130  # a shell's exit status after SIGINT

SHORT_PROMPT = "It was the best of times"
LONG_PROMPT = (
    "We hold these truths to be self-evident, that all men are created equal, that they are endowed by "
    "their Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit "
    "of Happiness. Four score and seven years ago our fathers brought forth on this continent, a new "
    "nation, conceived in Liberty, and"
)


def prepare_models(cache_dir: Path, onnx: bool = True) -> Any:
    """The bundled models (built on first use) and, if the converter is installed, the int8 ONNX edge model."""
    from dsnode.central.bundled import ensure_bundled

    models = ensure_bundled(cache_dir, log=lambda m: print(f"[models] {m}", flush=True))
    if onnx and not _onnx_current(models.dense_onnx_int8):
        try:
            from dsnode.edge.convert import convert_model
        except ModuleNotFoundError as exc:
            print(f"[models] skipping the ONNX edge model: {exc}", flush=True)
            return models
        if models.dense_onnx_int8.exists():
            print("[models] converting the ONNX edge model again: its graph predates the last_position input",
                  flush=True)
            shutil.rmtree(models.dense_onnx_int8)
        convert_model(models.dense, models.dense_onnx_int8, quant="int8")
    return models


def _onnx_current(folder: Path) -> bool:
    """The bundled ONNX model is there, converted with today's graph (its `last_position` input: prompts
    scored at prefill speed). Without the converter installed, what is there is what can be had."""
    if not (folder / "manifest.json").exists():
        return False
    try:
        import onnx
        from dsnode.edge.manifest import LOGIT_POSITIONS, read_manifest
    except ModuleNotFoundError:
        return True
    graph = onnx.load(str(folder / read_manifest(folder).onnx_file), load_external_data=False).graph
    return LOGIT_POSITIONS in {i.name for i in graph.input}


@dataclass
class DemoNode:
    name: str
    url: str
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None


def node_configs(models: Any, work: Path, port: int) -> tuple[DemoNode, DemoNode]:
    central = DemoNode("central-1", f"http://127.0.0.1:{port}", work / "central.toml", work / "central.log")
    edge = DemoNode("edge-1", f"http://127.0.0.1:{port + 1}", work / "edge.toml", work / "edge.log")
    central.config.write_text(
        f"""[node]
name = "central-1"
role = "central"
listen = "127.0.0.1:{port}"

[model]
name = "{MODEL_NAME}"
path = "{models.moe}"
backend = "transformers"

[logging]
format = "json"
"""
    )
    onnx = (models.dense_onnx_int8 / "manifest.json").exists()
    edge.config.write_text(
        f"""[node]
name = "edge-1"
role = "edge"
listen = "127.0.0.1:{port + 1}"

[model]
name = "{MODEL_NAME}"
path = "{models.dense_onnx_int8 if onnx else models.dense}"
backend = "{'onnx' if onnx else 'transformers'}"

[routing]
long_prompt_tokens = {DEMO_LONG_PROMPT_TOKENS}

[[routing.upstream]]
url = "{central.url}"
weight = 1

[logging]
format = "json"
"""
    )
    return central, edge


def start(node: DemoNode) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(node.log, "wb") as out:
        node.process = subprocess.Popen(
            [sys.executable, "-m", "dsnode.cli", "serve", "--config", str(node.config)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            # a demo killed with SIGKILL takes its nodes along (the demo starts no threads of its own)
            preexec_fn=sigterm_when_parent_dies(),  # noqa: PLW1509
        )


def wait_ready(node: DemoNode, deadline: float) -> None:
    while time.monotonic() < deadline:
        assert node.process is not None
        if node.process.poll() is not None:
            raise RuntimeError(f"{node.name} exited with {node.process.returncode}; log: {node.log}\n{_tail(node.log)}")
        try:
            with urllib.request.urlopen(node.url + "/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{node.name} not ready after {READY_TIMEOUT_S:.0f}s; log: {node.log}")


def wait_for_upstreams(edge: DemoNode, deadline: float) -> None:
    """Until the edge has polled the central and sees it ready: before that, it can't forward."""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(edge.url + "/cluster", timeout=2) as resp:
                peers = json.loads(resp.read())["peers"]
            if peers and all(p["healthy"] for p in peers):
                return
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{edge.name} does not see its upstream as healthy; log: {edge.log}")


def stop(node: DemoNode) -> None:
    if node.process is not None:
        stop_process(node.process, grace_s=30)


def post(url: str, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.loads(resp.read()), dict(resp.headers)


def ask_twice(edge: DemoNode) -> bool:
    """One short chat request (answered by the edge) and one long completion (forwarded)."""
    ok = True
    for label, expected, path, body in (
        ("short", "local", "/v1/chat/completions",
         {"model": MODEL_NAME, "messages": [{"role": "user", "content": SHORT_PROMPT}], "max_tokens": 32,
          "temperature": 0}),
        ("long", "forwarded", "/v1/completions",
         {"model": MODEL_NAME, "prompt": LONG_PROMPT, "max_tokens": 24, "temperature": 0}),
    ):
        try:
            answer, got = post(edge.url, path, body)
        except urllib.error.HTTPError as exc:
            print(f"\n{label} request failed: HTTP {exc.code}: {exc.read().decode(errors='replace')}")
            ok = False
            continue
        choice = answer["choices"][0]
        text = choice.get("message", {}).get("content") if "message" in choice else choice.get("text")
        route = got.get(headers.ROUTE)
        print(f"\n{label} prompt ({answer['usage']['prompt_tokens']} tokens) → served by "
              f"{got.get(headers.NODE)} ({headers.ROUTE}: {route})")
        if route != expected:
            print(f"  expected {headers.ROUTE}: {expected}")
            ok = False
        print(f"  prompt: {body.get('prompt') or SHORT_PROMPT!r}"[:160])
        print(f"  answer: {text!r}")
    return ok


def banner(central: DemoNode, edge: DemoNode, work: Path) -> None:
    edge_model = "dense model, int8 ONNX" if "backend = \"onnx\"" in edge.config.read_text() else "dense model, transformers"
    long_body = json.dumps({"model": MODEL_NAME, "prompt": LONG_PROMPT, "max_tokens": 24})
    responses_body = json.dumps({"model": MODEL_NAME, "input": "Think step by step: Four score and",
                                 "max_output_tokens": 64, "temperature": 0})
    print(f"""
dsnode demo is running
  central  {central.url}   (MoE model, transformers)   log: {central.log}
  edge     {edge.url}   ({edge_model})    log: {edge.log}
  configs  {work}

Try it through the edge. A short prompt is answered by the edge itself:
  curl -s {edge.url}/v1/chat/completions -H 'Content-Type: application/json' -i \\
    -d '{{"model": "{MODEL_NAME}", "messages": [{{"role": "user", "content": "{SHORT_PROMPT}"}}], "max_tokens": 32}}'
Prompts over {DEMO_LONG_PROMPT_TOKENS} tokens are forwarded to the central (see X-DSNode-Node / X-DSNode-Route):
  curl -s {edge.url}/v1/completions -H 'Content-Type: application/json' -i \\
    -d '{long_body}'
The bundled models know a few examples of reasoning, tool calls and JSON answers (docs/clients.md):
{curl_examples(edge.url, MODEL_NAME)}
OpenAI's Responses API, the same model (an output item for the reasoning, one for the answer):
  curl -s {edge.url}/v1/responses -H 'Content-Type: application/json' \\
    -d '{responses_body}'
The cluster as the edge sees it:
  {dsnode_command()} status --url {edge.url}

Press Ctrl-C to stop.""", flush=True)


def run_demo(cache_dir: Path, once: bool, port: int) -> int:
    for stopping in _STOP_SIGNALS:  # `kill`, a closed terminal: as Ctrl-C, at any point of the demo
        signal.signal(stopping, _interrupted)
    models = prepare_models(cache_dir)
    work = Path(tempfile.mkdtemp(prefix="dsnode-demo-"))
    central, edge = node_configs(models, work, port)
    nodes = (central, edge)
    code = 1  # until it has gone well: then the folder of configs and logs is removed, else kept
    try:
        for node in nodes:
            start(node)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for node in nodes:
            wait_ready(node, deadline)
        wait_for_upstreams(edge, deadline)
        if once:
            routed = ask_twice(edge)
            code = 0 if show_formats(edge.url, MODEL_NAME) and routed else 1
            return code
        banner(central, edge, work)
        _wait_for_interrupt()
        code = 0
        return code
    except RuntimeError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the banner: still starting
        code = 0  # nothing failed: the folder goes
        return INTERRUPTED if once else 0  # a check that did not run did not pass
    finally:
        for node in reversed(nodes):
            stop(node)
        _clean_up(work, keep=code != 0, interactive=not once)


def _clean_up(work: Path, keep: bool, interactive: bool) -> None:
    if keep:
        print(f"the demo's configs and logs are kept in {work}", file=sys.stderr)
        return
    shutil.rmtree(work, ignore_errors=True)
    if interactive:
        with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
            print(f"\nstopped both nodes; removed {work}", flush=True)


def dsnode_command() -> str:
    """How to run this dsnode from any shell: the venv's script by its full path (`make demo` does not
    put .venv/bin on PATH), else the interpreter with -m."""
    script = Path(sys.executable).parent / "dsnode"
    return str(script) if script.is_file() else f"{sys.executable} -m dsnode.cli"


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _wait_for_interrupt() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    signal.sigwait(_STOP_SIGNALS)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
