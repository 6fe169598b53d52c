"""The wheel carries every package of the source tree: `[tool.setuptools] packages` lists them one by
one (the tree's folders are renamed into `dsnode.*`), so a new subpackage that is not listed would be
missing from an installed node (an editable install, as the tests use, does not notice)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_in_the_wheel():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = {name: ROOT / (folder if name != "dsnode" else "daemon")
               for name, folder in {"dsnode": "daemon", **setuptools["package-dir"]}.items()}
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            if "__pycache__" not in parts:
                found.add(".".join((name, *parts)))
    assert found - listed == set(), "packages missing from pyproject.toml's [tool.setuptools] packages"
