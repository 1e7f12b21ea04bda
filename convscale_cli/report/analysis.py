"""From runs to the quantities the paper plots: best-lr cells, the compute frontier, optima, back-test, families.

Smith et al. (2023, §2) tune the learning rate per (model, epoch budget) and plot, per model, the best held-out loss
against compute; the envelope of those curves is the compute frontier the scaling law is fitted to. Everything here
works on that "cell" level so a badly tuned learning rate never counts as a data point of the law.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from convscale_cli.report.fit import FitError, ParametricFit, PowerLawFit, fit_parametric, fit_power_law
from convscale_cli.report.runs import Run

# Published fine-tuned ImageNet top-1 of JFT-pre-trained models, on the paper's TPU-v4 core-hour axis
# (paper-facts §1.6 and §2.2). They are reference points from other papers, never fitted to.
REFERENCE_POINTS: tuple[dict[str, Any], ...] = (
    {"model": "NFNet-F7+", "core_hours": 110e3, "top1": 90.3, "source": "Smith et al. 2023 (arXiv 2310.16764)"},
    {"model": "NFNet-F7+ (RA)", "core_hours": 110e3, "top1": 90.4, "source": "Smith et al. 2023 (arXiv 2310.16764)"},
    {
        "model": "ViT-g/14",
        "core_hours": 120e3,
        "top1": 90.2,
        "source": "Zhai et al. 2022 / Alabdulmohsin et al. 2023; TPU-v4 estimate from Smith et al. 2023",
    },
    {
        "model": "ViT-G/14",
        "core_hours": 280e3,
        "top1": 90.45,
        "source": "Zhai et al. 2022 (arXiv 2106.04560); TPU-v4 estimate from Smith et al. 2023",
    },
    {
        "model": "SoViT-400m/14",
        "core_hours": 130e3,
        "top1": 90.3,
        "source": "Alabdulmohsin et al. 2023 (arXiv 2305.13035); TPU-v4 estimate from Smith et al. 2023",
    },
)


@dataclass(frozen=True)
class Cell:
    """The best learning rate of one (model, epoch budget), seeds averaged.

    Attributes:
        model: Architecture name.
        family: Model family.
        epochs: Epoch budget.
        lr: Learning rate with the lowest mean held-out loss.
        loss: That mean held-out loss.
        core_hours: Mean compute of the runs at that learning rate.
        params: Parameter count.
        macs: Forward MACs per image at the training resolution.
        examples: Mean examples seen.
        lrs: Every learning rate tried in this cell, ascending.
        seeds: Runs averaged at the best learning rate.
    """

    model: str
    family: str
    epochs: float
    lr: float
    loss: float
    core_hours: float
    params: float
    macs: float
    examples: float
    lrs: tuple[float, ...]
    seeds: int

    @property
    def lr_at_edge(self) -> bool:
        """True when the best lr is the smallest or largest tried: the true optimum may lie outside the grid."""
        return len(self.lrs) > 1 and self.lr in (self.lrs[0], self.lrs[-1])

    def size(self, axis: str) -> float:
        """Model size on the chosen axis ("params" or "macs")."""
        return self.params if axis == "params" else self.macs

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["lrs"] = list(self.lrs)
        data["lr_at_edge"] = self.lr_at_edge
        return data


def best_cells(runs: Iterable[Run]) -> list[Cell]:
    """Collapse pre-training runs to one :class:`Cell` per (model, epochs), sorted by compute."""
    by_lr: dict[tuple[str, float, float], list[Run]] = defaultdict(list)
    for run in runs:
        if run.kind == "pretrain":
            by_lr[(run.model, run.epochs, run.lr)].append(run)
    by_cell: dict[tuple[str, float], list[tuple[float, list[Run]]]] = defaultdict(list)
    for (model, epochs, lr), group in by_lr.items():
        by_cell[(model, epochs)].append((lr, group))
    cells = []
    for (model, epochs), options in by_cell.items():
        lr, group = min(options, key=lambda o: (statistics.fmean(r.eval_loss for r in o[1]), o[0]))
        cells.append(
            Cell(
                model=model,
                family=group[0].family,
                epochs=epochs,
                lr=lr,
                loss=statistics.fmean(r.eval_loss for r in group),
                core_hours=statistics.fmean(r.core_hours for r in group),
                params=group[0].params,
                macs=group[0].macs_per_image,
                examples=statistics.fmean(r.examples_seen for r in group),
                lrs=tuple(sorted(o[0] for o in options)),
                seeds=len(group),
            )
        )
    return sorted(cells, key=lambda c: (c.core_hours, c.loss))


def frontier(cells: Iterable[Cell]) -> list[Cell]:
    """Pareto frontier: the cells no cheaper-or-equal cell beats on loss, by increasing compute."""
    best = math.inf
    kept = []
    for cell in sorted(cells, key=lambda c: (c.core_hours, c.loss)):
        if cell.loss < best:
            kept.append(cell)
            best = cell.loss
    return kept


def best_at(cells: Sequence[Cell], compute: float) -> float:
    """Lowest loss reached with at most ``compute`` (NaN when nothing is that cheap)."""
    losses = [c.loss for c in cells if c.core_hours <= compute * (1 + 1e-9)]
    return min(losses) if losses else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (NaN when either side is constant or there are fewer than 3 points)."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def compute_grid(cells: Sequence[Cell], extend: float = 100.0, points_per_decade: int = 2) -> np.ndarray:
    """Log-spaced compute values from the cheapest cell to ``extend`` times the most expensive one."""
    low = min(c.core_hours for c in cells)
    high = max(c.core_hours for c in cells) * extend
    count = max(2, int(math.ceil(math.log10(high / low) * points_per_decade)) + 1)
    return np.logspace(math.log10(low), math.log10(high), count)


def optimal_configs(
    fit: ParametricFit, cells: Sequence[Cell], computes: Iterable[float], size_axis: str
) -> list[dict[str, Any]]:
    """Compute-optimal model and epoch budget per compute value, predicted by the parametric law.

    Each observed model is a candidate. Its cost per example is read from its own runs' ledgers (core-hours per
    example seen), so the extrapolation uses exactly the compute accounting of the data (``C ~ 6 * MACs * D`` when the
    ledger counts FLOPs; measured throughput, as in the paper's §1.6, when it counts time).
    """
    per_model: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        per_model[cell.model].append(cell)
    candidates = []
    for model, group in per_model.items():
        cost = statistics.median(c.core_hours / c.examples for c in group)
        per_epoch = statistics.median(c.examples / c.epochs for c in group)
        candidates.append((model, group[0].size(size_axis), group[0].params, cost, per_epoch))
    largest = max(c[1] for c in candidates)
    # With N in MACs the law also gives a continuous optimum (Hoffmann et al. eq. 4) at C = 6 * MACs * D FLOPs; the
    # FLOPs per core-hour are read off the runs so the budget stays on the paper's axis.
    flops_per_core_hour = statistics.median(6.0 * c.macs * c.examples / c.core_hours for c in cells)
    per_epoch_all = statistics.median(c.examples / c.epochs for c in cells)
    rows = []
    for compute in computes:
        options = []
        for model, size, params, cost, per_epoch in candidates:
            examples = compute / cost
            options.append((float(fit.predict(size, examples)[0]), model, size, params, examples, per_epoch))
        loss, model, size, params, examples, per_epoch = min(options)
        continuous: dict[str, float] = {}
        if size_axis == "macs":
            n_opt, d_opt = fit.optimal_allocation(compute * flops_per_core_hour)
            continuous = {"continuous_macs": float(n_opt[0]), "continuous_epochs": float(d_opt[0]) / per_epoch_all}
        rows.append(
            {
                **continuous,
                "core_hours": float(compute),
                "model": model,
                "params": params,
                "epochs": examples / per_epoch,
                "examples": examples,
                "predicted_loss": loss,
                # The best candidate being the largest one tried means the optimum may be a larger, untried model.
                "at_largest_model": size == largest and len(candidates) > 1,
            }
        )
    return rows


def lr_by_epochs(cells: Iterable[Cell]) -> dict[str, list[dict[str, Any]]]:
    """Per model, the best lr at each epoch budget where at least two lrs were tried."""
    table: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for cell in sorted(cells, key=lambda c: (c.model, c.epochs)):
        if len(cell.lrs) >= 2:
            table[cell.model].append(
                {"epochs": cell.epochs, "lr": cell.lr, "lrs": list(cell.lrs), "at_edge": cell.lr_at_edge}
            )
    return dict(table)


def _mean_abs_rel_error(predicted: Sequence[float], observed: Sequence[float]) -> float | None:
    if not predicted:
        return None
    return float(np.mean([abs(p - o) / o for p, o in zip(predicted, observed, strict=True)]))


def backtest(
    cells: Sequence[Cell], *, holdout_fraction: float = 0.2, size_axis: str = "params", bootstrap: int = 0
) -> dict[str, Any]:
    """Refit without the largest-compute cells and predict them.

    Args:
        cells: All best-lr cells.
        holdout_fraction: Share of cells (by compute, largest first) held out; at least one.
        size_axis: Size axis of the parametric fit.
        bootstrap: Bootstrap resamples for the refits (0: point estimates only, which is all a back-test needs).

    Returns:
        The threshold, per held-out cell the observed and predicted losses, mean absolute relative errors, and
        ``skipped`` reasons for a law that could not be refitted.
    """
    ordered = sorted(cells, key=lambda c: c.core_hours)
    holdout = max(1, round(holdout_fraction * len(ordered)))
    train, test = ordered[:-holdout], ordered[-holdout:]
    result: dict[str, Any] = {"held_out": len(test), "trained_on": len(train), "rows": [], "skipped": []}
    if not train:
        result["skipped"].append("too few cells to hold any out")
        return result
    result["threshold_core_hours"] = test[0].core_hours
    full_frontier = {id(c) for c in frontier(cells)}
    power: PowerLawFit | None = None
    parametric: ParametricFit | None = None
    try:
        power = fit_power_law(
            [c.core_hours for c in frontier(train)], [c.loss for c in frontier(train)], bootstrap=bootstrap
        )
    except FitError as exc:
        result["skipped"].append(f"power law: {exc}")
    try:
        parametric = fit_parametric(
            [c.size(size_axis) for c in train],
            [c.examples for c in train],
            [c.loss for c in train],
            size_axis=size_axis,
            bootstrap=bootstrap,
        )
    except FitError as exc:
        result["skipped"].append(f"parametric law: {exc}")
    for cell in test:
        result["rows"].append(
            {
                "model": cell.model,
                "epochs": cell.epochs,
                "core_hours": cell.core_hours,
                "observed": cell.loss,
                "on_frontier": id(cell) in full_frontier,
                "power_law": float(power.predict(cell.core_hours)[0]) if power else None,
                "parametric": float(parametric.predict(cell.size(size_axis), cell.examples)[0]) if parametric else None,
            }
        )
    frontier_rows = [r for r in result["rows"] if r["on_frontier"] and r["power_law"] is not None]
    parametric_rows = [r for r in result["rows"] if r["parametric"] is not None]
    # The power law describes the frontier, so only held-out frontier cells are fair tests of it.
    result["power_law_error"] = _mean_abs_rel_error(
        [r["power_law"] for r in frontier_rows], [r["observed"] for r in frontier_rows]
    )
    result["parametric_error"] = _mean_abs_rel_error(
        [r["parametric"] for r in parametric_rows], [r["observed"] for r in parametric_rows]
    )
    return result


def family_comparison(cells: Sequence[Cell], *, bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
    """Frontier and power law per family, and the best loss of each at matched compute where their ranges overlap."""
    families: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        families[cell.family].append(cell)
    out: dict[str, Any] = {"families": {}, "matched": [], "overlap": None}
    fronts = {name: frontier(group) for name, group in sorted(families.items())}
    for name, front in fronts.items():
        entry: dict[str, Any] = {"frontier": [c.to_dict() for c in front], "fit": None}
        if len(front) >= 2:
            try:
                entry["fit"] = fit_power_law(
                    [c.core_hours for c in front], [c.loss for c in front], bootstrap=bootstrap, seed=seed
                ).to_dict()
            except FitError as exc:
                entry["fit_error"] = str(exc)
        out["families"][name] = entry
    if len(fronts) < 2:
        return out
    low = max(front[0].core_hours for front in fronts.values())
    high = min(front[-1].core_hours for front in fronts.values())
    if low > high:
        return out
    out["overlap"] = [low, high]
    points = sorted({c.core_hours for front in fronts.values() for c in front if low <= c.core_hours <= high})
    for compute in points:
        row: dict[str, Any] = {"core_hours": compute}
        for name, front in fronts.items():
            row[name] = best_at(front, compute)
        out["matched"].append(row)
    return out


def finetune_points(runs: Iterable[Run]) -> list[dict[str, Any]]:
    """Best fine-tuned top-1 per pre-training run, against that run's pre-training compute.

    A from-scratch baseline (``finetune --scratch``) is its own point with ``scratch`` set and no pre-training compute.
    """
    best: dict[tuple[str, str], Run] = {}
    for run in runs:
        if run.kind != "finetune" or math.isnan(run.eval_top1):
            continue
        key = (run.pretrain_run or run.name, run.dataset)
        if key not in best or run.eval_top1 > best[key].eval_top1:
            best[key] = run
    return sorted(
        (
            {
                "model": r.model,
                "family": r.family,
                "dataset": r.dataset,
                "pretrain_run": r.pretrain_run,
                "pretrain_core_hours": r.pretrain_core_hours,
                "top1": 100.0 * r.eval_top1,
                "run": r.name,
                "scratch": r.from_scratch,
            }
            for r in best.values()
        ),
        key=lambda p: (p["dataset"], p["pretrain_core_hours"]),
    )
