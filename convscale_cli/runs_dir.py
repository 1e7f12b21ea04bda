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

:func:`load_runs` reads the pre-training runs as the two-trial rule (:mod:`convscale_cli.tuning`) and the quickstart
use them (:class:`RunRecord`); the report parses the same runs into its own records (:mod:`convscale_cli.report.runs`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convscale_cli.budget import train_flops
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
            skipped.append(Skipped(name, f"no summary.json ({_why_unfinished(directory)})"))
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


def _why_unfinished(directory: Path) -> str:
    """Why a run directory holds no summary: the error its training stopped with (a non-finite loss), which the
    engine notes in the live ledger, else an unfinished or crashed run."""
    try:
        error = json.loads((directory / "ledger.json").read_text(encoding="utf-8")).get("error")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        error = None
    return f"diverged: {error}" if isinstance(error, str) and error else "unfinished or crashed run"


class RunWarning(UserWarning):
    """A run directory was skipped because its summary could not be read."""


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """The fields of one finished (or budget-stopped) pre-training run's ``summary.json`` that tuning uses."""

    path: Path
    model: str
    family: str
    dataset: str
    epochs: float
    lr: float
    batch_size: int
    params: int
    macs_per_image: int
    train_resolution: int
    num_classes: int
    examples_seen: int
    eval_loss: float
    train_flops: float
    core_hours: float

    @classmethod
    def from_summary(cls, path: Path, summary: Mapping[str, Any]) -> RunRecord:
        """Build a record from a summary dict; raises KeyError/TypeError/ValueError on a malformed one."""
        ledger = summary.get("ledger") or {}
        loss = summary["final"]["eval_loss"]
        return cls(
            path=path,
            model=str(summary["model"]),
            family=str(summary["family"]),
            dataset=str(summary["dataset"]),
            epochs=float(summary["epochs"]),
            lr=float(summary["lr"]),
            batch_size=int(summary["batch_size"]),
            params=int(summary["params"]),
            macs_per_image=int(summary["macs_per_image"]),
            train_resolution=int(summary["train_resolution"]),
            num_classes=int(summary["num_classes"]),
            examples_seen=int(summary["examples_seen"]),
            # A diverged run counts as infinitely bad rather than vanishing from the comparison.
            eval_loss=float(loss) if loss is not None and math.isfinite(float(loss)) else math.inf,
            train_flops=float(
                ledger.get("train_flops", train_flops(summary["macs_per_image"]) * summary["examples_seen"])
            ),
            core_hours=float(ledger.get("core_hours", math.nan)),
        )


def load_runs(
    runs_dir: str | Path,
    *,
    kind: str = "pretrain",
    statuses: Collection[str] | None = COMPLETE,
    max_depth: int = DEFAULT_DEPTH,
) -> list[RunRecord]:
    """Every run of ``kind`` under ``runs_dir`` that :func:`convscale_cli.runs_dir.scan_runs` keeps.

    By default the finished and budget-stopped runs down to three levels, the runs ``report`` and ``plan --from``
    read, so the cells the two-trial rule looks up are the cells the report fits. A run directory whose summary cannot
    be read or lacks a field a record needs is skipped with a :class:`RunWarning`.

    Raises:
        UsageError: ``runs_dir`` does not exist, is not a directory or is itself a run directory.
    """
    found, skipped = scan_runs(runs_dir, statuses=statuses, kinds=(kind,), max_depth=max_depth)
    for left_out in skipped:
        if left_out.broken:
            warnings.warn(f"skipping {Path(runs_dir) / left_out.path}: {left_out.reason}", RunWarning, stacklevel=2)
    records = []
    for run in found:
        try:
            records.append(RunRecord.from_summary(run.path, run.summary))
        except (KeyError, TypeError, ValueError) as exc:
            warnings.warn(f"skipping {run.path / 'summary.json'}: missing or bad field {exc}", RunWarning, stacklevel=2)
    return records


def infer_dataset(runs_dir: str | Path) -> str:
    """The one dataset the finished pre-training runs in ``runs_dir`` were trained on.

    Raises:
        UsageError: ``runs_dir`` holds finished runs of no dataset or of several.
    """
    root = Path(runs_dir)
    found = sorted({r.dataset for r in load_runs(root)}) if root.is_dir() else []
    if len(found) != 1:
        where = f"it holds runs on {', '.join(found)}" if found else "it holds no finished runs"
        raise UsageError(f"cannot infer the dataset from {str(root)!r} ({where}); pass `dataset`")
    return found[0]
