"""Learning-rate tuning by the paper's two-trial rule.

Smith et al. (2023, §2): "one can efficiently tune the learning rate within 2 trials by assuming
that the optimal learning rate falls slowly but monotonically as both the model size and the epoch budget increases."
So for a new cell (model, epochs) :func:`tune_cell` takes the best alpha of the nearest finished cell with a smaller
or equal model and a smaller or equal epoch budget (none: the recipe's alpha, 1.6 for NFNets), trains alpha and
alpha/2 and keeps the lower held-out loss. If alpha/2 wins the optimum may lie lower still, and the next trial
(alpha/4) is offered, not run: the rule's promise is two trials per cell. If alpha wins, the optimum may lie higher
(the rule assumes it never rises, but nothing guarantees that on new data), and 2 alpha is offered the same way.
``grid=True`` runs the full factor-2 grid.

Training goes through an injectable ``trainer(model, dataset, epochs, lr, out, **options) -> summary``; the default
one, :func:`engine_trainer`, imports the jax engine only when called. Nothing here imports jax at module level.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from convscale_cli import interrupts
from convscale_cli.errors import TrainingError, UnknownNameError, UsageError
from convscale_cli.planner import run_name
from convscale_cli.recipe import without_default_schedule
from convscale_cli.registry import Registry
from convscale_cli.runs_dir import RunRecord, RunWarning, infer_dataset, load_runs

Trainer = Callable[..., Mapping[str, Any]]
SizeAxis = Literal["params", "macs"]
TUNING_LOG = "tuning.jsonl"
# The default grid of --grid: factors of 2 around the recipe's alpha (3.2 .. 0.1 for NFNets; Fig. 3 spans 0.4-1.6).
GRID_OCTAVES = (1, 0, -1, -2, -3, -4)


def read_finished(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``summary.json`` if it finished (``status == "finished"``), else None."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.warn(f"skipping {path}: {exc}", RunWarning, stacklevel=2)
        return None
    return summary if isinstance(summary, dict) and summary.get("status") == "finished" else None


@dataclasses.dataclass(frozen=True)
class Cell:
    """All finished trials of one (model, epoch budget)."""

    model: str
    family: str
    epochs: float
    size: float  # params or MACs per image, per the lookup's size axis
    runs: tuple[RunRecord, ...]

    @property
    def best(self) -> RunRecord:
        """The trial with the lowest held-out loss; ties go to the larger lr (the fine-tuning preference of Smith et al.
        2023 §2)."""
        return min(self.runs, key=lambda r: (r.eval_loss, -r.lr))


def group_cells(runs: Iterable[RunRecord], size_axis: SizeAxis = "params") -> list[Cell]:
    """Group runs into cells by (model, epochs)."""
    grouped: dict[tuple[str, float], list[RunRecord]] = {}
    for run in runs:
        grouped.setdefault((run.model, round(run.epochs, 9)), []).append(run)
    return [
        Cell(model, trials[0].family, epochs, float(getattr(trials[0], size_axis)), tuple(trials))
        for (model, epochs), trials in sorted(grouped.items())
    ]


def nearest_cell(cells: Iterable[Cell], model: str, size: float, epochs: float) -> Cell | None:
    """The closest cell (log distance over size and epochs) with size <= ``size`` and epochs <= ``epochs``.

    The target cell itself is excluded: its own trials are the ones being decided. So is a cell whose every trial
    diverged: it has no optimum to pass on.
    """
    eligible = [
        c
        for c in cells
        if c.size <= size * (1 + 1e-9)
        and c.epochs <= epochs * (1 + 1e-9)
        and not (c.model == model and _same(c, epochs))
        and math.isfinite(c.best.eval_loss)
    ]
    if not eligible:
        return None
    return min(
        eligible,
        key=lambda c: (math.hypot(math.log(size / c.size), math.log(epochs / c.epochs)), -c.size, -c.epochs, c.model),
    )


def _same(cell: Cell, epochs: float) -> bool:
    return math.isclose(cell.epochs, epochs, rel_tol=1e-9)


def lr_grid(base_lr: float) -> list[float]:
    """The factor-2 grid of ``--grid``: base x 2, base, base / 2, ... base / 16."""
    return [_clean(base_lr * 2.0**k) for k in GRID_OCTAVES]


def _clean(lr: float) -> float:
    return float(f"{lr:.6g}")  # 1.6 / 8 prints as 0.2, not 0.19999999999999998


@dataclasses.dataclass(frozen=True)
class Trial:
    """One learning rate tried for a cell."""

    lr: float
    run: str
    eval_loss: float
    status: Literal["trained", "reused", "failed"]
    error: str = ""  # why a failed trial failed: its TrainingError's message (a non-finite loss, at which step)

    def outcome(self) -> str:
        """``loss 2.1234``, ``failed (non-finite loss (nan) at step 7; ...)`` or ``failed``."""
        if self.status != "failed":
            return f"loss {self.eval_loss:.4f}"
        return f"failed ({self.error})" if self.error else "failed"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``error`` only for a failed trial."""
        out = dataclasses.asdict(self)
        if not self.error:
            del out["error"]
        return out


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """The decision for one cell, as recorded in ``RUNS_DIR/tuning.jsonl``."""

    model: str
    dataset: str
    epochs: float
    rule: Literal["two-trial", "grid"]
    start_lr: float
    source: str  # where start_lr came from: "cell nfnet-tiny-l1 x 0.5 epochs" or "recipe default"
    trials: tuple[Trial, ...]
    best_lr: float
    best_run: str
    # The probe the two-trial rule offers next: alpha/4 when alpha/2 won, 2 alpha when alpha won; half the lowest lr
    # when every trial failed.
    next_lr: float | None

    @property
    def trained(self) -> int:
        """How many trials were trained in this call (reused ones excluded)."""
        return sum(t.status != "reused" for t in self.trials)

    def message(self) -> str:
        """What was decided, in one paragraph."""
        tried = ", ".join(f"alpha {t.lr:g}: {t.outcome()}" for t in self.trials)
        text = f"{self.model} x {self.epochs:g} epochs: start alpha {self.start_lr:g} ({self.source}); {tried}; "
        if all(t.eval_loss == math.inf for t in self.trials):
            return text + f"every trial failed: try alpha {self.next_lr:g}."
        text += f"best alpha {self.best_lr:g} ({self.best_run})."
        if self.next_lr is not None and self.rule == "two-trial":
            if self.best_lr < self.start_lr:
                text += f" alpha/2 won, so the optimum may lie lower: try alpha {self.next_lr:g} next."
            else:
                text += f" alpha won, so the optimum may lie higher: try alpha {self.next_lr:g} next."
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (one line of ``tuning.jsonl``)."""
        out = dataclasses.asdict(self)
        out["trials"] = [t.to_dict() for t in self.trials]
        return out


def engine_trainer(
    model: str,
    dataset: str,
    epochs: float,
    lr: float,
    out: str | Path,
    *,
    registry: Registry | None = None,
    **options: Any,
) -> dict:
    """Train one run with the jax engine (imported here, never at module level) and return its summary.

    ``registry`` is where the engine looks the model and dataset up (default: the installed plugins); ``options``
    are further :class:`~convscale_cli.engine.config.PretrainConfig` fields (``batch_size``, ``seed``,
    ``resolution``, ``data_options``, ...); unknown keys raise a ConfigError naming them.
    """
    from convscale_cli.config import from_dict
    from convscale_cli.engine.api import pretrain
    from convscale_cli.engine.config import PretrainConfig

    fields = {"model": model, "dataset": dataset, "epochs": epochs, "lr": lr, "out": str(out), **options}
    return dict(pretrain(from_dict(PretrainConfig, fields), registry))


def _loss(summary: Mapping[str, Any]) -> float:
    try:
        value = float(summary["final"]["eval_loss"])
    except (KeyError, TypeError, ValueError):
        return math.inf
    return value if math.isfinite(value) else math.inf


def run_trial(
    model: str, dataset: str, epochs: float, lr: float, runs_dir: Path, trainer: Trainer, options: Mapping[str, Any]
) -> Trial:
    """Train (or reuse, when its run directory already holds a finished run) one learning rate of a cell.

    A run that ends in :class:`TrainingError` (a non-finite loss, likely at too high an lr) is a failed trial with an
    infinite loss and the error's message: the comparison still has an answer, and the user sees why.
    """
    interrupts.check()  # a Ctrl-C swallowed during the previous trial stops the study here
    name = run_name(model, epochs, lr)
    out = runs_dir / name
    finished = read_finished(out)
    if finished is not None:
        other = _other_settings(out, finished, dataset, options)
        if other:
            raise UsageError(
                f"{str(out)!r} holds a finished run with other settings ({other}): it cannot be this trial; "
                "tune into another runs directory"
            )
        return Trial(lr, name, _loss(finished), "reused")
    try:
        summary = trainer(model, dataset, epochs, lr, out, **options)
    except TrainingError as exc:
        return Trial(lr, name, math.inf, "failed", str(exc))
    return Trial(lr, name, _loss(summary), "trained")


def _other_settings(out: Path, summary: Mapping[str, Any], dataset: str, options: Mapping[str, Any]) -> str:
    """The first setting a finished trial was trained with that differs from this tuning's, or "".

    Compares the dataset and each given engine option with the run's resolved ``config.json`` (a dict-valued option,
    key by key); the keys that may change between invocations of one run (``MUTABLE_KEYS``) are ignored.
    """
    from convscale_cli.engine.config import MUTABLE_KEYS
    from convscale_cli.engine.rundir import as_json, read_json

    if summary.get("dataset", dataset) != dataset:
        return f"dataset {summary['dataset']!r} there, {dataset!r} here"
    saved = read_json(out / "config.json")
    if saved is None:
        return ""
    for key, wanted in options.items():
        if key in MUTABLE_KEYS or wanted is None:
            continue
        if key == "recipe" and isinstance(wanted, Mapping):
            wanted = without_default_schedule(dict(wanted))  # as the run saved it: cosine leaves its keys out
        have = saved.get(key)
        pairs = (
            [(f"{key}.{k}", have.get(k), v) for k, v in wanted.items()]
            if isinstance(wanted, Mapping) and isinstance(have, Mapping)
            else [(key, have, wanted)]
        )
        for name, there, here in pairs:
            if as_json(there) != as_json(here):
                return f"{name} {there!r} there, {here!r} here"
    return ""


# The settings every trial must share with the cells already in its runs directory: a tuned alpha or a fitted loss is
# not comparable across a different data set size, batch size (the lr scales with it) or precision, or a loss measured
# on another number of held-out examples, and the report fits runs of one resolution and class count together (a
# trial at the model's default resolution would not join).
INHERITED_SETTINGS = ("data_options", "batch_size", "precision", "resolution", "num_classes", "eval_examples")
# The settings a trial must share with the runs of its own model family: the optimiser recipe (a study's schedule,
# shared warm-up and AGC exemptions) and the augmentation. Families may differ in these by design (an NFNet and a ViT
# ladder side by side, each with its own recipe), so only the runs of the trial's family are asked.
FAMILY_SETTINGS = ("recipe", "augment")
# Dict-valued settings are compared, and given values merged into the runs', key by key.
_KEYED = ("data_options", "recipe", "augment")


def _inherit(
    runs: Sequence[RunRecord], options: Mapping[str, Any], data_defaults: Mapping[str, Any], family: str
) -> dict[str, Any]:
    """``options`` completed with the settings the finished ``runs`` were trained with (their ``config.json``).

    A setting the runs agree on fills in one the caller left out; one the caller gave must equal theirs. The
    :data:`FAMILY_SETTINGS` are asked of the runs of ``family`` only. Data options are completed with the runs' (then
    the dataset's defaults) key by key, so ``size=4096`` given and the default 4096 are the same setting; a recipe or
    augmentation given in part is completed with the runs' the same way.

    Raises:
        UsageError: the runs disagree among themselves, or with a given setting; names the setting, both values and
            a run holding the other one.
    """
    from convscale_cli.engine.rundir import as_json, read_json

    def norm(key: str, value: Any) -> Any:
        if key == "data_options" and isinstance(value, Mapping):
            return as_json({**data_defaults, **value})
        if key == "recipe" and isinstance(value, Mapping):
            return as_json(without_default_schedule(dict(value)))  # as a run saves it: cosine leaves its keys out
        return as_json(value)

    out = dict(options)
    configs = [(run, read_json(run.path / "config.json")) for run in runs]
    for key in (*INHERITED_SETTINGS, *FAMILY_SETTINGS):
        found: dict[str, tuple[Any, Path]] = {}
        for run, saved in configs:
            if saved is None or key not in saved or (key in FAMILY_SETTINGS and run.family != family):
                continue
            found.setdefault(json.dumps(norm(key, saved[key]), sort_keys=True), (saved[key], run.path))
        if not found:
            continue
        (value, path), *others = found.values()
        if others:
            other, other_path = others[0]
            raise UsageError(
                f"the runs in {str(path.parent)!r} differ in {key} ({value!r} in {path.name}, {other!r} in "
                f"{other_path.name}), so a new trial cannot match them; tune into a runs directory of one setting"
            )
        if key in _KEYED and isinstance(out.get(key), Mapping) and isinstance(value, Mapping):
            out[key] = {**value, **out[key]}  # the values given replace theirs one by one
        if out.get(key) is None:
            out[key] = value
        elif norm(key, out[key]) != norm(key, value):
            name, here, there = _first_difference(key, norm(key, out[key]), norm(key, value), out[key], value)
            raise UsageError(
                f"{name} {here!r} here, but the runs in {str(path.parent)!r} used {there!r} ({path.name}): a trial "
                f"must match the cells it continues; drop `{name}=...` to inherit it, or tune into another runs "
                "directory"
            )
    return out


def _first_difference(key: str, here: Any, there: Any, shown_here: Any, shown_there: Any) -> tuple[str, Any, Any]:
    """The name of the first entry of setting ``key`` whose compared values ``here`` and ``there`` differ, with its
    values as given (``shown_*``); the setting itself when it is not a dict."""
    if isinstance(here, dict) and isinstance(there, dict):
        for k in sorted(set(here) | set(there)):
            if here.get(k) != there.get(k):
                return f"{key}.{k}", shown_here.get(k), shown_there.get(k)
    return key, shown_here, shown_there


def target_size(registry: Registry, model: str, size_axis: SizeAxis, resolution: int | None, classes: int) -> float:
    """Size of ``model`` on the lookup's axis at the run's resolution and class count."""
    spec = registry.architecture(model)
    count = spec.count(resolution or spec.train_resolution, classes)
    return float(count.params if size_axis == "params" else count.macs)


def tune_cell(
    model: str,
    epochs: float,
    runs_dir: str | Path,
    *,
    dataset: str | None = None,
    registry: Registry,
    trainer: Trainer | None = None,
    options: Mapping[str, Any] | None = None,
    grid: bool | Sequence[float] = False,
    size_axis: SizeAxis = "params",
    num_classes: int | None = None,
    start_lr: float | None = None,
    hidden: Collection[tuple[str, float]] = (),
    record_decision: bool = True,
) -> TuneResult:
    """Tune the learning rate of one cell by the two-trial rule (or a full grid) and record the decision.

    Args:
        model: registered architecture name.
        epochs: epoch budget of the cell.
        runs_dir: where trials are written (``{model}-e{epochs}-lr{alpha}``) and earlier cells are looked up.
        dataset: registered dataset name; only earlier runs on it count (default: the one dataset of the finished
            runs in ``runs_dir``).
        registry: resolves the model's family, recipe alpha and size, and is the one the default trainer trains with.
        trainer: ``trainer(model, dataset, epochs, lr, out, **options) -> summary`` (default: :func:`engine_trainer`
            with ``registry``).
        options: passed to the trainer (engine config fields). The data options, batch size, precision, resolution,
            class count and held-out example count default to those of the finished runs already in ``runs_dir`` on
            ``dataset``, the recipe and augmentation to those of its runs of the model's family; a value given must
            equal theirs.
        grid: True for the default factor-2 grid, a sequence for an explicit grid, False for the two-trial rule.
        size_axis: compare models by ``params`` or ``macs`` when looking for a smaller cell.
        num_classes: class count for the size comparison (default: the dataset's).
        start_lr: alpha of the first cell, when no smaller finished cell exists (default: the recipe's, 1.6). The
            paper's 1.6 is the optimum for JFT-4B at 224 px; a very different setting (a laptop study at batch 64)
            can start elsewhere and still follow the rule from there.
        hidden: ``(model, epochs)`` cells whose runs the start alpha must not come from: a sweep hides the cells the
            one-process sweep would not have finished yet, so a decision never depends on which worker was faster.
        record_decision: append the decision to ``RUNS_DIR/tuning.jsonl`` (a sweep writes its own,
            :mod:`convscale_cli.sweep_dir`).

    Raises:
        UsageError: unknown model or dataset, a non-positive epoch budget or lr, ``runs_dir`` a file; no
            ``dataset`` given and ``runs_dir`` holding finished runs of none or several; a setting other than the one
            of the runs already in ``runs_dir`` (``options``). Checked in that order, before anything is trained.
    """
    spec = registry.architecture(model)
    if not (math.isfinite(epochs) and epochs > 0):
        raise UsageError(f"`epochs` must be a positive number, got {epochs}")
    if start_lr is not None and not (math.isfinite(start_lr) and start_lr > 0):
        raise UsageError(f"`start_lr` must be a positive number, got {start_lr}")
    root = Path(runs_dir)
    if root.exists() and not root.is_dir():
        raise UsageError(f"`runs_dir` {str(root)!r} is a file, expected a runs directory")
    options = dict(options or {})
    trainer = trainer or functools.partial(engine_trainer, registry=registry)
    data = registry.dataset(dataset if dataset is not None else infer_dataset(root))
    root.mkdir(parents=True, exist_ok=True)
    log = root / TUNING_LOG
    if log.exists() and not log.is_file():  # checked before training: the decision must not be lost after it
        raise UsageError(f"{str(log)!r} is not a file, so the decision could not be recorded")
    study = [r for r in load_runs(root) if r.dataset == data.name]
    unknown = sorted(set(options.get("data_options") or {}) - set(data.options))
    if unknown:  # as the engine says it (engine/resolve.py), before the plugin's info() is called with it
        raise UnknownNameError(f"{data.name} data option", unknown[0], data.options)
    options = _inherit(study, options, data.options, spec.family)
    data_options = options.get("data_options") or {}
    if num_classes is None:
        info = data.info(**data_options) if data_options or data.static_info is None else data.static_info
        num_classes = options.get("num_classes") or info.num_classes
    hide = {(m, round(float(e), 9)) for m, e in hidden}
    runs = [r for r in study if r.family == spec.family and (r.model, round(r.epochs, 9)) not in hide]
    size = target_size(registry, spec.name, size_axis, options.get("resolution"), num_classes)
    neighbour = nearest_cell(group_cells(runs, size_axis), spec.name, size, epochs)
    if neighbour is not None:
        start, source = neighbour.best.lr, f"best of cell {neighbour.model} x {neighbour.epochs:g} epochs"
    elif start_lr is not None:
        start, source = float(start_lr), "study start_lr, no smaller finished cell"
    else:
        start, source = spec.recipe.lr, "recipe default, no smaller finished cell"
    if grid is not False:
        lrs = [_clean(x) for x in (lr_grid(spec.recipe.lr) if grid is True else grid)]
        if not lrs or min(lrs) <= 0:
            raise UsageError(f"the lr grid must hold positive values, got {lrs}")
        rule: Literal["two-trial", "grid"] = "grid"
    else:
        lrs, rule = [_clean(start), _clean(start / 2)], "two-trial"
    trials = tuple(run_trial(spec.name, data.name, epochs, lr, root, trainer, options) for lr in lrs)
    best = min(trials, key=lambda t: (t.eval_loss, -t.lr))
    next_lr = None
    if rule == "two-trial":
        next_lr = _clean(start / 4) if best.lr == lrs[1] else _clean(start * 2)
    if best.eval_loss == math.inf:  # all diverged: the optimum lies below every lr tried
        next_lr = _clean(min(lrs) / 2)
    result = TuneResult(
        model=spec.name,
        dataset=data.name,
        epochs=epochs,
        rule=rule,
        start_lr=_clean(start),
        source=source,
        trials=trials,
        best_lr=best.lr,
        best_run=best.run,
        next_lr=next_lr,
    )
    if record_decision and (result.trained or not _logged(root, result)):
        record(root, result)
    return result


def _logged(runs_dir: Path, result: TuneResult) -> bool:
    """Whether ``tuning.jsonl`` already holds this decision (a resumed sweep must not duplicate it)."""
    path = runs_dir / TUNING_LOG
    if not path.is_file():
        return False
    mine = result.to_dict()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict):
            continue
        if all(entry.get(k) == mine[k] for k in ("model", "dataset", "epochs", "rule", "best_run")):
            return True
    return False


def record(runs_dir: Path, result: TuneResult) -> None:
    """Append the decision to ``RUNS_DIR/tuning.jsonl``."""
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result.to_dict()}
    with (runs_dir / TUNING_LOG).open("a") as f:
        f.write(json.dumps(line) + "\n")
