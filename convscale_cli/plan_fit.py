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
import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from convscale_cli.errors import UsageError
from convscale_cli.plan_data import select_models
from convscale_cli.planner import (
    Frontier,
    Plan,
    PlanRequest,
    alpha_for_batch,
    batch_rule,
    candidates,
    hardware_precision,
    round_lr,
)
from convscale_cli.registry import ArchitectureSpec, Registry, head_params

if TYPE_CHECKING:
    from convscale_cli.report.analysis import Cell
    from convscale_cli.report.build import Analysis
    from convscale_cli.report.inference import Noise

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
            f"{str(runs_dir)!r} holds no {request.family} runs (families: {', '.join(found)}); pass `family={found[0]}`"
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


def lr_from_cells(
    cells: list[Cell], model: str, size: float, epochs: float, trend: dict[str, float]
) -> tuple[float, str] | None:
    """The lr alpha for ``model`` at ``epochs`` from the runs' tuned optima, and where it comes from.

    A cell that was run keeps its own tuned optimum. Otherwise the nearest cell in log (size, epochs), preferring a
    smaller-or-equal one as the two-trial rule does, moved by the fitted trend of log lr* on log epochs and log size
    (``report``'s finding (c): ``trend`` holds its ``epochs_slope`` and ``size_slope``, NaN when the cells cannot
    fit one); without a trend the nearest optimum is used as it is and the trials (alpha, alpha/2) cover a fall.
    """
    own = [c for c in cells if c.model == model and math.isclose(c.epochs, epochs, rel_tol=1e-9)]
    if own:
        return own[0].lr, f"the tuned optimum of the cell {model} x {epochs:g} epochs in the runs"
    if not cells:
        return None
    smaller = [c for c in cells if c.size <= size * (1 + 1e-9) and c.epochs <= epochs * (1 + 1e-9)]
    best = min(
        smaller or cells,
        key=lambda c: (math.hypot(math.log(size / c.size), math.log(epochs / c.epochs)), -c.size),
    )
    where = f"the tuned optimum {best.lr:g} of the nearest cell, {best.model} x {best.epochs:g} epochs"
    slopes = {k: trend.get(k, math.nan) for k in ("epochs_slope", "size_slope")}
    if not any(math.isfinite(v) for v in slopes.values()):
        return best.lr, f"{where} (no trend: the cells have too few learning rates to fit one)"
    moved = best.lr
    parts = []
    for key, ratio, what in (("epochs_slope", epochs / best.epochs, "epochs"), ("size_slope", size / best.size, "N")):
        if math.isfinite(slopes[key]) and ratio != 1:
            moved *= ratio ** slopes[key]
            parts.append(f"{what}^{slopes[key]:+.2f}")
    law = " x ".join(parts) if parts else "no change at this cell"
    return moved, f"{where}, moved by the fitted trend lr* ~ {law}"


def _spread_words(spread: Noise) -> str:
    if not spread.known:
        return "not measurable with so few cells: the intervals are the law's alone"
    return f"{100 * (math.exp(spread.sigma) - 1):.1f}% in loss, from {spread.df} degrees of freedom"


def runs_settings(runs_dir: Path, names: list[str]) -> dict[str, object]:
    """The data options, precision and batch size most of the named runs were trained with (their config.json).

    A plan's commands repeat them, so a recommended run trains on the data, in the precision and at the batch its
    predicted loss and tuned learning rate were measured with.
    """
    from convscale_cli.engine.rundir import read_json

    found: dict[str, Counter[str]] = {"data_options": Counter(), "precision": Counter(), "batch_size": Counter()}
    for name in names:
        config = read_json(runs_dir / name / "config.json") or {}
        for key, counter in found.items():
            if config.get(key) is not None:
                counter[json.dumps(config[key], sort_keys=True)] += 1
    return {key: json.loads(counter.most_common(1)[0][0]) for key, counter in found.items() if counter}


def runs_batch_size(runs_dir: str | Path, family: str) -> int | None:
    """The batch size most of the finished ``family`` pre-training runs in ``runs_dir`` used (None: unknown)."""
    from convscale_cli.report.runs import load_runs

    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return None
    runs, _ = load_runs(runs_dir)
    sizes = Counter(r.batch_size for r in runs if r.kind == "pretrain" and r.family == family and r.batch_size > 0)
    return sizes.most_common(1)[0][0] if sizes else None


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
    from convscale_cli.report.inference import fit_noise

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
    # One run's loss scatters about the law by its noise and by how well its lr happens to be tuned: the plan's
    # interval is for the run a user will train, with that spread measured on the fitted runs themselves.
    spread = fit_noise(result.design, result.estimates)
    low, high = fit.prediction_interval(sizes_arr, examples, spread.sigma, spread.df)
    law_low, law_high = fit.interval(sizes_arr, examples)
    n = np.array([c.size for c in result.cells])
    d = np.array([c.examples for c in result.cells])
    same_data = request.dataset.name is not None and request.dataset.name == pretrain[0].dataset
    settings = runs_settings(runs_dir, [r.name for r in pretrain]) if same_data else {}
    runs_batch = Counter(r.batch_size for r in pretrain if r.batch_size > 0).most_common(1)
    if settings.get("data_options"):  # the commands train on the runs' data; options given on the command line win
        options = {**settings["data_options"], **dict(request.dataset.options)}  # type: ignore[dict-item]
        request = dataclasses.replace(
            request, dataset=dataclasses.replace(request.dataset, options=tuple(options.items()))
        )
    ranked = []
    for i, c in enumerate(found):
        tuned = lr_from_cells(result.cells, c.model, sizes_arr[i], c.epochs, result.estimates.lr) if same_data else None
        lr, lr_source = c.lr, c.lr_source
        if tuned is not None:
            optimizer = registry.architecture(c.model).recipe.optimizer
            from_batch = runs_batch[0][0] if runs_batch else request.batch_size
            lr = round_lr(alpha_for_batch(tuned[0], optimizer, from_batch, request.batch_size))
            lr_source = tuned[1] + (
                f", rescaled from batch {from_batch} to {request.batch_size} ({batch_rule(optimizer)} rule)"
                if from_batch != request.batch_size and lr != tuned[0]
                else ""
            )
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
                law_interval=(float(law_low[i]), float(law_high[i])),
                extrapolated=bool(outside),
                extrapolated_in=tuple(outside),
                lr=lr,
                lr_trials=(lr, lr / 2),
                lr_source=lr_source,
            )
        )
    ranked.sort(key=lambda c: (c.predicted_loss, c.extrapolated, -c.macs_per_image))
    notes = [
        f"fitted mode: L(N, D) fitted to the best-lr cells of {result.design.n_cells} (model, epochs) cells in "
        f"{runs_dir} ({result.data_key}), N without the classifier head, seeds averaged; losses are predicted on "
        f"that data's held-out split. Intervals are {int(level * 100)}% prediction intervals for the loss of one run "
        "tuned as the fitted runs were: the law's bootstrap over runs (as convscale report) and the spread of the "
        f"fitted runs about the law ({_spread_words(spread)})",
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
        precision=str(settings.get("precision") or hardware_precision(request.hardware)),
        fit={
            **fit.to_dict(),
            "runs_dir": str(runs_dir),
            "dataset": pretrain[0].dataset,
            "data": result.data_key,
            "cells": result.design.n_cells,
            "noise": result.noise.to_dict(),
        },
    )
