"""``summary.json``: what a finished (or stopped) run records, the same layout for every kind of run."""

from __future__ import annotations

import importlib.metadata
import platform

DISTRIBUTIONS = ("convscale", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain")


def versions() -> dict[str, str]:
    """The versions of Python and of the installed packages a run's numbers depend on."""
    out = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


__all__ = ["versions"]
