"""``convscale plan --from RUNS``: rank candidates by the held-out loss a scaling law fitted to your runs predicts.

The law is the parametric ``L(N, D) = E + A/N^alpha + B/D^beta`` (Hoffmann et al. 2022, which Smith et al. 2023 §2
cite for "scale the model size and the number of training epochs at the same rate"), fitted by
:func:`convscale_cli.report.fit.fit_parametric` to the best-lr run of every finished (model, epochs) cell, the paper's
own frontier construction (Fig. 2 plots each cell at its tuned learning rate). N is the parameter count and D the
examples seen. The interval of each prediction is the fit's pairs-bootstrap interval.

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

from convscale_cli.errors import UsageError
from convscale_cli.planner import Frontier, Plan, PlanRequest, candidates, select_models
from convscale_cli.registry import ArchitectureSpec, Registry
from convscale_cli.tuning import RunRecord, group_cells, load_runs, nearest_cell

BOOTSTRAP = 100
LEVEL = 0.9


def _runs_for(request: PlanRequest, runs_dir: Path) -> list[RunRecord]:
    runs = load_runs(runs_dir)
    if not runs:
        raise UsageError(f"no finished pre-training runs in {str(runs_dir)!r}; train some (convscale sweep) first")
    family = [r for r in runs if r.family == request.family]
    if not family:
        found = sorted({r.family for r in runs})
        raise UsageError(
            f"{str(runs_dir)!r} holds no {request.family} runs (families: {', '.join(found)}); pass --family {found[0]}"
        )
    datasets = sorted({r.dataset for r in family})
    if request.dataset.name in datasets:
        return [r for r in family if r.dataset == request.dataset.name]
    if len(datasets) > 1:
        raise UsageError(
            f"{str(runs_dir)!r} holds runs on {', '.join(datasets)}; losses on different datasets cannot share one "
            "law: pass --dataset to pick one"
        )
    return family


def _candidate_specs(request: PlanRequest, registry: Registry, runs: list[RunRecord]) -> list[ArchitectureSpec]:
    present = [registry.architecture(m) for m in sorted({r.model for r in runs}) if m in registry.architectures]
    if request.models:
        return select_models(registry, request.family, request.models)
    tags = sorted({tag for spec in present for tag in spec.tags})
    chosen = {s.name: s for s in (*present, *select_models(registry, request.family, tags=tags))}
    return list(chosen.values())


def plan_fitted(
    request: PlanRequest, registry: Registry, runs_dir: str | Path, *, bootstrap: int = BOOTSTRAP, level: float = LEVEL
) -> Plan:
    """Fit ``L(N, D)`` to the runs in ``runs_dir`` and rank the affordable candidates by predicted loss.

    Raises:
        UsageError: no usable runs, runs on several datasets without ``--dataset``, fewer than 5 cells to fit, or a
            budget too small for any candidate.
    """
    import numpy as np

    from convscale_cli.report.fit import fit_parametric

    runs_dir = Path(runs_dir)
    runs = _runs_for(request, runs_dir)
    cells = group_cells(runs)
    best = [c.best for c in cells if np.isfinite(c.best.eval_loss)]
    if len(best) < 5:
        raise UsageError(
            f"{str(runs_dir)!r} has {len(best)} finished (model, epochs) cells; the law L(N, D) has 5 parameters and "
            "needs at least 5 cells (e.g. 3 models x 2 epoch budgets)"
        )
    n = np.array([r.params for r in best], dtype=float)
    d = np.array([r.examples_seen for r in best], dtype=float)
    fit = fit_parametric(n, d, [r.eval_loss for r in best], size_axis="params", bootstrap=bootstrap, level=level)

    specs = _candidate_specs(request, registry, runs)
    frontier = Frontier()
    found, frontier_macs = candidates(request, specs, frontier)
    # N as the runs counted it: at their resolution and class count (one dataset, so one of each in practice).
    fit_resolution = Counter(r.train_resolution for r in best).most_common(1)[0][0]
    fit_classes = Counter(r.num_classes for r in best).most_common(1)[0][0]
    sizes = np.array(
        [registry.architecture(c.model).count(fit_resolution, fit_classes).params for c in found], dtype=float
    )
    examples = np.array([c.examples for c in found], dtype=float)
    mean = fit.predict(sizes, examples)
    low, high = fit.interval(sizes, examples)
    same_data = request.dataset.name is not None and request.dataset.name == best[0].dataset
    ranked = []
    for i, c in enumerate(found):
        lr = c.lr
        if same_data:
            # The cell's own tuned lr when it was run, else the two-trial rule's start from the nearest smaller cell.
            own = [cell for cell in cells if cell.model == c.model and math.isclose(cell.epochs, c.epochs)]
            neighbour = own[0] if own else nearest_cell(cells, c.model, sizes[i], c.epochs)
            lr = neighbour.best.lr if neighbour is not None else lr
        extrapolated = not (n.min() <= sizes[i] <= n.max() and d.min() <= examples[i] <= d.max())
        ranked.append(
            dataclasses.replace(
                c,
                predicted_loss=float(mean[i]),
                loss_interval=(float(low[i]), float(high[i])),
                extrapolated=extrapolated,
                lr=lr,
                lr_trials=(lr, lr / 2),
            )
        )
    ranked.sort(key=lambda c: (c.predicted_loss, c.extrapolated, -c.macs_per_image))
    notes = [
        f"fitted mode: L(N, D) fitted to the best-lr run of {len(best)} cells in {runs_dir} "
        f"({best[0].dataset}, {fit_resolution} px); losses are predicted on that dataset's held-out split, "
        f"{int(level * 100)}% bootstrap intervals",
        *fit.warnings,
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
        fit={**fit.to_dict(), "runs_dir": str(runs_dir), "dataset": best[0].dataset, "cells": len(best)},
    )
