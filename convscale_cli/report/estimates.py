"""From per-run held-out losses to the quantities the paper's findings are about.

Smith et al. (2023, §2) tune the learning rate of every (model, epoch budget) cell, plot each model's best held-out
loss against compute, and read the compute-optimal frontier off the envelope of those curves (Fig. 2); the optimal
learning rate of each cell is plotted against the epoch budget (Fig. 3). This module computes those quantities from
one vector of run losses, so that :mod:`convscale_cli.report.inference` can recompute all of them on resampled losses
(a bootstrap through the whole pipeline: best-lr selection, envelope, fits).

Every function here is plain numpy on the arrays of a :class:`StudyDesign`; nothing depends on how the losses were
obtained, which is what lets the calibration harness (:mod:`convscale_cli.report.simulate`) check the same code on
studies with a known truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convscale_cli.report.parametric import ParametricPoint, select_law

# Fraction of the frontier's log-compute range, from the top, that the back-test holds out (the largest third).
BACKTEST_FRACTION = 1.0 / 3.0
# Compute levels at which the envelope's isoFLOP optimum is located (Hoffmann et al. 2022, Approach 2).
ISOFLOP_LEVELS = 12
# Relative tolerance when deciding that a cell lies on (not above) the envelope.
_ON_ENVELOPE = 1e-12


@dataclass(frozen=True)
class RunPoint:
    """What the estimates need of one pre-training run (see :class:`convscale_cli.report.runs.Run`)."""

    model: str
    family: str
    epochs: float
    lr: float
    size: float
    examples: float
    compute: float
    loss: float


@dataclass(frozen=True)
class StudyDesign:
    """The fixed structure of a study: which runs share a cell and a learning rate.

    Losses are not part of the design: :func:`estimate` takes them as a separate vector (one per run), so a bootstrap
    replicate is a new vector on the same design.

    Attributes:
        models: Model names, one per model index.
        families: Family of each model.
        size: Model size N of each model on the chosen axis.
        cell_model: Model index of each (model, epochs) cell.
        cell_epochs: Epoch budget of each cell.
        lrs: Learning rates tried in each cell, ascending, NaN-padded to a common width.
        group: Flat index ``cell * width + lr_index`` of each run.
        counts: Runs (seeds) per (cell, lr).
        compute: Mean compute (core-hours) of each (cell, lr).
        examples: Mean examples seen of each (cell, lr).
        loss: Observed held-out loss of each run.
    """

    models: tuple[str, ...]
    families: tuple[str, ...]
    size: np.ndarray
    cell_model: np.ndarray
    cell_epochs: np.ndarray
    lrs: np.ndarray
    group: np.ndarray
    counts: np.ndarray
    compute: np.ndarray
    examples: np.ndarray
    loss: np.ndarray = field(repr=False)

    @classmethod
    def from_points(cls, points: Sequence[RunPoint]) -> StudyDesign:
        """Group runs into cells and learning rates (seeds of one (model, epochs, lr) are averaged)."""
        if not points:
            raise ValueError("a study needs at least one run")
        models = sorted({p.model for p in points}, key=lambda m: (min(p.size for p in points if p.model == m), m))
        index = {m: i for i, m in enumerate(models)}
        families = tuple(next(p.family for p in points if p.model == m) for m in models)
        size = np.array([next(p.size for p in points if p.model == m) for m in models], dtype=np.float64)
        cell_keys = sorted({(index[p.model], _epochs_key(p.epochs)) for p in points})
        cell_index = {key: k for k, key in enumerate(cell_keys)}
        per_cell: list[list[float]] = [
            sorted({p.lr for p in points if (index[p.model], _epochs_key(p.epochs)) == key}) for key in cell_keys
        ]
        width = max(len(lrs) for lrs in per_cell)
        lrs = np.full((len(cell_keys), width), np.nan)
        for k, values in enumerate(per_cell):
            lrs[k, : len(values)] = values
        group = np.empty(len(points), dtype=np.int64)
        for r, p in enumerate(points):
            k = cell_index[(index[p.model], _epochs_key(p.epochs))]
            group[r] = k * width + per_cell[k].index(p.lr)
        size_flat = len(cell_keys) * width
        counts = np.bincount(group, minlength=size_flat).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            compute = np.bincount(group, weights=[p.compute for p in points], minlength=size_flat) / counts
            examples = np.bincount(group, weights=[p.examples for p in points], minlength=size_flat) / counts
        shape = (len(cell_keys), width)
        return cls(
            models=tuple(models),
            families=families,
            size=size,
            cell_model=np.array([key[0] for key in cell_keys], dtype=np.int64),
            cell_epochs=np.array([key[1] for key in cell_keys], dtype=np.float64),
            lrs=lrs,
            group=group,
            counts=counts.reshape(shape),
            compute=compute.reshape(shape),
            examples=examples.reshape(shape),
            loss=np.array([p.loss for p in points], dtype=np.float64),
        )

    @property
    def n_cells(self) -> int:
        """Number of (model, epochs) cells."""
        return len(self.cell_model)

    @property
    def lrs_per_cell(self) -> np.ndarray:
        """How many learning rates each cell tried."""
        return np.sum(np.isfinite(self.lrs), axis=1)

    @property
    def max_seeds(self) -> int:
        """The largest number of seeds behind any (cell, lr)."""
        return int(self.counts.max())


def _epochs_key(epochs: float) -> float:
    return round(float(epochs), 9)


def group_means(design: StudyDesign, loss: np.ndarray) -> np.ndarray:
    """Mean loss over the seeds of every (cell, lr), shape ``lrs.shape`` (NaN where no lr was tried)."""
    sums = np.bincount(design.group, weights=loss, minlength=design.counts.size).reshape(design.counts.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(design.counts > 0, sums / design.counts, np.nan)


@dataclass(frozen=True)
class Cells:
    """The best learning rate of every cell (seeds averaged), and where its optimum lies.

    Attributes:
        best: Index of the best lr within each cell.
        lr: Best learning rate.
        loss: Mean held-out loss at the best lr.
        compute: Compute of the best lr's runs.
        examples: Examples seen by the best lr's runs.
        seeds: Seeds averaged at the best lr.
        edge: -1 when the best lr is the lowest tried, +1 the highest, 0 interior; 0 also for cells of < 3 lrs.
        optimum: log2 of the optimal lr from a parabola in log2 lr through the best lr and its neighbours (NaN for
            cells with < 3 lrs or the best at an edge).
    """

    best: np.ndarray
    lr: np.ndarray
    loss: np.ndarray
    compute: np.ndarray
    examples: np.ndarray
    seeds: np.ndarray
    edge: np.ndarray
    optimum: np.ndarray


def best_lrs(design: StudyDesign, means: np.ndarray) -> Cells:
    """Pick each cell's best lr (ties: the larger lr) and locate its optimum on the lr axis."""
    k = np.arange(design.n_cells)
    width = means.shape[1]
    # Reverse the lr axis so that argmin's first-occurrence tie rule picks the larger lr.
    filled = np.where(np.isfinite(means), means, np.inf)[:, ::-1]
    best = width - 1 - np.argmin(filled, axis=1)
    tried = design.lrs_per_cell
    edge = np.zeros(design.n_cells, dtype=np.int64)
    three = tried >= 3
    edge[three & (best == 0)] = -1
    edge[three & (best == tried - 1)] = 1
    optimum = np.full(design.n_cells, np.nan)
    interior = three & (edge == 0)
    if np.any(interior):
        j = best[interior]
        rows = k[interior]
        x = np.log2(design.lrs[rows[:, None], np.stack([j - 1, j, j + 1], axis=1)])
        y = np.log(means[rows[:, None], np.stack([j - 1, j, j + 1], axis=1)])
        optimum[interior] = _parabola_vertex(x, y)
    return Cells(
        best=best,
        lr=design.lrs[k, best],
        loss=means[k, best],
        compute=design.compute[k, best],
        examples=design.examples[k, best],
        seeds=design.counts[k, best],
        edge=edge,
        optimum=optimum,
    )


def _parabola_vertex(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Vertex of the parabola through three points per row (middle point lowest), clipped to the outer two."""
    x0, x1, x2 = x[:, 0], x[:, 1], x[:, 2]
    y0, y1, y2 = y[:, 0], y[:, 1], y[:, 2]
    num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    with np.errstate(invalid="ignore", divide="ignore"):
        vertex = np.where(den != 0, x1 - 0.5 * num / den, x1)
    return np.clip(vertex, x0, x2)


# --- the envelope (Fig. 2) ------------------------------------------------------------------------------------------


def model_curves(design: StudyDesign, cells: Cells) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per model, ``(log compute, log loss)`` of its cells sorted by compute."""
    curves = []
    for m in range(len(design.models)):
        mine = np.flatnonzero(design.cell_model == m)
        order = np.argsort(cells.compute[mine])
        chosen = mine[order]
        curves.append((np.log(cells.compute[chosen]), np.log(cells.loss[chosen])))
    return curves


def curves_at(curves: Sequence[tuple[np.ndarray, np.ndarray]], log_c: np.ndarray) -> np.ndarray:
    """Each model's log loss at ``log_c``, interpolated in log-log between its epoch budgets (inf outside them)."""
    out = np.full((len(curves), len(log_c)), np.inf)
    for m, (x, y) in enumerate(curves):
        if len(x) == 1:
            out[m, np.isclose(log_c, x[0], rtol=0, atol=1e-12)] = y[0]
        elif len(x) > 1:
            out[m] = np.interp(log_c, x, y, left=np.inf, right=np.inf)
    return out


def on_envelope(design: StudyDesign, cells: Cells, curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Which cells lie on the compute-optimal envelope (no other model's curve is lower at their compute)."""
    log_c, log_l = np.log(cells.compute), np.log(cells.loss)
    others = curves_at(curves, log_c)
    others[design.cell_model, np.arange(design.n_cells)] = np.inf
    return np.all(log_l[None, :] <= others + _ON_ENVELOPE, axis=0) & np.isfinite(log_l)


def isoflop_optima(
    design: StudyDesign, curves: Sequence[tuple[np.ndarray, np.ndarray]], levels: int = ISOFLOP_LEVELS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The compute-optimal model size at log-spaced compute levels, read off the envelope (Hoffmann et al. Approach 2).

    At each level the models whose measured curves cover it are compared; where the lowest loss belongs to a model
    strictly inside the ladder, a parabola in log N through it and its two neighbours locates the optimum. Levels
    whose best model is the smallest or largest covering one are "at the edge": the optimum may lie outside the
    ladder, so they give no size.

    Returns:
        ``(log_compute, log_n_opt, interior)`` for every level (NaN ``log_n_opt`` at edge levels).
    """
    covered = [(x[0], x[-1]) for x, _ in curves if len(x) >= 2]
    if len(covered) < 3:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool)
    lows, highs = sorted(lo for lo, _ in covered), sorted((hi for _, hi in covered), reverse=True)
    start, stop = lows[2], highs[2]  # at least three models cover every level between them
    if not stop > start:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool)
    grid = np.linspace(start, stop, levels)
    losses = curves_at(curves, grid)  # [models, levels]; models are ordered by size
    log_n = np.log(design.size)
    n_opt = np.full(levels, np.nan)
    interior = np.zeros(levels, dtype=bool)
    for i in range(levels):
        present = np.flatnonzero(np.isfinite(losses[:, i]))
        if len(present) < 3:
            continue
        j = int(np.argmin(losses[present, i]))
        if 0 < j < len(present) - 1:
            trio = present[j - 1 : j + 2]
            n_opt[i] = _parabola_vertex(log_n[trio][None, :], losses[trio, i][None, :])[0]
            interior[i] = True
    return grid, n_opt, interior


# --- straight lines -------------------------------------------------------------------------------------------------


def ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``(intercept, slope)`` of a least-squares line; NaN with fewer than two distinct x."""
    if len(x) < 2 or np.ptp(x) == 0:
        return math.nan, math.nan
    xc = x - x.mean()
    slope = float(np.dot(xc, y - y.mean()) / np.dot(xc, xc))
    return float(y.mean() - slope * x.mean()), slope


def curvature(x: np.ndarray, y: np.ndarray) -> float:
    """Quadratic coefficient of ``y = c0 + c1 x + c2 x^2`` (x centred); NaN with fewer than four points."""
    if len(x) < 4 or np.ptp(x) == 0:
        return math.nan
    xc = (x - x.mean()) / np.ptp(x)
    design = np.stack([np.ones_like(xc), xc, xc**2], axis=1)
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    return float(coef[2] / np.ptp(x) ** 2)


def backtest(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """Fit a line to the frontier below the largest third of its log-compute range and predict that third.

    Args:
        x: log compute of the frontier points.
        y: log loss.
        weights: seeds behind each point (its noise variance is sigma^2 / seeds).

    Returns:
        ``error`` (mean log residual of the held-out points), ``leverage`` (its variance in units of sigma^2: the
        held-out points' own noise plus the prediction's), and the counts; NaN error when the split leaves < 3 points
        to fit or none to predict.
    """
    cut = x.max() - BACKTEST_FRACTION * np.ptp(x)
    test = x >= cut - 1e-12
    train = ~test
    out = {"trained_on": float(train.sum()), "held_out": float(test.sum()), "error": math.nan, "leverage": math.nan}
    if train.sum() < 3 or test.sum() < 1:
        return out
    intercept, slope = ols(x[train], y[train])
    if not math.isfinite(slope):
        return out
    residual = y[test] - (intercept + slope * x[test])
    xt = x[train] - x[train].mean()
    mean_x = x[test].mean() - x[train].mean()
    # Var(mean residual) / sigma^2: the held-out points' own noise, plus the fitted line's error at their mean x
    # (equal weights in the fit; the seeds of the training points enter through their average).
    own = np.sum(1.0 / weights[test]) / test.sum() ** 2
    fit = float(np.mean(1.0 / weights[train])) * (1.0 / train.sum() + mean_x**2 / float(np.dot(xt, xt)))
    out["error"] = float(residual.mean())
    out["leverage"] = own + fit
    return out


def lr_trend(design: StudyDesign, cells: Cells) -> dict[str, float]:
    """Regress the cells' log2 optimal lr on log2 epochs (and log2 size when several sizes have optima).

    Returns:
        ``epochs_slope``/``size_slope`` (NaN when not estimable) and ``cells`` (interior optima used).
    """
    use = np.isfinite(cells.optimum)
    out = {"epochs_slope": math.nan, "size_slope": math.nan, "cells": float(use.sum())}
    if use.sum() < 3:
        return out
    log_e = np.log2(design.cell_epochs[use])
    log_n = np.log2(design.size[design.cell_model[use]])
    if np.ptp(log_e) == 0:
        return out
    columns = [np.ones_like(log_e), log_e]
    with_size = np.ptp(log_n) > 0 and use.sum() >= 4
    if with_size:
        columns.append(log_n)
    x = np.stack(columns, axis=1)
    coef, _, rank, _ = np.linalg.lstsq(x, cells.optimum[use], rcond=None)
    if rank < x.shape[1]:
        return out
    out["epochs_slope"] = float(coef[1])
    if with_size:
        out["size_slope"] = float(coef[2])
    return out


def family_gap(design: StudyDesign, cells: Cells, convnets: Sequence[str], vit: str, levels: int = 8) -> float:
    """Mean log loss ratio ConvNet / ViT of the two envelopes over their shared compute range (NaN: no overlap)."""
    curves = model_curves(design, cells)
    sides = []
    for names in (tuple(convnets), (vit,)):
        members = [curves[m] for m in range(len(design.models)) if design.families[m] in names]
        members = [c for c in members if len(c[0])]
        if not members:
            return math.nan
        sides.append(members)
    low = max(min(x[0] for x, _ in side) for side in sides)
    high = min(max(x[-1] for x, _ in side) for side in sides)
    if not high >= low:
        return math.nan
    grid = np.linspace(low, high, levels) if high > low else np.array([low])
    conv = np.min(curves_at(sides[0], grid), axis=0)
    vits = np.min(curves_at(sides[1], grid), axis=0)
    ok = np.isfinite(conv) & np.isfinite(vits)
    return float(np.mean(conv[ok] - vits[ok])) if ok.any() else math.nan


# --- everything at once ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimates:
    """Every quantity a verdict or an interval is about, computed from one vector of run losses."""

    cells: Cells
    frontier: np.ndarray  # bool per cell
    b: float  # frontier power-law exponent (L ~ C^-b)
    log_a: float
    curvature: float  # d^2 log L / d (log C)^2 / 2 along the frontier
    backtest: dict[str, float]
    isoflop: tuple[np.ndarray, np.ndarray, np.ndarray]
    size_exponent: float  # a in N_opt ~ C^a, from the isoFLOP optima
    parametric: ParametricPoint | None
    lr: dict[str, float]
    family_gap: float

    def vector(self) -> dict[str, float]:
        """The scalar quantities intervals are computed for."""
        p = self.parametric
        return {
            "b": self.b,
            "log_a": self.log_a,
            "curvature": self.curvature,
            "backtest": self.backtest["error"],
            "a": self.size_exponent,
            "E": p.E if p else math.nan,
            "alpha": p.alpha if p else math.nan,
            "beta": p.beta if p else math.nan,
            "A": p.A if p else math.nan,
            "B": p.B if p else math.nan,
            "parametric_a": p.size_exponent if p else math.nan,
            "lr_epochs_slope": self.lr["epochs_slope"],
            "lr_size_slope": self.lr["size_slope"],
            "family_gap": self.family_gap,
        }


def estimate(
    design: StudyDesign,
    loss: np.ndarray,
    *,
    parametric: bool = True,
    families: tuple[Sequence[str], str] | None = None,
    run_noise: float | None = None,
) -> Estimates:
    """All estimates from one vector of run losses (the observed one, or a bootstrap replicate).

    ``run_noise`` (the standard deviation of one run's log loss) lets the parametric law leave out the terms the
    data do not support (:func:`~convscale_cli.report.parametric.select_law`); without it only terms on a bound are.
    """
    cells = best_lrs(design, group_means(design, loss))
    curves = model_curves(design, cells)
    front = on_envelope(design, cells, curves)
    order = np.argsort(cells.compute[front])
    x = np.log(cells.compute[front])[order]
    y = np.log(cells.loss[front])[order]
    log_a, slope = ols(x, y) if len(x) >= 2 else (math.nan, math.nan)
    iso = isoflop_optima(design, curves)
    grid, n_opt, interior = iso
    size_exponent = math.nan
    if interior.sum() >= 2:
        size_exponent = ols(grid[interior], n_opt[interior])[1]
    fit = None
    if parametric and design.n_cells >= 6:
        # A cell's loss averages its seeds: its noise is the run noise over sqrt(seeds).
        cell_noise = None if run_noise is None else run_noise / math.sqrt(float(np.mean(cells.seeds)))
        fit = select_law(design.size[design.cell_model], cells.examples, cells.loss, noise=cell_noise)
    gap = family_gap(design, cells, *families) if families else math.nan
    return Estimates(
        cells=cells,
        frontier=front,
        b=-slope,
        log_a=log_a,
        curvature=curvature(x, y),
        backtest=backtest(x, y, cells.seeds[front][order]),
        isoflop=iso,
        size_exponent=size_exponent,
        parametric=fit,
        lr=lr_trend(design, cells),
        family_gap=gap,
    )


def summary(design: StudyDesign, est: Estimates) -> dict[str, Any]:
    """Counts a verdict needs about the design itself (not resampled)."""
    tried = design.lrs_per_cell
    return {
        "cells": design.n_cells,
        "models": len(design.models),
        "epoch_budgets": len(set(design.cell_epochs.tolist())),
        "frontier_points": int(est.frontier.sum()),
        "cells_with_3_lrs": int(np.sum(tried >= 3)),
        "max_lrs_per_cell": int(tried.max()) if len(tried) else 0,
        "lr_optima_at_edge": int(np.sum(est.cells.edge != 0)),
        "lr_interior_optima": int(np.sum(np.isfinite(est.cells.optimum))),
        "isoflop_levels": len(est.isoflop[0]),
        "isoflop_interior_levels": int(est.isoflop[2].sum()),
    }
