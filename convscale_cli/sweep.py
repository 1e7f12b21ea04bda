"""``convscale sweep STUDY.toml``: a grid of (model, epoch budget) cells, each tuned by the two-trial rule.

This is the experiment behind the paper's Figs. 2 and 3 (Smith et al. 2023 §2) at any scale: every model of the study
trained for every epoch budget, the learning rate of each cell tuned on a factor-2 grid. Cells run cheapest first, so
when a cell starts, every cell with a smaller-or-equal model and epoch budget has finished and the two-trial rule
(:func:`convscale_cli.tuning.tune_cell`) can take its start alpha from the nearest of them. All runs go into one
directory; a rerun skips finished runs (and the engine resumes an interrupted one from its checkpoint), so the sweep
is resumable by running the same command again.

With the warm-up-stable-decay schedule (``engine.recipe.schedule = "wsd"``) every budget of a model shares the
constant phase (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations",
§3), given a warm-up of fixed length: the study fixes it at the recipe's warm-up fraction of its shortest budget.
``branching = true`` then trains each (model, lr) once, as a *trunk* (``OUT/trunks/{model}-e{longest}-lr{alpha}``,
the longest budget's run paused where its cooldown would start), and every cell's run as a branch from the trunk's
checkpoint at that budget's cooldown start (:mod:`convscale_cli.engine.branch`): the trunk's steps are paid once
instead of once per budget. A branch equals the run trained from scratch, so branching changes the study's cost and
never its results, and the tuning rule is untouched: cells run in the same order with the same trials, and a trial's
trunk is extended on demand, only as far as the longest budget that has tried its lr needs.

``run_sweep(..., shard=Shard(i, n))`` runs worker i of n: the workers share only the runs directory, each runs the
cells the common assignment gives it as soon as the cells they depend on are decided (:mod:`convscale_cli.sweep_graph`),
and each decision goes to its own file, from which ``tuning.jsonl`` is rebuilt (:mod:`convscale_cli.sweep_dir`). A
cell only ever sees the cells it depends on, so the results do not depend on the number of workers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from convscale_cli import tuning
from convscale_cli.budget import train_flops
from convscale_cli.config import check_seed, from_dict, load_config, to_dict
from convscale_cli.errors import ConfigError, ConvscaleError, ExitCode, UnknownNameError, UsageError, did_you_mean
from convscale_cli.planner import run_name
from convscale_cli.recipe import Recipe, cooldown_steps, stable_end
from convscale_cli.registry import Registry
from convscale_cli.tuning import Trainer, TuneResult, lr_grid, tune_cell

if TYPE_CHECKING:
    from convscale_cli.sweep_graph import Shard

TRUNKS = "trunks"  # OUT/trunks/: the shared constant phases of a branching study

# Engine fields the study sets itself; putting them under [engine] would silently fight the sweep.
_RESERVED = frozenset({"model", "dataset", "epochs", "lr", "out", "seed", "batch_size", "resolution", "data_options"})
_STUDY_KEYS = {"model": "models"}  # the study's key where it is not the engine's


class SweepStalled(ConvscaleError):
    """A sweep worker waited for another worker's cell, and nothing in the runs directory changed for too long."""

    exit_code = ExitCode.TRAINING_FAILED


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """A sweep study (``STUDY.toml``; unknown keys are errors). See ``examples/quickstart.toml``."""

    out: str  # the runs directory shared by every cell (run dirs are named {model}-e{epochs}-lr{alpha})
    dataset: str  # registered dataset name
    models: tuple[str, ...]  # registered architecture names; one or more families
    epochs: tuple[float, ...]  # epoch budgets (the paper's grid is 0.25 .. 8, factors of 2)
    data_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # DatasetSpec options, e.g. size
    resolution: int | None = None  # training resolution; None: the first cell's model's, which later cells inherit
    batch_size: int | None = None  # global batch; None: the recipe's (4096); alpha is quoted at 4096 either way
    seed: int = 0
    rule: Literal["two-trial", "grid"] = "two-trial"  # lr tuning per cell
    # alpha of each family's first cell (no smaller finished cell of that family yet); None: the recipe's (1.6 for
    # NFNets, the paper's JFT-4B optimum). A table gives one per family, {nfnet = 51.2, vit = 1.6}: SGD and AdamW
    # alphas differ by orders of magnitude, and the rule only passes an optimum on within a family.
    start_lr: float | dict[str, float] | None = None
    # Explicit lr grid for rule = "grid" and for the "full grid" count; empty: the recipe's alpha x 2^(1 .. -4). A
    # table gives one per family, {nfnet = [25.6, 51.2], vit = [0.4, 0.8]}; a family it leaves out gets its recipe's.
    lr_grid: tuple[float, ...] | dict[str, tuple[float, ...]] = ()
    size_axis: Literal["params", "macs"] = "params"  # how "smaller model" is judged by the two-trial rule
    engine: dict[str, Any] = dataclasses.field(default_factory=dict)  # other PretrainConfig fields (precision, ...)
    # wsd only: train each (model, lr) once as a trunk and every budget as a cooldown branch of it (module docstring).
    branching: bool = False

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("out must name the runs directory, e.g. out = 'runs/quickstart'")
        if not self.models:
            raise ConfigError("models must list at least one registered model, e.g. models = ['nfnet-tiny-l0']")
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"models lists a model twice: {list(self.models)}")
        if not self.epochs or any(not (math.isfinite(e) and e > 0) for e in self.epochs):
            raise ConfigError(f"epochs must be positive numbers, e.g. epochs = [0.25, 0.5, 1], got {list(self.epochs)}")
        starts = self.start_lr.items() if isinstance(self.start_lr, dict) else [("", self.start_lr)]
        for family, lr in starts:
            if lr is not None and not (_is_number(lr) and math.isfinite(lr) and lr > 0):
                key = f"start_lr.{family}" if family else "start_lr"
                raise ConfigError(f"{key} must be a positive number, got {lr!r}")
        if isinstance(self.lr_grid, dict):
            grids = {family: _check_grid(f"lr_grid.{family}", grid) for family, grid in self.lr_grid.items()}
            object.__setattr__(self, "lr_grid", grids)
        else:
            _check_grid("lr_grid", self.lr_grid)
        clash = sorted(set(self.engine) & _RESERVED)
        if clash and clash[0] == "lr":
            raise ConfigError("engine.lr is set by the study's rule per trial; use the top-level key 'start_lr'")
        if clash:
            key = _STUDY_KEYS.get(clash[0], clash[0])
            raise ConfigError(f"engine.{clash[0]} is set by the study itself; use the top-level key {key!r}")
        for key, value in (("resolution", self.resolution), ("batch_size", self.batch_size)):
            if value is not None and value <= 0:
                raise ConfigError(f"{key} = {value} must be > 0")
        check_seed(self.seed)
        recipe = self.engine.get("recipe")
        schedule = recipe.get("schedule", "cosine") if isinstance(recipe, dict) else "cosine"
        if self.branching and schedule != "wsd":
            raise ConfigError(
                f"branching = true needs the wsd schedule, not {schedule}: set engine.recipe.schedule = 'wsd' (a "
                f"{schedule} run's learning rate depends on its length from the first step, so no budget can branch "
                "from another)"
            )

    def start_lr_for(self, family: str) -> float | None:
        """The first-cell alpha of ``family`` (None: its recipe's)."""
        if isinstance(self.start_lr, dict):
            value = self.start_lr.get(family)
            return None if value is None else float(value)
        return self.start_lr

    def grid_for(self, family: str) -> tuple[float, ...]:
        """The explicit lr grid of ``family``'s cells (empty: its recipe's)."""
        if isinstance(self.lr_grid, dict):
            return self.lr_grid.get(family, ())
        return self.lr_grid

    def trials_for(self, family: str) -> int:
        """Runs per cell of ``family`` that the rule trains: 2 for the two-trial rule, the grid's size for a grid."""
        if self.rule == "two-trial":
            return 2
        return self.full_grid_size(family)

    def full_grid_size(self, family: str) -> int:
        """Learning rates per cell of ``family``'s full grid (the study's, else the recipe's)."""
        return len(self.grid_for(family)) or len(lr_grid(1.0))


def _check_grid(key: str, grid: object) -> tuple[float, ...]:
    if not isinstance(grid, (list, tuple)) or not all(_is_number(lr) for lr in grid):
        raise ConfigError(f"{key} = {grid!r} has the wrong type: expected a list of numbers")
    if any(not (math.isfinite(lr) and lr > 0) for lr in grid):
        raise ConfigError(f"{key} must hold positive finite values, got {list(grid)}")
    return tuple(float(lr) for lr in grid)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_study(path: str | Path, overrides: Mapping[str, Any] | None = None) -> StudyConfig:
    """Read a study file (``key=value`` overrides on top); unknown keys and wrong types are ConfigErrors."""
    return load_config(StudyConfig, path, overrides)


@dataclasses.dataclass(frozen=True)
class CellPlan:
    """One cell of the study, with its cost (for ordering)."""

    model: str
    family: str
    epochs: float
    flops: float  # 6 x MACs x examples


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What the sweep did: a decision per cell and how many runs the rule needed."""

    results: tuple[TuneResult, ...]
    grid_sizes: tuple[int, ...]  # learning rates of each result's cell's full grid

    @property
    def grid_size(self) -> int | None:
        """Learning rates per cell of the full grid; None where the families' grids differ in size."""
        sizes = set(self.grid_sizes)
        return sizes.pop() if len(sizes) == 1 else None

    @property
    def runs_used(self) -> int:
        """Distinct runs the tuning rule used, reused ones included."""
        return len({t.run for r in self.results for t in r.trials})

    @property
    def trained(self) -> int:
        """Runs trained (or failed) by this invocation."""
        return sum(r.trained for r in self.results)

    @property
    def full_grid_runs(self) -> int:
        """Runs a full lr grid over every cell would have needed."""
        return sum(self.grid_sizes)

    @property
    def full_grid_text(self) -> str:
        """What :attr:`full_grid_runs` counts, in words: "a full 6-point lr grid" or "each family's full lr grid"."""
        return f"a full {self.grid_size}-point lr grid" if self.grid_size else "each family's full lr grid"


def plan_cells(study: StudyConfig, registry: Registry) -> list[CellPlan]:
    """The study's cells, cheapest first (ties: smaller model, then fewer epochs).

    Raises:
        UnknownNameError: a model or the dataset is not registered.
        ConfigError: ``start_lr`` or ``lr_grid`` names a family none of the study's models belongs to.
    """
    data = registry.dataset(study.dataset)
    unknown_options = sorted(set(study.data_options) - set(data.options))
    if unknown_options:  # as the engine says it (engine/resolve.py), before the plugin's own info() refuses it
        raise UnknownNameError(f"{data.name} data option", unknown_options[0], data.options)
    info = data.info(**study.data_options) if study.data_options or data.static_info is None else data.static_info
    train_size = int(info.split_sizes.get("train", 0))
    classes = int(study.engine.get("num_classes") or info.num_classes)
    cells = []
    for name in study.models:
        spec = registry.architecture(name)
        resolution = study.resolution or spec.train_resolution
        spec.check_resolution(resolution)
        macs = spec.count(resolution, classes).macs
        for epochs in study.epochs:
            cells.append(CellPlan(spec.name, spec.family, float(epochs), train_flops(macs) * epochs * train_size))
    families = sorted({c.family for c in cells})
    for key, value in (("start_lr", study.start_lr), ("lr_grid", study.lr_grid)):
        unknown = sorted(set(value) - set(families)) if isinstance(value, dict) else []
        if unknown:
            kind = "family" if len(families) == 1 else "families"
            hint = did_you_mean(unknown[0], families)
            hint = f"; {hint}" if hint else ""
            raise ConfigError(
                f"{key} names family {unknown[0]!r}, but the study's models are of {kind} {', '.join(families)}{hint}"
            )
    return sorted(cells, key=lambda c: (c.flops, c.model, c.epochs))


def trainer_options(study: StudyConfig) -> dict[str, Any]:
    """Engine options every run of the study gets."""
    options: dict[str, Any] = {"seed": study.seed, **study.engine}
    if study.data_options:
        options["data_options"] = dict(study.data_options)
    if study.resolution is not None:
        options["resolution"] = study.resolution
    if study.batch_size is not None:
        options["batch_size"] = study.batch_size
    return options


def model_recipe(study: StudyConfig, registry: Registry, model: str) -> Recipe:
    """The recipe the study's runs of ``model`` train with: the architecture's, with ``engine.recipe`` on top."""
    spec = registry.architecture(model)
    return from_dict(Recipe, {**to_dict(spec.recipe), **(study.engine.get("recipe") or {})}, prefix="recipe.")


@dataclasses.dataclass(frozen=True)
class ModelSchedule:
    """The steps of each epoch budget of one model of the study, and where its wsd runs branch.

    Attributes:
        steps: optimiser steps of each epoch budget (wsd only).
        warmup_steps: the fixed warm-up every wsd run of the model shares (None: cosine, a fraction of each run).
        branch_points: each budget's cooldown start, the trunk step its branch starts from (wsd only).
    """

    steps: dict[float, int]
    warmup_steps: int | None
    branch_points: dict[float, int]


def model_schedule(study: StudyConfig, registry: Registry, model: str) -> ModelSchedule:
    """Steps, shared warm-up and branch points of ``model``'s runs in the study.

    Raises:
        UsageError: a branching study whose shortest budget is too short to leave a cooldown step.
    """
    from convscale_cli.engine.steps import resolve_duration

    recipe = model_recipe(study, registry, model)
    if recipe.schedule != "wsd":
        return ModelSchedule({}, None, {})
    data = registry.dataset(study.dataset)
    info = data.info(**study.data_options) if study.data_options or data.static_info is None else data.static_info
    train_size = int(info.split_sizes.get("train", 0))
    batch = study.batch_size or recipe.base_batch_size
    steps = {
        float(e): resolve_duration(train_size=train_size, batch_size=batch, epochs=float(e)).steps for e in study.epochs
    }
    shortest = steps[min(steps)]
    if study.branching and cooldown_steps(shortest, recipe.cooldown_fraction) < 1:
        raise UsageError(
            f"the {min(steps):g}-epoch budget of {model} is {shortest} step{'s' * (shortest != 1)} at batch {batch}, "
            f"too short for a cooldown of {recipe.cooldown_fraction:g} of its steps to branch into: drop it or use "
            "branching = false"
        )
    # Hagele et al. (2024) warm up for a fixed number of steps; a fraction of each run's length would make every
    # budget's schedule differ from the first step. The shortest budget keeps the recipe's fraction exactly.
    warmup = recipe.warmup_steps
    if warmup is None:
        warmup = int(round(recipe.warmup_fraction * shortest))
    return ModelSchedule(steps, warmup, {e: stable_end(recipe, n) for e, n in steps.items()})


def cell_options(study: StudyConfig, schedule: ModelSchedule) -> dict[str, Any]:
    """Engine options of one model's runs: the study's, with the shared wsd warm-up fixed in the recipe."""
    options = trainer_options(study)
    if schedule.warmup_steps is not None:
        options["recipe"] = {**(study.engine.get("recipe") or {}), "warmup_steps": schedule.warmup_steps}
    return options


class BranchingTrainer:
    """A trainer that trains each run as a cooldown branch of its (model, lr) trunk (module docstring).

    Args:
        study: the branching study.
        schedules: each model's :class:`ModelSchedule`.
        trainer: trains one run, ``trainer(model, dataset, epochs, lr, out, **options) -> summary`` (the engine's by
            default, with ``registry``); it receives the trunk's ``stop_step``/``keep_steps`` and the branch's
            ``branch_from``/``branch_step`` as further engine options.
        registry: where the default trainer looks models and datasets up (default: the installed plugins).
    """

    def __init__(
        self,
        study: StudyConfig,
        schedules: dict[str, ModelSchedule],
        trainer: Trainer | None,
        registry: Registry | None = None,
    ) -> None:
        self.study = study
        self.schedules = schedules
        self.trainer = trainer
        self.registry = registry
        self.longest = max(float(e) for e in study.epochs)

    def trunk_dir(self, out: Path, model: str, lr: float) -> Path:
        """The trunk of ``(model, lr)`` beside the run directory ``out``."""
        return out.parent / TRUNKS / run_name(model, self.longest, lr)

    def __call__(
        self, model: str, dataset: str, epochs: float, lr: float, out: str | Path, **options: Any
    ) -> Mapping[str, Any]:
        # Looked up per call, as tune_cell does; the engine trains with the study's registry.
        train = self.trainer or functools.partial(tuning.engine_trainer, registry=self.registry)
        out = Path(out)
        schedule = self.schedules[model]
        point = schedule.branch_points[float(epochs)]
        trunk = self.trunk_dir(out, model, lr)
        keep = tuple(sorted(set(schedule.branch_points.values())))
        train(model, dataset, self.longest, lr, trunk, **options, stop_step=point, keep_steps=keep)
        if not (trunk / "checkpoints" / str(point)).is_dir() and not (out / "checkpoints").is_dir():
            # The trunk went past this point before the study had it (epochs were added): train from scratch, which
            # gives the same run.
            return train(model, dataset, epochs, lr, out, **options)
        return train(model, dataset, epochs, lr, out, **options, branch_from=str(trunk), branch_step=point)


def run_sweep(
    study: StudyConfig,
    registry: Registry,
    *,
    trainer: Trainer | None = None,
    shard: Shard | None = None,
    wait_timeout: float = 3600.0,
    poll_seconds: float = 5.0,
    on_start: Callable[[CellPlan], None] | None = None,
    on_done: Callable[[CellPlan, TuneResult], None] | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run (or resume) the study's cells, each tuned by the study's rule; with ``shard``, only one worker's share.

    Every worker computes the same dependency graph and assignment (:mod:`convscale_cli.sweep_graph`), runs its own
    cells as they become ready (cheapest first) and waits, polling the runs directory, while each of its remaining
    cells depends on an undecided cell of another worker. Decisions and ``tuning.jsonl`` are those of the
    one-process sweep whatever the number of workers (:mod:`convscale_cli.sweep_dir`).

    Args:
        study: the study.
        registry: models and datasets.
        trainer: ``trainer(model, dataset, epochs, lr, out, **options) -> summary``; default: the jax engine
            (:func:`convscale_cli.tuning.engine_trainer`), training with ``registry``.
        shard: this worker and the number of workers (default: one worker, every cell).
        wait_timeout: seconds to wait with nothing in the runs directory changing before giving up.
        poll_seconds: the longest pause between two looks at the runs directory while waiting.
        on_start: called before a cell runs (live display).
        on_done: called with each cell's decision.
        on_wait: called with a one-line message when the worker starts waiting for another worker's cell.

    Raises:
        SweepStalled: nothing changed in the runs directory for ``wait_timeout`` seconds while waiting.
    """
    from convscale_cli import sweep_dir
    from convscale_cli.sweep_graph import Shard, cell_key, study_graph

    shard = shard or Shard(0, 1)
    graph = study_graph(study, registry)
    cells = list(graph.cells)
    keys = [cell_key(c) for c in cells]
    schedules = {m: model_schedule(study, registry, m) for m in {c.model for c in cells}}
    if study.branching:
        trainer = BranchingTrainer(study, schedules, trainer, registry)
    owner = graph.assign(shard.count)
    remaining = [c for c in cells if owner[cell_key(c)] == shard.index]
    stamp = sweep_dir.fingerprint(study)
    results: dict[tuple[str, float], TuneResult] = {}
    waiter = sweep_dir.Waiter(study.out, shard, owner, wait_timeout, poll_seconds, on_wait)
    while remaining:
        decided = sweep_dir.read_decisions(study.out, keys, study.rule, stamp) if shard.count > 1 else {}
        cell = next((c for c in remaining if shard.count == 1 or sweep_dir.ready(cell_key(c), graph, decided)), None)
        if cell is None:
            waiter.wait(sweep_dir.blocker(cell_key(remaining[0]), graph, decided, owner, shard.index))
            continue
        waiter.reset()
        remaining.remove(cell)
        if on_start is not None:
            on_start(cell)
        deps = set(graph.deps[cell_key(cell)])
        result = tune_cell(
            cell.model,
            cell.epochs,
            study.out,
            dataset=study.dataset,
            registry=registry,
            trainer=trainer,
            options=cell_options(study, schedules[cell.model]),
            grid=(study.grid_for(cell.family) or True) if study.rule == "grid" else False,
            size_axis=study.size_axis,
            start_lr=study.start_lr_for(cell.family),
            hidden=[k for k in keys if k not in deps],
            record_decision=False,
        )
        sweep_dir.write_decision(study.out, result, stamp)
        sweep_dir.rebuild_log(study.out, keys, study.rule, registry.dataset(study.dataset).name)
        results[cell_key(cell)] = result
        if on_done is not None:
            on_done(cell, result)
    done = [c for c in cells if cell_key(c) in results]
    return SweepResult(
        results=tuple(results[cell_key(c)] for c in done),
        grid_sizes=tuple(study.full_grid_size(c.family) for c in done),
    )


@dataclasses.dataclass(frozen=True)
class StudyCompute:
    """What a study's runs directory has spent, each trunk counted once.

    A branch's ledger counts its trunk's share (``trunk_*`` fields), so its ``core_hours`` are its compute on a
    scaling law's axis; the study itself paid only the branch's own part, plus each trunk once.

    Attributes:
        runs: run directories counted (trunks included).
        trunks: trunks among them.
        train_flops: analytic training FLOPs (6 x MACs x examples).
        core_hours: the same on the paper's TPU-v4 core-hour axis.
        device_seconds: measured device time, compilation, evaluation and checkpoints included.
    """

    runs: int
    trunks: int
    train_flops: float
    core_hours: float
    device_seconds: float


def study_compute(runs_dir: str | Path) -> StudyCompute:
    """Sum the compute of every run under ``runs_dir`` with a ``summary.json`` of any status, trunks included.

    Runs that ended without a summary (a diverged trial) are not counted.
    """
    from convscale_cli.runs_dir import scan_runs

    root = Path(runs_dir)
    found, _ = scan_runs(root, statuses=None) if root.is_dir() else ([], [])
    runs = flops = hours = seconds = 0.0
    counted_trunks = 0
    for run in found:
        ledger = run.summary.get("ledger")
        if not isinstance(ledger, dict):
            continue
        spent = sum(float(v) for v in (ledger.get("device_seconds") or {}).values())
        runs += 1
        counted_trunks += run.path.parent.name == TRUNKS
        flops += float(ledger.get("train_flops", 0.0)) - float(ledger.get("trunk_train_flops", 0.0))
        hours += float(ledger.get("core_hours", 0.0)) - float(ledger.get("trunk_core_hours", 0.0))
        seconds += spent - float(ledger.get("trunk_device_seconds", 0.0))
    return StudyCompute(int(runs), counted_trunks, flops, hours, seconds)
