"""JAX's persistent compilation cache, on by default for convscale runs.

A sweep trains many runs of the same few models; with the schedule's numbers injected as arrays
(:class:`convscale_cli.engine.optim.WarmupCosine`) their steps lower to identical XLA programs, so each program is
compiled once per machine and later runs (and later processes) load it from disk in a fraction of a second.

Environment:
    CONVSCALE_COMPILATION_CACHE: cache directory (default ``~/.cache/convscale/xla``); ``off`` disables it.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "CONVSCALE_COMPILATION_CACHE"


def cache_dir() -> Path | None:
    """The configured cache directory, or None when disabled."""
    raw = os.environ.get(ENV, "").strip()
    if raw.lower() in {"off", "0", "false", "none"}:
        return None
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "convscale" / "xla"


def enable_compilation_cache() -> Path | None:
    """Point JAX's persistent compilation cache at :func:`cache_dir` (idempotent); returns the directory."""
    path = cache_dir()
    if path is None:
        return None
    if jax.config.jax_compilation_cache_dir != str(path):
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        # Tiny models compile in about a second on a laptop; caching those is still a clear win for sweeps.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path
