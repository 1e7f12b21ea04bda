"""Lazy package exports (PEP 562), so importing a package never pulls in jax or grain before a name is used.

The pattern of scientific-python's ``lazy_loader.attach``: a package lists which submodule defines each public name,
and its module-level ``__getattr__`` imports that submodule on first access and caches the value in the package.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def attach(
    package: str, lazy: Mapping[str, str], public: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, where ``lazy`` maps each lazy name to its submodule.

    Args:
        package: the package's ``__name__``.
        lazy: public name -> submodule (relative to ``package``) that defines it.
        public: every name ``dir(package)`` lists (the lazy ones and those the package defines itself).
    """
    listed = sorted(public)

    def __getattr__(name: str) -> Any:
        if name not in lazy:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{lazy[name]}"), name)
        setattr(sys.modules[package], name, value)  # later look-ups find it without calling __getattr__
        return value

    def __dir__() -> list[str]:
        return listed

    return __getattr__, __dir__
