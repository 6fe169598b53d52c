"""The layer rule, as a test: imports only point down, and no module imports itself round a circle.

    cli → commands (demo, ops) → server → api → metrics → node → engines (edge, central)
        → core (cluster, inference) → ground floor (config, headers, record, secrets, logs, journal,
          systemd, probe, gpu, hfconfig, nccl_result)

A module may import its own package and anything on a lower floor; never a floor above, nor a sibling
package on its own floor (cluster and inference know nothing of each other; nor do edge and central).
Lazy imports inside functions count: they are dependencies all the same. Engines are loaded by name
(`dsnode.inference.backends`), not imported, so the core never names them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"dsnode": ROOT / "daemon", "dsnode.edge": ROOT / "edge", "dsnode.central": ROOT / "central"}

# floor → the packages and ground-floor modules on it (higher number: higher floor)
FLOORS: dict[int, tuple[str, ...]] = {
    8: ("dsnode.cli",),
    7: ("dsnode.demo", "dsnode.ops"),
    6: ("dsnode.server",),
    5: ("dsnode.api",),
    4: ("dsnode.metrics",),
    3: ("dsnode.node",),
    2: ("dsnode.edge", "dsnode.central"),
    1: ("dsnode.cluster", "dsnode.inference"),
    0: ("dsnode",),  # the ground floor: every other module of the dsnode package itself
}


def unit_of(module: str) -> tuple[int, str]:
    """(floor, the package or module that is one unit on it) of a dsnode module."""
    best = ("dsnode", 0)
    for floor, units in FLOORS.items():
        for unit in units:
            if (module == unit or module.startswith(unit + ".")) and len(unit) > len(best[0]):
                best = (unit, floor)
    unit, floor = best
    if unit == "dsnode":  # ground floor: each module is its own unit (config may import secrets)
        return 0, "dsnode"
    return floor, unit


def module_names() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The dsnode modules `module` imports, anywhere in its text."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name.startswith("dsnode")}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module)
            if not base.startswith("dsnode"):
                continue
            named = {f"{base}.{alias.name}" for alias in node.names} & known
            out |= named or {base}
    return {name for name in out if name in known and name != module}


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    parts = module.split(".")
    anchor = parts if is_package else parts[:-1]
    anchor = anchor[: len(anchor) - (level - 1)]
    return ".".join(anchor + ([name] if name else []))


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        floor, unit = unit_of(module)
        for target in sorted(targets):
            t_floor, t_unit = unit_of(target)
            if t_floor > floor or (t_floor == floor and t_unit != unit and floor > 0):
                bad.append(f"{module} (floor {floor}) imports {target} (floor {t_floor})")
    return bad


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, found by depth-first search (each reported once, from its first module)."""
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in path:
                circle = path[path.index(target):] + [target]
                if not any(set(circle) == set(c) for c in found):
                    found.append(circle)
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    names = module_names()
    return {module: imports_of(module, path, set(names)) for module, path in names.items()}


def test_every_import_points_down(graph):
    assert upward_imports(graph) == []


def test_no_module_imports_itself_round_a_circle(graph):
    assert circles(graph) == []


def test_the_rule_catches_an_api_module_imported_from_below(graph):
    """The checks above would fail on the layering the project had before (config → api.auth) and
    on a circle: shown on the real graph with one import added."""
    broken = {module: set(targets) for module, targets in graph.items()}
    broken["dsnode.config"].add("dsnode.api.auth")
    assert upward_imports(broken) == ["dsnode.config (floor 0) imports dsnode.api.auth (floor 5)"]
    assert circles(broken), "config → api.auth → … → config is a circle"
    sideways = {module: set(targets) for module, targets in graph.items()}
    sideways["dsnode.cluster.balancer"].add("dsnode.inference.engine")
    assert upward_imports(sideways) == [
        "dsnode.cluster.balancer (floor 1) imports dsnode.inference.engine (floor 1)"]


def test_the_graph_is_the_real_one(graph):
    """Guards the walker itself: relative, absolute and lazy imports are all seen."""
    assert "dsnode.api.app" in graph["dsnode.server"]  # from .api.app import create_app
    assert "dsnode.headers" in graph["dsnode.api.completions"]  # from .. import headers
    assert "dsnode.inference.batching" in graph["dsnode.edge.onnx_engine"]  # absolute
    assert "dsnode.server" in graph["dsnode.cli"]  # lazy, inside a function
    assert len(graph) > 60
