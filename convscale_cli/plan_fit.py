"""``convscale plan --from RUNS``: rank candidates by the held-out loss a scaling law fitted to your runs predicts.

The law is the parametric ``L(N, D) = E + A/N^alpha + B/D^beta`` (Hoffmann et al. 2022, which Smith et al. 2023 §2
cite for "scale the model size and the number of training epochs at the same rate"), fitted by the same analysis as
``convscale report`` (:func:`convscale_cli.report.build.analyse`): best lr per (model, epochs) cell with seeds
averaged, N = parameters without the classifier head, D = examples seen, and intervals from the bootstrap over runs
whose coverage ``benchmarks/bench_calibration.py`` measures. So ``plan --from`` and ``report`` agree on the same
runs directory by construction.

Candidates are the models present in the runs plus the registry's same-family models sharing a tag with them (so a
ladder study plans over the ladder; ``--models`` overrides), each trained for the epochs the budget affords at the
planned dataset size and resolution. N is counted at the runs' resolution and class count, so it is measured the
way the fitted runs measured it; the cost is counted at the planned resolution and class count.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from convscale_cli.errors import UsageError
from convscale_cli.planner import Frontier, Plan, PlanRequest, candidates, select_models
from convscale_cli.registry import ArchitectureSpec, Registry, head_params

if TYPE_CHECKING:
    from convscale_cli.report.analysis import Cell
    from convscale_cli.report.build import Analysis

BOOTSTRAP = 200
LEVEL = 0.9


def _check_runs(request: PlanRequest, runs_dir: Path) -> str | None:
    """The data setting to analyse (None: the only one), after checking the runs hold the requested family."""
    from convscale_cli.report.runs import load_runs

    runs, _ = load_runs(runs_dir)
    runs = [r for r in runs if r.kind == "pretrain"]
    if not runs:
        raise UsageError(f"no finished pre-training runs in {str(runs_dir)!r}; train some (convscale sweep) first")
    family = [r for r in runs if r.family == request.family]
    if not family:
        found = sorted({r.family for r in runs})
        raise UsageError(
            f"{str(runs_dir)!r} holds no {request.family} runs (families: {', '.join(found)}); pass --family {found[0]}"
        )
    names = {r.dataset for r in family}
    return request.dataset.name if request.dataset.name in names else None


def _candidate_specs(request: PlanRequest, registry: Registry, models: set[str]) -> list[ArchitectureSpec]:
    present = [registry.architecture(m) for m in sorted(models) if m in registry.architectures]
    if request.models:
        return select_models(registry, request.family, request.models)
    tags = sorted({tag for spec in present for tag in spec.tags})
    chosen = {s.name: s for s in (*present, *select_models(registry, request.family, tags=tags))}
    return list(chosen.values())


def _lr_trials(cells: list[Cell], model: str, size: float, epochs: float) -> tuple[float, float] | None:
    """The two learning rates to try for a candidate: the paper's two-trial rule (Smith et al. 2023, §1.5).

    A candidate the study trained: its tuned lr and half of it -- or, when that lr was the largest its cell tried,
    twice it and itself: the optimum may lie above, and 2 alpha is the probe the rule offers when the upper trial
    wins. Otherwise the best lr of the nearest smaller-or-equal cell and half of it. None: no such cell.
    """
    own = [c for c in cells if c.model == model and math.isclose(c.epochs, epochs, rel_tol=1e-9)]
    if own:
        cell = own[0]
        if len(cell.lrs) >= 2 and math.isclose(cell.lr, max(cell.lrs), rel_tol=1e-9):
            return 2 * cell.lr, cell.lr
        return cell.lr, cell.lr / 2
    eligible = [c for c in cells if c.size <= size * (1 + 1e-9) and c.epochs <= epochs * (1 + 1e-9)]
    if not eligible:
        return None
    best = min(eligible, key=lambda c: (math.hypot(math.log(size / c.size), math.log(epochs / c.epochs)), -c.size))
    return best.lr, best.lr / 2


def plan_fitted(
    request: PlanRequest,
    registry: Registry,
    runs_dir: str | Path,
    *,
    bootstrap: int = BOOTSTRAP,
    level: float = LEVEL,
    analysis: Analysis | None = None,
) -> Plan:
    """Fit ``L(N, D)`` to the runs in ``runs_dir`` and rank the affordable candidates by predicted loss.

    ``analysis`` reuses an :func:`~convscale_cli.report.build.analyse` result of the same runs directory (the
    calibration harness judges the report and the plan on one bootstrap).

    Raises:
        UsageError: no usable runs, runs on several data settings without ``--dataset``, fewer than 6 cells to fit,
            or a budget too small for any candidate.
    """
    import numpy as np

    from convscale_cli.report.build import analyse

    runs_dir = Path(runs_dir)
    dataset = _check_runs(request, runs_dir)
    result = analysis or analyse(runs_dir, dataset=dataset, family=request.family, replicates=bootstrap, level=level)
    fit = result.parametric
    if fit is None:
        raise UsageError(
            f"{str(runs_dir)!r} has {result.design.n_cells} finished (model, epochs) cells; the law L(N, D) has 5 "
            "parameters and needs at least 6 cells (e.g. 3 models x 2 epoch budgets)"
        )
    pretrain = [r for r in result.runs if r.kind == "pretrain"]
    specs = _candidate_specs(request, registry, {r.model for r in pretrain})
    frontier = Frontier()
    found, frontier_macs = candidates(request, specs, frontier)
    # N as the runs counted it: at their resolution and class count, without the classifier head.
    fit_resolution = Counter(r.train_resolution for r in pretrain).most_common(1)[0][0]
    fit_classes = Counter(r.num_classes for r in pretrain).most_common(1)[0][0]
    sizes = []
    for c in found:
        count = registry.architecture(c.model).count
        sizes.append(count(fit_resolution, fit_classes).params - head_params(count, fit_resolution, fit_classes))
    sizes_arr = np.array(sizes, dtype=float)
    examples = np.array([c.examples for c in found], dtype=float)
    mean = fit.predict(sizes_arr, examples)
    low, high = fit.interval(sizes_arr, examples)
    n = np.array([c.size for c in result.cells])
    d = np.array([c.examples for c in result.cells])
    same_data = request.dataset.name is not None and request.dataset.name == pretrain[0].dataset
    ranked = []
    for i, c in enumerate(found):
        trials = _lr_trials(result.cells, c.model, sizes_arr[i], c.epochs) if same_data else None
        trials = (c.lr, c.lr / 2) if trials is None else trials
        outside = []
        if not n.min() <= sizes_arr[i] <= n.max():
            outside.append("model size")
        if not d.min() <= examples[i] <= d.max():
            outside.append("example count")
        ranked.append(
            dataclasses.replace(
                c,
                predicted_loss=float(mean[i]),
                loss_interval=(float(low[i]), float(high[i])),
                extrapolated=bool(outside),
                extrapolated_in=tuple(outside),
                lr=trials[0],
                lr_trials=trials,
            )
        )
    ranked.sort(key=lambda c: (c.predicted_loss, c.extrapolated, -c.macs_per_image))
    notes = [
        f"fitted mode: L(N, D) fitted to the best-lr cells of {result.design.n_cells} (model, epochs) cells in "
        f"{runs_dir} ({result.data_key}), N without the classifier head, seeds averaged; losses are predicted on "
        f"that data's held-out split with {int(level * 100)}% bootstrap intervals over runs (as convscale report)",
        *fit.warnings,
        *(f"{name} not quoted: {why}" for name, why in fit.unquoted.items()),
    ]
    if not same_data:
        notes.append("learning rates are the paper prior: the runs are on another dataset than the plan")
    return Plan(
        mode="fitted",
        request=request,
        frontier_examples=frontier.examples(request.flops),
        frontier_macs=frontier_macs,
        candidates=tuple(ranked[: request.top]),
        notes=tuple(notes),
        fit={
            **fit.to_dict(),
            "runs_dir": str(runs_dir),
            "dataset": pretrain[0].dataset,
            "data": result.data_key,
            "cells": result.design.n_cells,
            "noise": result.noise.to_dict(),
        },
    )
