"""Honest uncertainty for every estimate: run noise, and a bootstrap over runs through the whole pipeline.

A study's estimates (best-lr selection, the envelope, the frontier law, the isoFLOP optima, the parametric law, the
lr trend) are all functions of the vector of run losses. Their uncertainty is that of the runs, so it is measured by
resampling the runs: each bootstrap replicate perturbs every run's log loss by fresh noise of the measured size and
recomputes everything from scratch — selection included (the best lr of each cell, and the terms of the parametric
law), so a cell whose best lr flips between replicates widens
the intervals as it should.

The noise is the seed-to-seed spread when any (cell, lr) was run with two or more seeds (pooled over all of them);
otherwise the residual spread of the parametric law (a model-based, conservative estimate: any misfit of the law
counts as noise). Its own uncertainty is propagated: each replicate draws its noise level from the scaled
inverse-chi-square distribution of the estimate, which makes the intervals t-like for small studies.

Whether this is calibrated is not argued but measured: ``benchmarks/bench_calibration.py`` runs simulated studies
with a known truth through the real report and checks the coverage of every interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from convscale_cli.report.estimates import Estimates, StudyDesign, estimate, group_means
from convscale_cli.report.parametric import law

DEFAULT_REPLICATES = 200
LEVEL = 0.9
# An interval is formed only when at least this share of replicates could estimate the quantity.
MIN_DEFINED = 0.8


@dataclass(frozen=True)
class Noise:
    """Run-to-run noise of log held-out loss.

    Attributes:
        sigma: Standard deviation of one run's log loss (NaN when it cannot be estimated).
        df: Degrees of freedom behind it.
        source: "seeds" (spread between seeds), "lr response" (residuals of each cell's lr parabola), "fit"
            (parametric-law residuals) or "none".
    """

    sigma: float
    df: int
    source: str

    @property
    def known(self) -> bool:
        """True when the noise could be estimated."""
        return math.isfinite(self.sigma) and self.df > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return {"sigma": self.sigma, "df": self.df, "source": self.source}


def seed_noise(design: StudyDesign) -> Noise:
    """Pooled within-(cell, lr) standard deviation of log loss over seeds."""
    log_l = np.log(design.loss)
    flat = design.counts.ravel()
    means = np.bincount(design.group, weights=log_l, minlength=flat.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(flat > 0, means / flat, 0.0)
    residual = log_l - means[design.group]
    df = int(np.sum(np.maximum(flat - 1, 0)))
    if df == 0:
        return Noise(math.nan, 0, "none")
    return Noise(float(math.sqrt(np.sum(residual**2) / df)), df, "seeds")


def fit_noise(design: StudyDesign, est: Estimates) -> Noise:
    """Noise of one run from the parametric law's residuals on the cells (seeds scale it: sigma^2 / seeds)."""
    fit = est.parametric
    if fit is None:
        return Noise(math.nan, 0, "none")
    # Degrees of freedom: the cells less the law's free parameters (a term left out takes its exponent with it).
    dof = design.n_cells - 5 + int(fit.E == 0) + 2 * int(fit.A == 0) + 2 * int(fit.B == 0)
    if dof < 2:
        return Noise(math.nan, 0, "none")
    cells = est.cells
    predicted = law(fit.array(), design.size[design.cell_model], cells.examples)
    residual = (np.log(cells.loss) - np.log(predicted)) * np.sqrt(cells.seeds)
    return Noise(float(math.sqrt(np.sum(residual**2) / dof)), dof, "fit")


def lr_noise(design: StudyDesign) -> Noise:
    """Noise of one run from the lr response: a parabola in log2 lr through each cell's learning rates.

    Near its optimum the held-out loss is smooth in log lr, so within two octaves of the best lr a parabola leaves
    only noise. Cells with at least four such learning rates contribute ``lrs - 3`` degrees of freedom each.
    """
    log_mean = np.log(group_means(design, design.loss))
    total, dof = 0.0, 0
    for k in range(design.n_cells):
        x = np.log2(design.lrs[k])
        y = log_mean[k]
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 4:
            continue
        best = x[ok][np.argmin(y[ok])]
        near = ok & (np.abs(x - best) <= 2.0 + 1e-9)
        if near.sum() < 4:
            continue
        w = design.counts[k][near]
        basis = np.stack([np.ones(near.sum()), x[near], x[near] ** 2], axis=1)
        coef = np.linalg.lstsq(basis * np.sqrt(w)[:, None], y[near] * np.sqrt(w), rcond=None)[0]
        total += float(np.sum(w * (y[near] - basis @ coef) ** 2))
        dof += int(near.sum()) - 3
    if dof == 0:
        return Noise(math.nan, 0, "none")
    return Noise(math.sqrt(total / dof), dof, "lr response")


def measure_noise(design: StudyDesign, est: Estimates) -> Noise:
    """Seeds when the study has them, else the lr response of cells with >= 4 lrs, else the law's residuals."""
    for noise in (seed_noise(design), lr_noise(design)):
        if noise.known:
            return noise
    return fit_noise(design, est)


@dataclass(frozen=True)
class Bootstrap:
    """Replicates of every scalar estimate, and the intervals read from them.

    Attributes:
        draws: Quantity name -> array of replicate values (NaN where a replicate could not estimate it).
        parametric: Replicate parameter vectors ``(E, A, alpha, B, beta)`` of the law, ``[k, 5]``.
        level: Confidence level.
    """

    draws: dict[str, np.ndarray]
    parametric: np.ndarray
    level: float

    @property
    def replicates(self) -> int:
        """Number of replicates drawn."""
        return len(next(iter(self.draws.values()))) if self.draws else 0

    def defined(self, name: str) -> float:
        """Share of replicates in which ``name`` could be estimated."""
        values = self.draws.get(name)
        return float(np.mean(np.isfinite(values))) if values is not None and len(values) else 0.0

    def interval(self, name: str, observed: float) -> tuple[float, float] | None:
        """Equal-tailed percentile interval of the replicates; None when too few replicates could estimate it.

        Percentile rather than basic (reverse-percentile) intervals: on the simulated studies of
        ``benchmarks/bench_calibration.py`` the percentile intervals of every quantity covered the truth at close to
        their nominal level, the basic ones at 73-87% for a nominal 90%.
        """
        values = self.draws.get(name)
        if values is None or not math.isfinite(observed):
            return None
        finite = values[np.isfinite(values)]
        if len(finite) < max(20, MIN_DEFINED * len(values)):
            return None
        tail = (1.0 - self.level) / 2.0
        lo, hi = np.quantile(finite, [tail, 1.0 - tail])
        return float(lo), float(hi)


def bootstrap(
    design: StudyDesign,
    noise: Noise,
    *,
    replicates: int = DEFAULT_REPLICATES,
    level: float = LEVEL,
    seed: int = 0,
    parametric: bool = True,
    families: tuple[Sequence[str], str] | None = None,
    select: bool = True,
) -> Bootstrap:
    """Perturb every run's log loss by N(0, sigma*^2) and recompute every estimate, ``replicates`` times.

    ``sigma*`` is drawn per replicate from the estimate's scaled inverse-chi-square distribution (``df`` degrees of
    freedom), so a noise level measured from few seeds or few cells widens the intervals accordingly. With
    ``select``, each replicate chooses the parametric law's terms as the observed fit did (the same test at the
    measured noise), so the intervals include the uncertainty of that choice.
    """
    if not noise.known or replicates <= 0:
        return Bootstrap({}, np.zeros((0, 5)), level)
    rng = np.random.default_rng(seed)
    log_l = np.log(design.loss)
    rows: list[dict[str, float]] = []
    params = []
    for _ in range(replicates):
        sigma = noise.sigma * math.sqrt(noise.df / rng.chisquare(noise.df))
        replica = np.exp(log_l + rng.normal(0.0, sigma, len(log_l)))
        est = estimate(
            design, replica, parametric=parametric, families=families, run_noise=noise.sigma if select else None
        )
        rows.append(est.vector())
        params.append(est.parametric.array() if est.parametric is not None else np.full(5, np.nan))
    draws = {name: np.array([row[name] for row in rows]) for name in rows[0]}
    return Bootstrap(draws, np.array(params).reshape(-1, 5), level)
