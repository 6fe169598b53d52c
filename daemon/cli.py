"""The `dsnode` command line. Each command lives in its own module; this file only dispatches.

The environment is read here and nowhere else: DSNODE_CONFIG (serve), DSNODE_CACHE (bundled models),
STATE_DIRECTORY (systemd's StateDirectory=: where `bench nccl --publish` writes and the node reads).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

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

    path = args.config or os.environ.get("DSNODE_CONFIG") or str(DEFAULT_CONFIG_PATH)
    return serve(Path(path), args.state_directory)


def _check_config(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config

    try:
        load_config(args.path, check_paths=not args.skip_paths)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsnode", description=__doc__.splitlines()[0] if __doc__ else None)
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
    p.set_defaults(func=_check_config)

    p = sub.add_parser("demo", help="a central and an edge node on loopback, on the bundled models")
    p.add_argument("--once", action="store_true", help="send one short and one long request, then exit")
    p.add_argument("--port", type=int, default=8400, help="first of the two loopback ports (default 8400)")
    p.add_argument("--cache-dir", type=Path, help="where bundled models are built (default ~/.cache/dsnode)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("models", help="the bundled small models")
    models = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    b = models.add_parser("build", help="build (or find) the bundled models; prints their folder")
    b.add_argument("--cache-dir", type=Path)
    b.add_argument("--no-onnx", action="store_true", help="skip converting the dense model to int8 ONNX")
    b.set_defaults(func=_models_build)

    for register in _extensions():
        register(sub)
    return parser


def _extensions() -> list[Callable[[argparse._SubParsersAction], None]]:  # type: ignore[type-arg]
    """Commands defined next to the code they drive (convert, status, bench, plan)."""
    registers = []
    for module_name in ("dsnode.edge.convert_cli", "dsnode.ops.status", "dsnode.ops.bench", "dsnode.ops.plan"):
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
