"""The `dsnode` command line. Each command lives in its own module; this file only dispatches.

The environment is read here and nowhere else: DSNODE_CONFIG (serve, models), DSNODE_CACHE (bundled
models), STATE_DIRECTORY (systemd's StateDirectory=: where `bench nccl --publish` writes and the node
reads), and for `models pull` the hub clients' HF_ENDPOINT, HF_TOKEN, MODELSCOPE_ENDPOINT,
MODELSCOPE_API_TOKEN.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .config import DEFAULT_CONFIG_PATH

Command = Callable[[argparse.Namespace], int]


def default_cache_dir() -> Path:
    if os.environ.get("DSNODE_CACHE"):
        return Path(os.environ["DSNODE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dsnode"


def _serve(args: argparse.Namespace) -> int:
    from .server import serve

    return serve(config_path(args.config), args.state_directory)


def _check_config(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config

    try:
        config = load_config(args.path, check_paths=not args.skip_paths)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 1
    if args.cluster:  # [routing.split] against what a node of the cluster serves
        from .ops.canary import cluster_split_problems
        from .ops.status import Unreachable

        try:
            problems = cluster_split_problems(args.cluster, config.routing.split)
        except Unreachable as exc:
            print(f"{args.path}: --cluster: {exc}")
            return 1
        for key, why in problems:
            print(f"{args.path}: {key}: {why}")
        if problems:
            return 1
    print(f"{args.path}: ok")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(cache_dir=args.cache_dir or default_cache_dir(), once=args.once, port=args.port)


def _models_build(args: argparse.Namespace) -> int:
    from .demo import prepare_models

    models = prepare_models(args.cache_dir or default_cache_dir(), onnx=not args.no_onnx)
    print(models.root)
    return 0


DESCRIPTION = """\
dsnode serves DeepSeek-R1-class models on your LAN behind one OpenAI-compatible API: edge nodes
(int8 ONNX) answer short requests and forward long ones to central nodes (MoE, DeepSpeed).
Start here: `dsnode demo`, or on a host `dsnode install-service --role edge` and `dsnode models pull`.
"""


def config_path(flag: str | Path | None) -> Path:
    return Path(flag or os.environ.get("DSNODE_CONFIG") or DEFAULT_CONFIG_PATH)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsnode", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dsnode {__version__}")
    parser.set_defaults(state_directory=os.environ.get("STATE_DIRECTORY"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon in the foreground (what systemd runs)")
    p.add_argument("--config", help=f"config file (default: $DSNODE_CONFIG or {DEFAULT_CONFIG_PATH})")
    p.set_defaults(func=_serve)

    p = sub.add_parser("check-config", help="validate a config file; print every problem")
    p.add_argument("path", type=Path)
    p.add_argument("--skip-paths", action="store_true",
                   help="don't check that the model folder and key files exist (a config for another host)")
    p.add_argument("--cluster", metavar="URL",
                   help="also check that some node serves each model and version [routing.split] names, as the "
                        "node at URL sees the cluster (GET /cluster)")
    p.set_defaults(func=_check_config)

    p = sub.add_parser("demo", help="a central and an edge node on loopback, on the bundled models")
    p.add_argument("--once", action="store_true", help="send one short and one long request, then exit")
    p.add_argument("--port", type=int, default=8400, help="first of the two loopback ports (default 8400)")
    p.add_argument("--cache-dir", type=Path, help="where bundled models are built (default ~/.cache/dsnode)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("models", help="the model store (pull, list, rm, use) and the bundled small models")
    models = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    b = models.add_parser("build", help="build (or find) the bundled models; prints their folder")
    b.add_argument("--cache-dir", type=Path)
    b.add_argument("--no-onnx", action="store_true", help="skip converting the dense model to int8 ONNX")
    b.set_defaults(func=_models_build)
    _register_store_commands(models)

    p = sub.add_parser("install-service", help="install (or --uninstall) dsnode as this host's systemd service")
    _register_install(p)

    for register in _extensions():
        register(sub)
    return parser


def _register_store_commands(models: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", type=Path, metavar="DIR",
                       help="the model store (default: the node config's [store] root, else /var/lib/dsnode/models)")
        p.add_argument("--config", help=f"the node config (default: $DSNODE_CONFIG or {DEFAULT_CONFIG_PATH})")

    p = models.add_parser("pull", help="fetch a model into the store, verified (resumes an interrupted pull)",
                          description="SOURCE: a Hugging Face repo id (owner/name; a mirror via HF_ENDPOINT, "
                          "a token via HF_TOKEN), modelscope:owner/name, or a local folder or archive.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--revision", help="branch, tag or commit (hub sources; default: main, or master on ModelScope)")
    p.add_argument("--name", help="the store name (default: the repo's or folder's name, lower case)")
    p.add_argument("--label", help="a name of your own for this version (NAME@LABEL resolves to it)")
    p.add_argument("--convert", choices=("int8", "int4"),
                   help="then run dsnode convert into NAME-int8 or NAME-int4 (with -cuda after it for --target "
                   "cuda; edge hosts)")
    p.add_argument("--target", choices=("auto", "cpu", "cuda"), default=None,
                   help="--convert: the ONNX Runtime provider it is for (default auto: cuda where onnxruntime "
                   "has its CUDA provider and an NVIDIA GPU is present, else cpu)")
    p.add_argument("--keep-current", action="store_true", help="don't make the new version the current one")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    common(p)
    p.set_defaults(func=_models_pull)
    p = models.add_parser("list", help="versions in the store: format, quantization, size, which config uses it")
    p.add_argument("--json", action="store_true")
    common(p)
    p.set_defaults(func=_models_list)
    p = models.add_parser("rm", help="remove NAME@VERSION, or every version of NAME")
    p.add_argument("ref", metavar="NAME[@VERSION]")
    p.add_argument("--force", action="store_true", help="even if the node config serves it")
    common(p)
    p.set_defaults(func=_models_rm)
    p = models.add_parser("use", help="make NAME@VERSION the version [model] path = \"NAME\" means")
    p.add_argument("ref", metavar="NAME@VERSION")
    common(p)
    p.set_defaults(func=_models_use)


def _store_and_node(args: argparse.Namespace) -> tuple[Any, Any]:
    from .ops.models import NodeConfig, store_for

    node = NodeConfig.read(config_path(args.config))
    return store_for(args.store, node), node


def _models_pull(args: argparse.Namespace) -> int:
    from .ops.models import Hubs, PullArgs, pull
    from .store.huggingface import DEFAULT_ENDPOINT

    hubs = Hubs(hf_endpoint=os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT, hf_token=os.environ.get("HF_TOKEN"),
                modelscope_endpoint=os.environ.get("MODELSCOPE_ENDPOINT") or None,
                modelscope_token=os.environ.get("MODELSCOPE_API_TOKEN") or None)
    store, _ = _store_and_node(args)
    pull_args = PullArgs(args.source, args.name, args.revision, args.label, args.convert, args.keep_current,
                         args.quiet, args.target)
    return pull(store, pull_args, hubs, Path.cwd())


def _models_list(args: argparse.Namespace) -> int:
    from .ops.models import list_models

    store, node = _store_and_node(args)
    return list_models(store, node, args.json)


def _models_rm(args: argparse.Namespace) -> int:
    from .ops.models import remove

    store, node = _store_and_node(args)
    return remove(store, args.ref, node, args.force)


def _models_use(args: argparse.Namespace) -> int:
    from .ops.models import use

    store, _ = _store_and_node(args)
    return use(store, args.ref)


def _register_install(p: argparse.ArgumentParser) -> None:
    from .ops.install import register

    register(p)


def _extensions() -> list[Callable[[argparse._SubParsersAction], None]]:  # type: ignore[type-arg]
    """Commands defined next to the code they drive (convert, status, bench, plan)."""
    registers = []
    for module_name in ("dsnode.edge.convert_cli", "dsnode.ops.status", "dsnode.ops.canary", "dsnode.ops.bench",
                        "dsnode.ops.plan"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        registers.append(module.register)
    return registers


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
