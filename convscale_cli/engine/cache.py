"""Two caches of compiled programs: JAX's persistent compilation cache on disk, and one in memory for this process.

A sweep trains many runs of the same few models; with the schedule's numbers injected as arrays
(:class:`convscale_cli.engine.optim.WarmupCosine`) their steps lower to identical XLA programs, so each program is
compiled once per machine and later runs (and later processes) load it from disk in a fraction of a second.

The disk cache spares XLA's compilation, not JAX's tracing and lowering of the step, which must happen before the
disk cache can be asked. For small models on a CPU that is most of a short run: 2-7 s per run for the tiny NFNets,
more than their training in the quickstart. :func:`program` keeps the compiled executables of this process under a
key naming everything the program depends on, so the later runs of a model in one process (the trials of the
two-trial rule, the cells of a sweep) reuse them without tracing at all.

Environment:
    CONVSCALE_COMPILATION_CACHE: cache directory (default ``~/.cache/convscale/xla``); ``off`` disables it.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

import jax

T = TypeVar("T")

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


PROGRAMS_KEPT = 16  # compiled executables kept in memory; least recently used first out
_programs: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
_stats = {"hits": 0, "misses": 0}


def program(key: tuple[Any, ...], compile: Callable[[], T]) -> T:
    """``compile()``'s result, computed once per process for each ``key``: a compiled program, or the traced shapes
    of one.

    ``key`` must name everything the program depends on besides this process's JAX configuration, which is added
    (:func:`jax_context`). Flax modules compare by their fields, so two builds of the same model with the same
    options are one key; a key that cannot be hashed (a plugin module with a list-valued field, say) is compiled
    every time, never shared.
    """
    full = (*key, jax_context())
    try:
        hit = full in _programs
    except (TypeError, ValueError):  # unhashable, or an array-valued field whose == is elementwise
        _stats["misses"] += 1
        return compile()
    if hit:
        _stats["hits"] += 1
        _programs.move_to_end(full)
        return _programs[full]
    _stats["misses"] += 1
    value = compile()
    _programs[full] = value
    while len(_programs) > PROGRAMS_KEPT:
        _programs.popitem(last=False)
    return value


def tree_key(tree: Any) -> tuple[Any, ...]:
    """A hashable stand-in for a pytree of ``jax.ShapeDtypeStruct`` (with shardings) or other hashable leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple(leaves))


def jax_context() -> tuple[Any, ...]:
    """The process-wide JAX settings that change what a traced function lowers to."""
    return (
        jax.default_backend(),
        jax.config.jax_threefry_partitionable,
        jax.config.jax_enable_x64,
        jax.config.jax_default_matmul_precision,
    )


def program_stats() -> dict[str, int]:
    """Hits and misses of :func:`program` in this process (for tests and benchmarks)."""
    return dict(_stats, kept=len(_programs))


def clear_programs() -> None:
    """Forget every compiled program of this process."""
    _programs.clear()
    _stats.update(hits=0, misses=0)
