"""Reading a runs directory: the one walk behind ``report``, ``plan --from``, ``tune-lr``, ``sweep`` and the quickstart.

A runs directory holds run directories, possibly nested (``sweep/f0-e1-lr1.6``, a branching study's
``trunks/...``, a quickstart's ``finetune-digits``). A run directory is one with a ``summary.json`` or a file the
engine writes before it (``config.json``, ``metrics.jsonl``, ``checkpoints``); the walk never descends into one. Which
runs a caller wants is said with two explicit filters:

- ``statuses``: the ``summary.json`` statuses kept. :data:`COMPLETE` (``finished`` and ``budget``, a run stopped by
  its compute budget being a complete data point of a budgeted study, Smith et al. 2023 §3) by default;
  :data:`FINISHED` for ``finished`` only; None for every status, the paused trunks of a branching sweep included.
  With a status filter a paused trunk is left out silently (its branches are the study's runs); a run of another
  status is listed as skipped, with the reason.
- ``max_depth``: how many directory levels below ``runs_dir`` are searched (1: its direct children only).

``kinds`` keeps only ``pretrain`` or ``finetune`` runs (a summary without a kind is a pre-training run); runs of
another kind are left out silently. Unreadable summaries and run directories without one are listed as skipped, so one
broken run never hides the rest of a study.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convscale_cli.errors import UsageError

COMPLETE = ("finished", "budget")
FINISHED = ("finished",)
DEFAULT_DEPTH = 3
# Files that mark a directory as a run directory even before summary.json exists (an unfinished or crashed run).
RUN_MARKERS = ("summary.json", "config.json", "metrics.jsonl", "checkpoints")


@dataclass(frozen=True)
class FoundRun:
    """A run directory whose ``summary.json`` passed the filters.

    Attributes:
        path: The run directory.
        name: Its path relative to the runs directory, with ``/`` separators.
        summary: The parsed ``summary.json``.
    """

    path: Path
    name: str
    summary: Mapping[str, Any]

    @property
    def status(self) -> Any:
        """The summary's ``status`` (``finished``, ``budget``, ``paused``, ...), as written."""
        return self.summary.get("status")

    @property
    def kind(self) -> Any:
        """``pretrain`` or ``finetune`` (a summary without a kind is a pre-training run)."""
        return self.summary.get("kind", "pretrain")


@dataclass(frozen=True)
class Skipped:
    """A run directory that was not used, and why.

    Attributes:
        path: The run directory relative to the runs directory.
        reason: Why it was left out.
        broken: Its ``summary.json`` exists but cannot be read (not a file, not JSON, not an object).
    """

    path: str
    reason: str
    broken: bool = False

    def to_dict(self) -> dict[str, str]:
        """JSON-ready copy."""
        return {"path": self.path, "reason": self.reason}


def run_dirs(runs_dir: Path, max_depth: int = DEFAULT_DEPTH) -> list[Path]:
    """The run directories under ``runs_dir`` down to ``max_depth`` levels, sorted, not descending into runs.

    Hidden directories (``.cache``, ...) are passed over.
    """
    found: list[Path] = []

    def walk(directory: Path, depth: int) -> None:
        for child in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if any((child / marker).exists() for marker in RUN_MARKERS):
                found.append(child)
            elif depth < max_depth:
                walk(child, depth + 1)

    walk(runs_dir, 1)
    return found


def scan_runs(
    runs_dir: str | Path,
    *,
    statuses: Collection[str] | None = COMPLETE,
    kinds: Collection[str] | None = None,
    max_depth: int = DEFAULT_DEPTH,
) -> tuple[list[FoundRun], list[Skipped]]:
    """Read the ``summary.json`` of every run directory under ``runs_dir`` that the filters keep.

    Args:
        runs_dir: The directory holding the run directories.
        statuses: Summary statuses to keep (see the module docstring); None keeps every status.
        kinds: Run kinds to keep (``pretrain``, ``finetune``); None keeps both.
        max_depth: Directory levels below ``runs_dir`` to search, at least 1.

    Returns:
        ``(runs, skipped)``: the runs sorted by name, and the run directories left out with their reasons (no or
        unreadable summary, another status).

    Raises:
        UsageError: ``runs_dir`` does not exist or is not a directory, is itself a run directory, or ``max_depth``
            is below 1.
    """
    root = Path(runs_dir)
    if max_depth < 1:
        raise UsageError(f"`max_depth` must be >= 1 (the runs directory's children), got {max_depth}")
    if not root.exists():
        raise UsageError(f"runs directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise UsageError(f"runs directory {str(root)!r} is not a directory")
    if (root / "summary.json").exists():
        raise UsageError(
            f"{str(root)!r} is a single run directory; pass the directory that holds the runs ({str(root.parent)!r})"
        )
    runs: list[FoundRun] = []
    skipped: list[Skipped] = []
    for directory in run_dirs(root, max_depth):
        name = directory.relative_to(root).as_posix()
        path = directory / "summary.json"
        if not path.exists():
            skipped.append(Skipped(name, "no summary.json (unfinished or crashed run)"))
            continue
        if not path.is_file():
            skipped.append(Skipped(name, "summary.json is not a file", broken=True))
            continue
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            skipped.append(Skipped(name, f"summary.json is not valid JSON ({exc})", broken=True))
            continue
        if not isinstance(summary, Mapping):
            skipped.append(Skipped(name, "summary.json is not a JSON object", broken=True))
            continue
        found = FoundRun(directory, name, summary)
        if kinds is not None and found.kind not in kinds:
            continue
        if statuses is not None and found.status not in statuses:
            if found.status != "paused":  # a branching sweep's trunk: its branches are the runs
                shown = ", ".join(statuses)
                skipped.append(Skipped(name, f"status {found.status!r} is not one of {shown}"))
            continue
        runs.append(found)
    return runs, skipped
