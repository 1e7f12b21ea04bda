"""No module reaches into another module's private names (``from m import _x``, ``m._x``).

A name with a leading underscore is its module's own: a test or a sibling that needs it is asking for a public,
documented function. Private *modules* (``cli/_output.py``) may be imported by their own package.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("convscale_cli", "plugins", "tests", "tools", "benchmarks", "examples")
OURS = ("convscale_cli", "convscale_plugins")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@functools.cache
def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    modules: set[str] = set()  # local names bound to one of our modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if node.module.split(".")[0] in OURS and _is_module(full):
                    modules.add(alias.asname or alias.name)  # a module, private or not, of our packages
                elif _private(alias.name):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OURS or alias.name.startswith("test_"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if _private(node.attr):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    found = [v for root in ROOTS for path in sorted((REPO / root).rglob("*.py")) for v in _violations(path)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_check_sees_a_private_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "m.py").write_text("import convscale_cli.plugins as p\nfrom x import _y\np._CACHE = None\n")
    assert _violations(tmp_path / "m.py") == ["m.py:2: from x import _y", "m.py:3: p._CACHE"]
