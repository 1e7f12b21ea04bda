"""Choosing and opening a run's experiment trackers (``--tracker``, the ``trackers`` config key).

Every run writes ``metrics.jsonl`` itself (the ``jsonl`` tracker: always on, since resuming and ``convscale report``
read it). Other trackers come from plugins through the ``register_trackers`` hook (built in: ``tensorboard``,
``wandb``, ``mlflow``). They are chosen and their packages checked before anything compiles, so a missing ``wandb``
is one ``Error:`` line, not a failure after the first compile. jax-free.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from convscale_cli.errors import UnknownNameError, UsageError
from convscale_cli.registry import Registry, Tracker, TrackerSpec

ALWAYS = "jsonl"  # RUN/metrics.jsonl, written by every run
DEFAULT = ("tensorboard",)  # opened when no tracker is named, if registered and installed


class TrackerWarning(UserWarning):
    """A tracker could not be used; the run goes on without it (its metrics.jsonl is complete)."""


def _installed(spec: TrackerSpec) -> bool:
    return not spec.requires or importlib.util.find_spec(spec.requires) is not None


def choose_trackers(registry: Registry, names: Sequence[str] | None, *, tensorboard: bool = True) -> list[TrackerSpec]:
    """The trackers a run opens besides ``metrics.jsonl``.

    Args:
        registry: where trackers are registered.
        names: the trackers asked for (``jsonl`` is always on and may be named); None: the default, TensorBoard
            when it is registered and installed (``tensorboard=False`` turns it off).

    Raises:
        UnknownNameError: a tracker no plugin registers (close matches suggested).
        UsageError: a named tracker whose package is not installed (how to install it is said).
    """
    if names is None:
        chosen = [registry.trackers.get(n) for n in DEFAULT if tensorboard and n in registry.trackers]
        for spec in [s for s in chosen if not _installed(s)]:
            warnings.warn(
                f"tracker {spec.name!r} is off: {spec.requires} is not installed ({spec.install})",
                TrackerWarning,
                stacklevel=2,
            )
        return [s for s in chosen if _installed(s)]
    specs = []
    for name in dict.fromkeys(names):
        if name == ALWAYS:
            continue
        if name not in registry.trackers:
            raise UnknownNameError("tracker", name, [ALWAYS, *registry.trackers.names()])
        spec = registry.trackers.get(name)
        if not _installed(spec):
            raise UsageError(
                f"tracker {name!r} needs the {spec.requires!r} package, which is not installed: {spec.install}"
            )
        specs.append(spec)
    return specs


def open_trackers(specs: Sequence[TrackerSpec], run_dir: Path, config: Mapping[str, Any]) -> list[tuple[str, Tracker]]:
    """Open each tracker for the run in ``run_dir`` and give it the resolved config.

    Raises:
        UsageError: a tracker failed to start (its error named); the ones already open are closed.
    """
    opened: list[tuple[str, Tracker]] = []
    for spec in specs:
        try:
            tracker = spec.open(run_dir, run_dir.absolute().name)
            opened.append((spec.name, tracker))
            tracker.log_config(config)
        except Exception as exc:
            close_trackers(opened)
            raise UsageError(f"tracker {spec.name!r} failed to start: {type(exc).__name__}: {exc}") from exc
    return opened


def close_trackers(trackers: Sequence[tuple[str, Tracker]]) -> None:
    """Close every tracker; one that fails to close is reported, the others still close."""
    for name, tracker in trackers:
        try:
            tracker.close()
        except Exception as exc:  # a tracker's failure never fails a run whose own files are complete
            warnings.warn(
                f"tracker {name!r} failed to close: {type(exc).__name__}: {exc}", TrackerWarning, stacklevel=2
            )
