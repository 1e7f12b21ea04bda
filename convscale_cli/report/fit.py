"""Scaling-law fit types: the frontier power law and the parametric law L(N, D) of Hoffmann et al.

Smith et al. (2023, §2, Fig. 2) report "a clear linear trend" of held-out loss against TPU-v4 core-hours on log-log
axes but give no exponent. :class:`PowerLawFit` holds ``L = a * C**(-b)`` with its intervals; the report builds it
from :mod:`convscale_cli.report.estimates` with intervals from the bootstrap over runs
(:mod:`convscale_cli.report.inference`). :func:`fit_power_law` is a standalone least-squares fit with a pairs
bootstrap, for points that are independent (it knows nothing of cells, seeds or best-lr selection).
:func:`fit_parametric` (from :mod:`.parametric`) fits ``L(N, D) = E + A/N**alpha + B/D**beta``.

Only numpy is imported at module level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convscale_cli.report._fitting import ArrayLike, FitError, check_level, positive_array, quantile_interval
from convscale_cli.report.parametric import EXPONENT_RANGE, NAMES, ParametricPoint, fit_varpro, law

# Identifiability: the exponent of an axis is quoted only when that axis has enough distinct values over enough span.
MIN_DISTINCT = 3
MIN_SPAN = 4.0
_NAMES = NAMES

__all__ = ["FitError", "ParametricFit", "PowerLawFit", "fit_parametric", "fit_power_law"]


@dataclass(frozen=True)
class PowerLawFit:
    """``loss = a * compute**(-b)``, fitted in log space.

    Attributes:
        a: Loss at one unit of compute.
        b: Decay exponent (positive when loss falls with compute).
        r2: Coefficient of determination of the log-log regression.
        n: Number of points fitted.
        level: Confidence level of the intervals.
        a_interval: Bootstrap interval of ``a`` (None without a bootstrap).
        b_interval: Bootstrap interval of ``b`` (None without a bootstrap).
        compute_range: Smallest and largest compute fitted.
        samples: Bootstrap draws of ``(log a, b)``, shape ``(k, 2)``.
    """

    a: float
    b: float
    r2: float
    n: int
    level: float
    a_interval: tuple[float, float] | None
    b_interval: tuple[float, float] | None
    compute_range: tuple[float, float]
    samples: np.ndarray = field(repr=False, compare=False)

    def predict(self, compute: ArrayLike) -> np.ndarray:
        """Predicted loss at each compute value."""
        c = positive_array("compute", compute)
        return self.a * c ** (-self.b)

    def interval(self, compute: ArrayLike, level: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise bootstrap band of the fitted curve (the prediction itself when there is no bootstrap)."""
        c = positive_array("compute", compute)
        if len(self.samples) == 0:
            mid = self.predict(c)
            return mid, mid
        curves = np.exp(self.samples[:, :1] - self.samples[:, 1:] * np.log(c)[None, :])
        return quantile_interval(curves, check_level(level or self.level))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no bootstrap draws)."""
        return {
            "law": "L = a * C^(-b)",
            "a": self.a,
            "b": self.b,
            "r2": self.r2,
            "n": self.n,
            "level": self.level,
            "a_interval": list(self.a_interval) if self.a_interval else None,
            "b_interval": list(self.b_interval) if self.b_interval else None,
            "compute_range": list(self.compute_range),
            "bootstrap": len(self.samples),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PowerLawFit:
        """Rebuild a fit from :meth:`to_dict` output (e.g. ``fit.json``); bootstrap draws are not stored there."""
        try:
            return cls(
                a=float(data["a"]),
                b=float(data["b"]),
                r2=float(data["r2"]),
                n=int(data["n"]),
                level=float(data["level"]),
                a_interval=tuple(data["a_interval"]) if data.get("a_interval") else None,
                b_interval=tuple(data["b_interval"]) if data.get("b_interval") else None,
                compute_range=(float(data["compute_range"][0]), float(data["compute_range"][1])),
                samples=np.zeros((0, 2)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise FitError(f"not a power-law fit: {exc!r} missing or malformed") from exc


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def fit_power_law(
    compute: ArrayLike, loss: ArrayLike, *, bootstrap: int = 1000, level: float = 0.9, seed: int = 0
) -> PowerLawFit:
    """Fit ``loss = a * compute**(-b)`` by least squares on ``log loss`` against ``log compute``.

    Args:
        compute: Compute per point (any positive unit; the report uses TPU-v4 core-hours).
        loss: Held-out loss per point (positive).
        bootstrap: Pairs-bootstrap resamples for the intervals; 0 disables them. Needs at least 3 points.
        level: Confidence level of the intervals.
        seed: Seed of the bootstrap resampling, so reports are reproducible.

    Returns:
        The fit, with bootstrap intervals of ``a`` and ``b`` and draws for a confidence band.

    Raises:
        FitError: Fewer than two distinct compute values, mismatched lengths or non-positive values.
    """
    c, y = positive_array("compute", compute), positive_array("loss", loss)
    if len(c) != len(y):
        raise FitError(f"compute and loss differ in length: {len(c)} vs {len(y)}")
    if len(np.unique(c)) < 2:
        raise FitError(f"a power law needs at least 2 distinct compute values, got {len(np.unique(c))}")
    level = check_level(level)
    x, ly = np.log(c), np.log(y)
    log_a, slope = _ols(x, ly)
    residual = ly - (log_a + slope * x)
    total = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / total if total > 0 else 1.0

    draws: list[tuple[float, float]] = []
    if bootstrap > 0 and len(c) >= 3:
        rng = np.random.default_rng(seed)
        for _ in range(bootstrap):
            idx = rng.integers(0, len(c), len(c))
            if len(np.unique(x[idx])) < 2:  # a resample of one compute value has no slope
                continue
            la, sl = _ols(x[idx], ly[idx])
            draws.append((la, -sl))
    samples = np.asarray(draws, dtype=np.float64).reshape(-1, 2)
    a_interval = b_interval = None
    if len(samples):
        lo, hi = quantile_interval(samples, level)
        a_interval = (float(np.exp(lo[0])), float(np.exp(hi[0])))
        b_interval = (float(lo[1]), float(hi[1]))
    return PowerLawFit(
        a=float(np.exp(log_a)),
        b=-slope,
        r2=r2,
        n=len(c),
        level=level,
        a_interval=a_interval,
        b_interval=b_interval,
        compute_range=(float(c.min()), float(c.max())),
        samples=samples,
    )


def identifiability(n: np.ndarray, d: np.ndarray) -> dict[str, str]:
    """Why an exponent cannot be identified from these sizes, per exponent name (empty when both can)."""
    found = {}
    for label, values, exponent in (("model sizes", n, "alpha"), ("data sizes", d, "beta")):
        distinct = len(np.unique(np.round(np.log(values), 9)))
        span = float(values.max() / values.min())
        if distinct < MIN_DISTINCT:
            found[exponent] = f"only {distinct} distinct {label} (need >= {MIN_DISTINCT})"
        elif span < MIN_SPAN:
            found[exponent] = f"{label} span only {span:.1f}x (need >= {MIN_SPAN:g}x)"
    return found


@dataclass(frozen=True)
class ParametricFit:
    """The fitted law with its bootstrap draws and the reasons any part of it cannot be trusted.

    Attributes:
        E, A, alpha, B, beta: Point estimates.
        n: Number of cells fitted.
        n_sizes: Distinct model sizes among them.
        size_axis: What N measures ("params": parameters without the classifier; "macs": MACs per image).
        level: Confidence level of ``intervals``.
        intervals: Bootstrap interval per parameter name (empty without a bootstrap).
        warnings: Why the exponents or allocations may not be trusted; empty when the data constrain them.
        unquoted: Quantities withheld, with the reason (e.g. ``{"alpha": "only 2 distinct model sizes"}``).
        rms: Root-mean-square relative residual of the fit.
        samples: Bootstrap draws of ``(E, A, alpha, B, beta)``, shape ``(k, 5)``.
    """

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    n: int
    n_sizes: int
    size_axis: str
    level: float
    intervals: dict[str, tuple[float, float]]
    warnings: tuple[str, ...]
    unquoted: dict[str, str]
    rms: float
    samples: np.ndarray = field(repr=False, compare=False)

    @property
    def identifiable(self) -> bool:
        """True when both exponents can be quoted and nothing sits on a bound."""
        return not self.warnings and not self.unquoted

    def params(self) -> np.ndarray:
        """``(E, A, alpha, B, beta)``."""
        return np.array([self.E, self.A, self.alpha, self.B, self.beta])

    def predict(self, N: ArrayLike, D: ArrayLike) -> np.ndarray:  # noqa: N803  (the paper's names)
        """Predicted loss for model size(s) ``N`` trained on ``D`` examples (broadcast)."""
        return law(self.params(), positive_array("N", N), positive_array("D", D))

    def interval(
        self,
        N: ArrayLike,  # noqa: N803
        D: ArrayLike,  # noqa: N803
        level: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise bootstrap interval of the prediction (the prediction itself without a bootstrap)."""
        n, d = positive_array("N", N), positive_array("D", D)
        if len(self.samples) == 0:
            mid = self.predict(n, d)
            return mid, mid
        preds = np.stack([law(p, n, d) for p in self.samples])
        return quantile_interval(preds, check_level(level or self.level))

    def prediction_interval(
        self,
        N: ArrayLike,  # noqa: N803
        D: ArrayLike,  # noqa: N803
        spread: float,
        df: int,
        level: float | None = None,
        seed: int = 0,
        draws: int = 50,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise interval for the held-out loss of *one new run* at ``(N, D)``, tuned as the fitted runs were.

        A new run differs from the law by more than the law's own uncertainty: by its noise, and by how well its
        learning rate happens to be tuned (two trials per cell leave some cells 2% or more above the law). Both show
        in how far the fitted runs themselves fall from the law, ``spread``: the standard deviation of one run's log
        loss about it, with ``df`` degrees of freedom. Each bootstrap draw of the law is multiplied by ``draws``
        draws of ``exp(s z)``, ``z ~ N(0, 1)`` and ``s`` from the scaled inverse chi-square of ``spread`` (a
        bootstrap prediction interval, Davison & Hinkley 1997, §6.3.3). Without a bootstrap or a spread, this is
        :meth:`interval`.
        """
        n, d = positive_array("N", N), positive_array("D", D)
        if len(self.samples) == 0 or not (math.isfinite(spread) and df > 0):
            return self.interval(n, d, level)
        rng = np.random.default_rng(seed)
        k = len(self.samples) * draws
        scale = spread * np.sqrt(df / rng.chisquare(df, size=k))
        preds = np.repeat(np.stack([law(p, n, d) for p in self.samples]), draws, axis=0)
        scale = scale.reshape((k,) + (1,) * (preds.ndim - 1))
        preds = preds * np.exp(scale * rng.standard_normal(preds.shape))
        return quantile_interval(preds, check_level(level or self.level))

    def allocation_exponents(self) -> tuple[float, float]:
        """Exponents of the compute-optimal ``N_opt ~ C**a`` and ``D_opt ~ C**(1-a)`` (Hoffmann et al. eq. 4)."""
        total = self.alpha + self.beta
        return self.beta / total, self.alpha / total

    def optimal_allocation(
        self, compute: ArrayLike, cost_per_size_example: float = 6.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Compute-optimal ``(N, D)`` for a budget ``compute = cost_per_size_example * N * D`` (Hoffmann et al. eq. 4).

        With N in MACs per image and compute in FLOPs, training costs ~6 FLOPs per MAC per example (forward plus
        backward), hence the default. The result is a continuous size: a model of that size may not exist.
        """
        c = positive_array("compute", compute) / cost_per_size_example
        a_exp, _ = self.allocation_exponents()
        if self.A <= 0 or self.B <= 0:
            raise FitError("the fitted law has A = 0 or B = 0: it has no compute-optimal allocation")
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        n_opt = g * c**a_exp
        return n_opt, c / n_opt

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no bootstrap draws); withheld quantities are null."""
        a_exp, b_exp = self.allocation_exponents()
        withheld = bool(self.unquoted)
        return {
            "law": "L = E + A / N^alpha + B / D^beta",
            **{name: getattr(self, name) for name in _NAMES},
            "n": self.n,
            "n_sizes": self.n_sizes,
            "size_axis": self.size_axis,
            "level": self.level,
            "intervals": {k: list(v) for k, v in self.intervals.items()},
            "identifiable": self.identifiable,
            "warnings": list(self.warnings),
            "unquoted": dict(self.unquoted),
            "rms": self.rms,
            "bootstrap": len(self.samples),
            "optimal_size_exponent": None if withheld else a_exp,
            "optimal_data_exponent": None if withheld else b_exp,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParametricFit:
        """Rebuild a fit from :meth:`to_dict` output (e.g. ``fit.json``); bootstrap draws are not stored there."""
        try:
            return cls(
                **{name: float(data[name]) for name in _NAMES},
                n=int(data["n"]),
                n_sizes=int(data["n_sizes"]),
                size_axis=str(data["size_axis"]),
                level=float(data["level"]),
                intervals={k: (float(v[0]), float(v[1])) for k, v in data.get("intervals", {}).items()},
                warnings=tuple(data.get("warnings", ())),
                unquoted=dict(data.get("unquoted", {})),
                rms=float(data.get("rms", math.nan)),
                samples=np.zeros((0, len(_NAMES))),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise FitError(f"not a parametric fit: {exc!r} missing or malformed") from exc


def make_fit(
    point: ParametricPoint,
    n: np.ndarray,
    d: np.ndarray,
    *,
    size_axis: str,
    samples: np.ndarray | None = None,
    level: float = 0.9,
) -> ParametricFit:
    """Wrap a point fit with its bootstrap draws, intervals and the reasons it may not be trusted."""
    level = check_level(level)
    draws = np.zeros((0, len(_NAMES))) if samples is None else np.asarray(samples, dtype=np.float64).reshape(-1, 5)
    # A replicate is usable when every parameter is finite, except the exponent of a term it left out (coefficient 0).
    left_out = np.zeros_like(draws, dtype=bool)
    left_out[:, 2] = draws[:, 1] == 0
    left_out[:, 4] = draws[:, 3] == 0
    draws = draws[np.all(np.isfinite(draws) | left_out, axis=1)]
    intervals: dict[str, tuple[float, float]] = {}
    for i, name in enumerate(_NAMES):
        column = draws[:, i]
        column = column[np.isfinite(column)]
        if len(column) and len(column) >= 0.8 * len(draws):
            lo, hi = quantile_interval(column, level)
            intervals[name] = (float(lo), float(hi))
    unquoted = identifiability(n, d)
    for coefficient, exponent, axis in (("A", "alpha", "model size"), ("B", "beta", "data")):
        if getattr(point, coefficient) == 0:
            unquoted.setdefault(exponent, f"{coefficient} = 0: the loss does not measurably depend on {axis}")
        elif len(draws) and exponent not in intervals:
            # The bootstrap's replicates left the term out too often to read an interval off the rest.
            share = float(np.mean(draws[:, _NAMES.index(coefficient)] == 0))
            unquoted.setdefault(
                exponent,
                f"{axis} drops out of the law in {share:.0%} of the bootstrap replicates: the runs do not pin "
                f"{exponent} down",
            )
    # A coefficient at 0 is a term the data do not support (left out of the law, or sitting on its bound).
    warnings = [
        f"{name} left out: the fit with it is no better than the run noise explains"
        if name in point.left_out
        else f"{name} sits at 0: the data do not bound it"
        for name in ("E", "A", "B")
        if getattr(point, name) == 0
    ]
    for name in point.at_bound:
        if name in ("alpha", "beta"):
            warnings.append(f"{name} sits at the end of its search range {EXPONENT_RANGE}: the data do not bound it")
    return ParametricFit(
        E=point.E,
        A=point.A,
        alpha=point.alpha,
        B=point.B,
        beta=point.beta,
        n=len(n),
        n_sizes=len(np.unique(n)),
        size_axis=size_axis,
        level=level,
        intervals=intervals,
        warnings=tuple(warnings),
        unquoted=unquoted,
        rms=point.rms,
        samples=draws,
    )


def fit_parametric(
    N: ArrayLike,  # noqa: N803  (the paper's names)
    D: ArrayLike,  # noqa: N803
    loss: ArrayLike,
    *,
    size_axis: str = "params",
    level: float = 0.9,
) -> ParametricFit:
    """Point fit of the law to cells, without intervals (those come from the study bootstrap).

    Raises:
        FitError: fewer than 5 cells, mismatched lengths, non-positive values or an unknown size axis.
    """
    if size_axis not in ("params", "macs"):
        raise FitError(f"size_axis must be 'params' or 'macs', got {size_axis!r}")
    point = fit_varpro(N, D, loss)
    return make_fit(point, positive_array("N", N), positive_array("D", D), size_axis=size_axis, level=level)
