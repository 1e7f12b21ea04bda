"""The dependency graph of a sweep's cells: which cells can run together, what each costs, and which worker runs it.

A study of M models x E budgets is M x E cells, and the two-trial rule chains them: a cell's first learning rate is
the best of the nearest finished cell with a smaller-or-equal model and epoch budget (Smith et al. 2023, §2). The
one-process sweep runs the cells cheapest first, so every such cell has finished when a cell starts. Several workers
reproduce that exactly by waiting for the same cells: a cell *depends on* every earlier cell (in that cheapest-first
order) of its family whose model and budget are no larger; in a branching study each cell waits for the previous
budget of its model (the model's trunks are extended by one cell at a time); and in a study that leaves the
resolution, the batch size or the precision unset, every cell waits for the first (later runs inherit those from the
first finished run, :func:`convscale_cli.tuning.tune_cell`). A cell never
looks at a cell it does not depend on, so its decision is the one-process sweep's whatever the timing.

*Waves* group the cells by the length of their longest chain of dependencies: the cells of a wave can run together.
The *critical path* is the chain of greatest estimated cost; no number of workers finishes the study sooner. Cells
are dealt to workers by simulating the sweep with those costs (each cell, in the cheapest-first order, goes to the
worker free first), so every worker computes the same assignment from the study file alone and no locks are needed.
Nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from convscale_cli.budget import flops_to_core_hours
from convscale_cli.errors import UsageError
from convscale_cli.registry import Registry
from convscale_cli.sweep import CellPlan, StudyConfig, plan_cells
from convscale_cli.tuning import target_size

Key = tuple[str, float]  # (model, epochs): one cell


def cell_key(cell: CellPlan) -> Key:
    """The cell's ``(model, epochs)``."""
    return (cell.model, cell.epochs)


def cell_label(key: Key) -> str:
    """``nfnet-tiny-l1 x 0.5 epochs``."""
    return f"{key[0]} x {key[1]:g} epochs"


@dataclasses.dataclass(frozen=True)
class Shard:
    """Worker ``index`` of ``count`` (``--shard I/N``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise UsageError(f"`shard` {self}: N must be at least 1 worker, e.g. `shard=0/4`")
        if not 0 <= self.index < self.count:
            raise UsageError(
                f"`shard` {self}: worker index {self.index} is not below N = {self.count} (workers are numbered "
                f"0 to {self.count - 1}), e.g. `shard=0/{self.count}`"
            )

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"1/4"`` -> ``Shard(1, 4)``.

        Raises:
            UsageError: not two whole numbers I/N with 0 <= I < N.
        """
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if match is None:
            raise UsageError(f"`shard` {text!r} is not I/N (worker I of N workers, 0 <= I < N), e.g. `shard=0/4`")
        return cls(int(match.group(1)), int(match.group(2)))


@dataclasses.dataclass(frozen=True)
class StudyGraph:
    """The study's cells (cheapest first), what each depends on and what each is estimated to cost.

    Attributes:
        cells: the cells in the one-process sweep's order (:func:`convscale_cli.sweep.plan_cells`).
        deps: each cell's dependencies, in that order.
        trials: runs per cell the rule trains, per family (2 for the two-trial rule, the grid's size for a grid).
        inherits: whether runs inherit settings the study leaves unset from the first finished run, so that every
            cell waits for the first cell (for the cell after it, when every trial of the first failed).
    """

    cells: tuple[CellPlan, ...]
    deps: dict[Key, tuple[Key, ...]]
    trials: dict[str, int]
    inherits: bool = False

    def trials_of(self, key: Key) -> int:
        """Runs the rule trains for the cell."""
        return self.trials[self._by_key[key].family]

    def cost(self, key: Key) -> float:
        """Estimated training FLOPs of the cell: each trial trained from scratch (6 x MACs x examples)."""
        cell = self._by_key[key]
        return self.trials[cell.family] * cell.flops

    @property
    def _by_key(self) -> dict[Key, CellPlan]:
        return {cell_key(c): c for c in self.cells}

    def direct_deps(self, key: Key) -> tuple[Key, ...]:
        """The cell's dependencies that no other of its dependencies already waits for (what ``--plan`` shows)."""
        below: dict[Key, set[Key]] = {}
        for cell in self.cells:
            k = cell_key(cell)
            below[k] = set(self.deps[k]).union(*(below[d] for d in self.deps[k]))
        return tuple(d for d in self.deps[key] if not any(d in below[o] for o in self.deps[key] if o != d))

    def waves(self) -> list[list[Key]]:
        """Cells grouped by the length of their longest dependency chain; a wave's cells can run together."""
        level: dict[Key, int] = {}
        for cell in self.cells:
            key = cell_key(cell)
            level[key] = 1 + max((level[d] for d in self.deps[key]), default=-1)
        waves: list[list[Key]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
        for key, n in level.items():
            waves[n].append(key)
        return waves

    def critical_path(self, costs: Mapping[Key, float] | None = None) -> tuple[list[Key], float]:
        """The dependency chain of greatest total cost, and that cost (FLOPs; or in ``costs``' unit, e.g. measured
        seconds per cell)."""
        finish: dict[Key, float] = {}
        before: dict[Key, Key | None] = {}
        for cell in self.cells:
            key = cell_key(cell)
            prior = max(self.deps[key], key=lambda d: finish[d], default=None)
            before[key] = prior
            own = self.cost(key) if costs is None else costs[key]
            finish[key] = own + (finish[prior] if prior is not None else 0.0)
        if not finish:
            return [], 0.0
        end: Key | None = max(finish, key=lambda k: finish[k])
        total = finish[end]
        path = []
        while end is not None:
            path.append(end)
            end = before[end]
        return path[::-1], total

    def assign(self, workers: int) -> dict[Key, int]:
        """The worker of each cell: the sweep simulated with the estimated costs, each cell to the worker free first.

        Deterministic: it depends only on the study and the registry, so every worker computes the same table.
        """
        return self._simulate(workers)[0]

    def makespan(self, workers: int) -> float:
        """Estimated FLOPs on the busiest worker's timeline when ``workers`` run the study (as :meth:`assign`)."""
        return max(self._simulate(workers)[1].values(), default=0.0)

    def _simulate(self, workers: int) -> tuple[dict[Key, int], dict[Key, float]]:
        free = [0.0] * workers
        finish: dict[Key, float] = {}
        owner: dict[Key, int] = {}
        for cell in self.cells:
            key = cell_key(cell)
            ready = max((finish[d] for d in self.deps[key]), default=0.0)
            worker = min(range(workers), key=lambda w: (max(free[w], ready), w))
            finish[key] = free[worker] = max(free[worker], ready) + self.cost(key)
            owner[key] = worker
        return owner, finish


def study_graph(study: StudyConfig, registry: Registry) -> StudyGraph:
    """The dependency graph of ``study`` (module docstring).

    Raises:
        UnknownNameError, ConfigError: as :func:`convscale_cli.sweep.plan_cells`.
    """
    cells = plan_cells(study, registry)
    if not cells:
        return StudyGraph((), {}, 0)
    inherits = study.resolution is None or study.batch_size is None or "precision" not in study.engine
    data = registry.dataset(study.dataset)
    info = data.info(**study.data_options) if study.data_options or data.static_info is None else data.static_info
    classes = int(study.engine.get("num_classes") or info.num_classes)
    # The resolution the runs train at: the study's, else the first cell's model's, which later runs inherit.
    resolution = study.resolution or registry.architecture(cells[0].model).train_resolution
    size = {m: target_size(registry, m, study.size_axis, resolution, classes) for m in study.models}
    first = cell_key(cells[0])
    deps: dict[Key, tuple[Key, ...]] = {}
    for i, cell in enumerate(cells):
        earlier = cells[:i]
        found: set[Key] = {first} if i and inherits else set()
        if study.rule == "two-trial":  # the cells the rule may take the start alpha from (tuning.nearest_cell)
            found |= {
                cell_key(c)
                for c in earlier
                if c.family == cell.family
                and size[c.model] <= size[cell.model] * (1 + 1e-9)
                and c.epochs <= cell.epochs * (1 + 1e-9)
            }
        if study.branching:  # the model's trunks: one cell at a time extends them
            same = [c for c in earlier if c.model == cell.model]
            if same:
                found.add(cell_key(same[-1]))
        deps[cell_key(cell)] = tuple(cell_key(c) for c in earlier if cell_key(c) in found)
    trials = {family: study.trials_for(family) for family in sorted({c.family for c in cells})}
    return StudyGraph(tuple(cells), deps, trials, inherits)


def plan_dict(graph: StudyGraph, workers: Sequence[int] = (1, 2, 4, 8)) -> dict[str, object]:
    """The ``--plan --json`` document: waves, per-cell cost and worker, critical path, estimated wall time per N."""
    path, critical = graph.critical_path()
    total = sum(graph.cost(cell_key(c)) for c in graph.cells)
    waves = graph.waves()
    wave_of = {key: n for n, wave in enumerate(waves) for key in wave}
    return {
        "cells": [
            {
                "model": c.model,
                "epochs": c.epochs,
                "wave": wave_of[cell_key(c)],
                "trials": graph.trials_of(cell_key(c)),
                "train_flops": graph.cost(cell_key(c)),
                "core_hours": flops_to_core_hours(graph.cost(cell_key(c))),
                "depends_on": [{"model": m, "epochs": e} for m, e in graph.deps[cell_key(c)]],
            }
            for c in graph.cells
        ],
        "waves": [[{"model": m, "epochs": e} for m, e in wave] for wave in waves],
        "critical_path": {
            "cells": [{"model": m, "epochs": e} for m, e in path],
            "train_flops": critical,
            "core_hours": flops_to_core_hours(critical),
        },
        "total": {"train_flops": total, "core_hours": flops_to_core_hours(total)},
        "max_useful_workers": max((len(w) for w in waves), default=0),
        "workers": [
            {
                "workers": n,
                "train_flops": graph.makespan(n),
                "core_hours": flops_to_core_hours(graph.makespan(n)),
                "speedup": total / graph.makespan(n) if graph.makespan(n) else 1.0,
            }
            for n in workers
        ],
    }
