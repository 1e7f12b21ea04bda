"""Load and validate the run directories a report is built from.

A runs directory holds run directories (possibly nested, e.g. ``sweep/f0-e1-lr1.6``), each finished run with a
``summary.json`` written by the engine. Runs that cannot be used (no or broken summary, failed, missing numbers) are
skipped and listed with the reason, so one bad run never hides the rest of a study. The directories are found and
read by :func:`convscale_cli.runs_dir.scan_runs`, the reader behind every command that reads runs.

Runs belong to one study only when they were trained on the same data: the dataset plugin *and* its options, the
resolution and the class count (:attr:`Run.data_key`). Held-out losses on different data are not comparable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convscale_cli.errors import UsageError
from convscale_cli.runs_dir import COMPLETE, DEFAULT_DEPTH, Skipped, run_dirs, scan_runs

# A run stopped by its compute budget is a complete data point: the budget is the study's design.
USABLE_STATUSES = COMPLETE


@dataclass(frozen=True)
class Run:
    """One usable run, flattened from its ``summary.json``.

    Attributes:
        name: Path of the run directory relative to the runs directory.
        kind: "pretrain" or "finetune".
        model: Architecture name.
        family: Model family ("nfnet", "vit", ...).
        dataset: Dataset trained on.
        epochs: Epoch budget.
        lr: Peak learning rate alpha at batch 4096.
        seed: Training seed.
        params: Parameter count.
        macs_per_image: Forward MACs per image at the training resolution.
        examples_seen: Training examples processed.
        eval_loss: Held-out loss at the end of training.
        eval_top1: Held-out top-1 accuracy (fraction) at the end, best of raw and EMA weights for fine-tunes.
        core_hours: Training compute in TPU-v4 core-hour equivalents.
        pretrain_run: Name of the pre-training run a fine-tune started from ("" for pre-training runs).
        pretrain_core_hours: Pre-training compute behind a fine-tune (0 for pre-training runs).
        from_scratch: a fine-tuning run's from-scratch baseline (``finetune --scratch``): no pre-training behind it.
        params_body: Parameters without the classifier head (the head grows with the class count, not with the
            model's capacity; Kaplan et al. 2020 and Hoffmann et al. 2022 count N without embeddings for the same
            reason). Equal to ``params`` when the head could not be told apart.
        data_key: The data the run was trained on: dataset, its options, resolution and class count.
        batch_size: Global batch size (0 when the summary does not say).
        train_resolution: Training resolution in pixels (0 when the summary does not say).
        num_classes: Classifier classes (0 when the summary does not say).
    """

    name: str
    kind: str
    model: str
    family: str
    dataset: str
    epochs: float
    lr: float
    seed: int
    params: float
    macs_per_image: float
    examples_seen: float
    eval_loss: float
    eval_top1: float
    core_hours: float
    pretrain_run: str = ""
    pretrain_core_hours: float = 0.0
    from_scratch: bool = False
    params_body: float = 0.0
    data_key: str = ""
    batch_size: int = 0
    train_resolution: int = 0
    num_classes: int = 0

    @property
    def examples_per_epoch(self) -> float:
        """Training-set size implied by the run (examples seen / epochs)."""
        return self.examples_seen / self.epochs

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class _Invalid(Exception):
    """Internal: a summary that cannot be turned into a Run (the message is the skip reason)."""


def _number(data: Mapping[str, Any], key: str, where: str = "", *, positive: bool = True) -> float:
    value = data.get(key)
    label = f"{where}.{key}" if where else key
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _Invalid(f"{label} is missing or not a finite number ({value!r})")
    if positive and value <= 0:
        raise _Invalid(f"{label} must be > 0, got {value!r}")
    return float(value)


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise _Invalid(f"{key} is missing or not a string ({value!r})")
    return value


def _section(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    if not isinstance(value, Mapping):
        raise _Invalid(f"{key} is missing or not an object")
    return value


def _core_hours(ledger: Mapping[str, Any]) -> float:
    value = ledger.get("core_hours")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    # Older or partial ledgers may only hold FLOPs: convert on the paper's axis with the planner's calibration.
    flops = _number(ledger, "train_flops", "ledger")
    from convscale_cli.budget import flops_to_core_hours

    return float(flops_to_core_hours(flops))


def _top1(summary: Mapping[str, Any]) -> float:
    candidates = []
    for key in ("final", "final_ema"):
        section = summary.get(key)
        value = section.get("eval_top1") if isinstance(section, Mapping) else None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            # The engine writes fractions; accept percentages from other tools too.
            candidates.append(float(value) / 100.0 if value > 1.0 else float(value))
    # The engine evaluates both raw and EMA weights after fine-tuning; the better one is what a user would ship.
    return max(candidates) if candidates else math.nan


def data_key(dataset: str, options: Mapping[str, Any] | None, resolution: Any, num_classes: Any) -> str:
    """A readable label of the data a run saw, e.g. ``shapes[size=16384, classes=70] 32px 70cls``."""
    opts = ", ".join(f"{k}={options[k]}" for k in sorted(options or {}))
    label = f"{dataset}[{opts}]" if opts else dataset
    if isinstance(resolution, int) and not isinstance(resolution, bool):
        label += f" {resolution}px"
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        label += f" {num_classes}cls"
    return label


def _body_params(summary: Mapping[str, Any], params: float) -> float:
    value = summary.get("params_body")
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= params:
        return float(value)
    return params


def parse_summary(summary: Mapping[str, Any], name: str) -> Run:
    """Turn one ``summary.json`` object into a :class:`Run`.

    Raises:
        _Invalid: With the reason, when the summary lacks a field the report needs.
    """
    kind = _text(summary, "kind")
    if kind not in ("pretrain", "finetune"):
        raise _Invalid(f"kind must be 'pretrain' or 'finetune', got {kind!r}")
    status = summary.get("status")
    if status not in USABLE_STATUSES:
        raise _Invalid(f"status {status!r} is not one of {', '.join(USABLE_STATUSES)}")
    final = _section(summary, "final")
    ledger = _section(summary, "ledger")
    pretrain_run, pretrain_hours, scratch = "", 0.0, False
    if kind == "finetune":
        pretrain = _section(summary, "pretrain")
        pretrain_run = str(pretrain.get("run") or "")
        scratch = pretrain.get("kind") == "scratch"
        pretrain_hours = _number(pretrain, "core_hours", "pretrain", positive=not scratch)
    seed = summary.get("seed", 0)
    config = summary.get("config") if isinstance(summary.get("config"), Mapping) else {}
    options = config.get("data_options") if isinstance(config.get("data_options"), Mapping) else {}
    params = _number(summary, "params")
    batch = summary.get("batch_size")
    return Run(
        name=name,
        kind=kind,
        model=_text(summary, "model"),
        family=_text(summary, "family"),
        dataset=_text(summary, "dataset"),
        epochs=_number(summary, "epochs"),
        lr=_number(summary, "lr"),
        seed=int(seed) if isinstance(seed, int) else 0,
        params=params,
        macs_per_image=_number(summary, "macs_per_image"),
        examples_seen=_number(summary, "examples_seen"),
        eval_loss=_number(final, "eval_loss", "final"),
        eval_top1=_top1(summary),
        core_hours=_core_hours(ledger),
        pretrain_run=pretrain_run,
        pretrain_core_hours=pretrain_hours,
        from_scratch=scratch,
        params_body=_body_params(summary, params),
        data_key=data_key(
            _text(summary, "dataset"), options, summary.get("train_resolution"), summary.get("num_classes")
        ),
        batch_size=_int(batch),
        train_resolution=_int(summary.get("train_resolution")),
        num_classes=_int(summary.get("num_classes")),
    )


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


def load_runs(runs_dir: str | Path, *, max_depth: int = DEFAULT_DEPTH) -> tuple[list[Run], list[Skipped]]:
    """Read every finished or budget-stopped run under ``runs_dir`` (:func:`convscale_cli.runs_dir.scan_runs`).

    Args:
        runs_dir: Directory holding run directories.
        max_depth: Directory levels below ``runs_dir`` searched for runs.

    Returns:
        ``(runs, skipped)``: the usable runs sorted by name, and the run directories that were skipped with reasons
        (the paused trunks of a branching sweep are neither).

    Raises:
        UsageError: The directory does not exist, is not a directory, or holds no run directories at all.
    """
    root = Path(runs_dir)
    found, skipped = scan_runs(root, statuses=USABLE_STATUSES, max_depth=max_depth)
    if not found and not skipped and not run_dirs(root, max_depth):
        raise UsageError(
            f"no run directories in {str(root)!r}: expected sub-directories with summary.json "
            "(written by `convscale pretrain` / `finetune`)"
        )
    runs: list[Run] = []
    for run in found:
        try:
            runs.append(parse_summary(run.summary, run.name))
        except _Invalid as exc:
            skipped.append(Skipped(run.name, str(exc)))
    skipped.sort(key=lambda s: s.path.split("/"))  # in the order of the walk
    return runs, skipped


def load_tuning(runs_dir: str | Path, dataset: str) -> tuple[list[dict[str, Any]], int]:
    """Learning-rate decisions that ``convscale tune-lr`` / ``sweep`` appended to ``RUNS_DIR/tuning.jsonl``.

    Returns:
        ``(decisions, unreadable)``: the decisions for ``dataset`` in file order (a later decision for the same cell
        supersedes an earlier one in the report), and how many lines could not be read.
    """
    path = Path(runs_dir) / "tuning.jsonl"
    if not path.is_file():
        return [], 0
    decisions, unreadable = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            required = (entry["model"], entry["epochs"], entry["best_lr"], entry["trials"])
        except (json.JSONDecodeError, KeyError, TypeError):
            unreadable += 1
            continue
        if all(value is not None for value in required) and entry.get("dataset", dataset) == dataset:
            decisions.append(entry)
    latest = {(d["model"], d["epochs"]): d for d in decisions}
    return list(latest.values()), unreadable


def select_dataset(runs: Iterable[Run], dataset: str | None = None) -> list[Run]:
    """Keep the pre-training runs of one data setting and the fine-tunes that started from them.

    Losses on different data are not comparable, so a report covers one pre-training data setting: the dataset and
    its options, resolution and class count. ``dataset`` is a dataset name (enough when its runs share one setting)
    or a full setting label as printed in the error (``arrayrecord[root=/data/a] 64px 10cls``).

    Raises:
        UsageError: No pre-training runs, an unknown ``dataset``, or several settings and no choice.
    """
    runs = list(runs)
    pretrain = [r for r in runs if r.kind == "pretrain"]
    keys = sorted({r.data_key for r in pretrain})
    if not keys:
        raise UsageError("no usable pre-training runs: a report needs finished runs with kind 'pretrain'")
    if dataset is None:
        candidates = keys
    elif dataset in keys:
        candidates = [dataset]
    else:
        candidates = sorted({r.data_key for r in pretrain if r.dataset == dataset})
        if not candidates:
            from convscale_cli.errors import did_you_mean

            names = sorted({r.dataset for r in pretrain})
            hint = did_you_mean(dataset, names) or f"the runs are on {', '.join(names)}"
            raise UsageError(f"no pre-training runs on dataset {dataset!r}: {hint}")
    if len(candidates) > 1:
        shown = "; ".join(f"{k!r} ({sum(r.data_key == k for r in pretrain)} runs)" for k in candidates)
        raise UsageError(
            f"runs span {len(candidates)} data settings, whose losses cannot share one law: {shown}; pick one with "
            "`dataset` (a name, or a setting as quoted here)"
        )
    chosen = [r for r in pretrain if r.data_key == candidates[0]]
    names = {r.name for r in chosen} | {r.name.rsplit("/", 1)[-1] for r in chosen}

    def from_chosen(run: Run) -> bool:
        link = run.pretrain_run.rstrip("/")
        if not link:
            return len(keys) == 1  # unlinked fine-tunes are only attributable when there is one data setting
        return link in names or link.rsplit("/", 1)[-1] in names

    return chosen + [r for r in runs if r.kind == "finetune" and from_chosen(r)]
